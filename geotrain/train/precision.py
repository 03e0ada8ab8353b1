"""Mixed precision and device setup for training, shared by the built-in trainer
(geotrain/train/trainer.py) and a user's own loop (geotrain/train/entry.py `SiteContext`).

`train.precision` in a recipe says which floats the forward pass and the loss
run in; parameters, gradients and optimizer state stay fp32 whatever it says:

    precision = resolve(recipe.train.precision, device)   # 'auto' -> 'bf16' or 'fp32'
    scaler = grad_scaler(precision, device)               # does something for fp16 only
    with autocast(precision, device):
        _, loss = model(x, y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt); clip_grad_norm_(...); scaler.step(opt); scaler.update()

fp32 enters no autocast and its scaler is disabled (`scale` returns the loss
itself, `step` is `opt.step()`), so it computes bit for bit what a loop without
this module does. bf16 and fp16 work on the CPU too (CPU autocast), slowly.
"""

from __future__ import annotations

import contextlib
from typing import get_args

import torch

from geotrain.recipe import TrainSpec

PRECISIONS: tuple[str, ...] = get_args(TrainSpec.model_fields["precision"].annotation)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(precision: str, device: str | torch.device) -> str:
    """The precision `precision` means on `device`: 'auto' is 'bf16' on a CUDA
    device with native bf16 (Ampere and newer) and 'fp32' anywhere else (a T4
    only emulates bf16); the others mean themselves."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    # On the current CUDA device: prepare_device() makes the worker's device current.
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "fp32"


def autocast(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """The context to run forward and loss in: torch.autocast to the resolved
    precision's dtype, or nothing at all for fp32. Autocast is per thread: a
    thread of its own (an evaluation) enters its own."""
    precision = resolve(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: str | torch.device) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 only (whose small gradients underflow
    without one); for bf16 and fp32 every call on it passes straight through.
    A step whose gradients are not finite is skipped by `scaler.step` and the
    scale is lowered: that is the scaler at work, not a failure."""
    enabled = resolve(precision, device) == "fp16"
    return torch.amp.GradScaler(torch.device(device).type, enabled=enabled)


def prepare_device(device: str | torch.device) -> torch.device:
    """Make `device` this process's (and thread's) current CUDA device and allow
    TF32 matmuls on it; nothing for the CPU. Call once per worker, before
    building the model."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is not None:
            torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`: through pinned memory without blocking the host when
    the device is CUDA, as is for the CPU (the same values either way)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def side_stream(device: str | torch.device) -> torch.cuda.Stream | None:
    """A CUDA stream for work in a thread beside training (an evaluation), so
    waiting for its result does not wait for the training steps queued on the
    default stream meanwhile; None (`torch.cuda.stream(None)` does nothing) off CUDA."""
    dev = torch.device(device)
    return torch.cuda.Stream(dev) if dev.type == "cuda" else None
