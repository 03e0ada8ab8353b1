"""The built-in trainer: a byte-level GPT, its data, and the inner loop a site runs."""
