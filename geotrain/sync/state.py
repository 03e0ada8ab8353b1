"""The global state's tensors as the sites exchange and compare them: fp32 CPU
copies of a model's parameters, their hash (equal iff bit-identical) and their
lossless encoding for commits (safetensors)."""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

Tensors = dict[str, torch.Tensor]


def params_hash(params: Tensors) -> str:
    """sha256 over names and raw bytes in name order: equal iff bit-identical."""
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def encode(tensors: Tensors) -> bytes:
    """Global state (model, outer momentum) as safetensors: lossless."""
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def decode(data: bytes) -> Tensors:
    return st_load(data)


def model_params(model: torch.nn.Module) -> Tensors:
    """fp32 CPU copies of the parameters (tied weights appear once)."""
    return {n: p.detach().to("cpu", torch.float32).clone() for n, p in model.named_parameters()}


def load_params(model: torch.nn.Module, params: Tensors) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n].to(p.device, p.dtype))
