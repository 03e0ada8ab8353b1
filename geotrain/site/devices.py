"""What a site's node trains on: its GPUs, how many workers it runs, and the backend
of the site's process group.

- `gpus_on_this_node()`: the GPUs torch sees here (0 on a CPU-only node); the site
  agent starts Ray with that many, and each TrainWorker asks Ray for one.
- `resolve_workers(requested, gpus, where)`: a site's `workers` made a number.
  `auto` is one worker per GPU, or 1 on a node without GPUs; an explicit count
  must not exceed the GPUs of a node that has some (`WorkersError` otherwise).
  The agent checks against the node's own GPUs; `geotrain plan` and the launch
  check against the catalog's GPU count of the instance type.
- `actor_device()`: inside a TrainWorker, `cuda:N` for the GPU Ray assigned it
  when CUDA can use it, else `cpu`.
- `choose_backend(ranks)`: NCCL when every rank has a usable CUDA device, gloo
  otherwise, and why.

torch and Ray are imported only inside the functions that need them, so the
planner can import this module without either.
"""

from __future__ import annotations

from geotrain.errors import GeotrainError

AUTO = "auto"
# An upper bound on the workers of an `auto` site, for checks that cannot know the
# node (the tokens a site may claim per round, geotrain/train/trainer.py). It must be
# the same number on every site, so it is a constant rather than read from a catalog
# a user may have refreshed: no catalog instance type has more than 8 GPUs
# (tests/test_devices.py checks), twice that leaves room for types it does not list.
AUTO_WORKERS_BOUND = 16


class WorkersError(GeotrainError):
    """A site asks for more workers than its node has GPUs."""


def gpus_on_this_node() -> int:
    """The CUDA devices torch can use on this node; 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_workers(requested: int | str, gpus: int, where: str = "this node") -> int:
    """The workers one node runs: `auto` is one per GPU (1 without GPUs); a number
    stays as it is but must be <= `gpus` when the node has any. `where` names the
    node in the error, e.g. "site 'a': instance type p4d.24xlarge"."""
    if requested == AUTO:
        return max(gpus, 1)
    if gpus and requested > gpus:
        raise WorkersError(f"{where}: workers is {requested} but it has {gpus} GPU(s), and each "
                           f"worker needs one; use at most {gpus}, or 'auto' (one per GPU)")
    return int(requested)


def most_workers(requested: int | str) -> int:
    """Workers per node at most: the count itself, or AUTO_WORKERS_BOUND for `auto`."""
    return AUTO_WORKERS_BOUND if requested == AUTO else int(requested)


def actor_device() -> str:
    """This Ray actor's torch device: the GPU Ray assigned it, else 'cpu'.

    Ray narrows CUDA_VISIBLE_DEVICES to the actor's GPU, which torch then calls
    cuda:0; where it did not (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES), the
    assigned id is the device's index."""
    import ray
    import torch

    ids = ray.get_gpu_ids()
    if not ids or not torch.cuda.is_available():
        return "cpu"
    return "cuda:0" if torch.cuda.device_count() == 1 else f"cuda:{int(ids[0])}"


def describe_rank(device: str) -> dict:
    """What a rank reports for the backend choice and the site's `group` event."""
    import ray
    import torch
    import torch.distributed as dist

    return {"device": device, "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "cuda": torch.cuda.is_available(), "nccl": dist.is_nccl_available()}


def choose_backend(ranks: list[dict]) -> tuple[str, str]:
    """(backend, why) for the site's group from each rank's `describe_rank()`
    (with its `rank`): 'nccl' when every rank has a CUDA device and NCCL, else 'gloo'."""
    no_cuda = [r for r in ranks if not r["device"].startswith("cuda")]
    if no_cuda:
        given = [r for r in no_cuda if r.get("gpu_ids")]
        note = (f"; Ray gave {'them' if len(given) > 1 else 'it'} GPU(s) "
                f"{', '.join(i for r in given for i in r['gpu_ids'])} but torch sees no CUDA"
                if given else "")
        return "gloo", (f"rank(s) {', '.join(str(r['rank']) for r in no_cuda)} of {len(ranks)} "
                        f"have no usable CUDA device{note}")
    if not all(r.get("nccl") for r in ranks):
        return "gloo", "every rank has a CUDA device but this torch build has no NCCL"
    return "nccl", f"every rank ({len(ranks)}) has a CUDA device"
