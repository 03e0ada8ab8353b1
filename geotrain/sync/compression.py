"""Pseudo-gradient codecs (placeholder with the lossless codec only; the full
set — int8, int4, top-k with error feedback — lands from the codecs branch)."""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from geotrain.errors import GeotrainError

Tensors = dict[str, torch.Tensor]
CODECS = ("none",)


class CodecError(GeotrainError):
    """A payload that cannot be decoded, or an input that must not be sent."""


class Codec:
    name = "none"

    def encode(self, tensors: Tensors) -> bytes:
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise CodecError("refusing to encode non-finite values")
        return st_save({k: v.detach().contiguous().cpu().float() for k, v in tensors.items()},
                       metadata={"codec": "none"})

    def decode(self, data: bytes) -> Tensors:
        return decode(data)


def make_codec(name: str, **_) -> Codec:
    if name != "none":
        raise CodecError(f"unknown codec {name!r}")
    return Codec()


def decode(data: bytes) -> Tensors:
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise CodecError(f"undecodable payload: {e}") from None
