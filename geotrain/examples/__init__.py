"""Examples of user training code for `train.entrypoint` (see recipes/custom.yaml)."""
