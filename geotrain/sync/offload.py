"""Where DiLoCo keeps its fp32 copies of the model: the round-start snapshot and
the anchors of rounds still in flight (geotrain/sync/diloco.py).

`sync.offload` in the recipe, `DiLoCo(offload=...)` in a user's loop:

- on (the default when the model is on a GPU): the copies live in host
  memory, pinned when the model is on CUDA so the device-to-host copies are
  DMA; each buffer is allocated once and reused round after round (copied into
  with `non_blocking=True`, then one synchronize before the CPU reads it). The
  GPU holds only what training needs.
- off: each copy is a fresh tensor on its parameter's device — the CPU for a
  CPU model, as before offload existed; on a GPU the snapshot stays there
  (8 more bytes per parameter of GPU memory, no transfers at a round's end).

Either way the pseudo-gradient `start - params` is computed on the parameters'
device, so a GPU encodes it (it holds those 4 bytes per parameter only while
the round's payload is encoded); the same float ops on the same fp32 values
give the same bits everywhere. Construct DiLoCo once the model is on its
device: that is where "auto" looks. The global parameters and the outer momentum are not
copies of the model: they always stay on the CPU (every site must compute them
identically), and never travel to the GPU but through load_params.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

Tensors = dict[str, torch.Tensor]


def on_cuda(model: torch.nn.Module) -> bool:
    return any(p.is_cuda for p in model.parameters())


class ModelCopies:
    """fp32 copies of one model's parameters (tied weights once), kept as
    `offload` says (see the module docstring). `release` hands a set of copies
    back for reuse; it must not be used afterwards."""

    def __init__(self, model: torch.nn.Module, offload: bool):
        self.model, self.offload = model, offload
        self.pin = offload and on_cuda(model) and torch.cuda.is_available()
        self._free: list[Tensors] = []

    def _sync(self) -> None:
        """Wait for the non-blocking copies to and from pinned buffers."""
        if self.pin:
            for device in {p.device for p in self.model.parameters() if p.is_cuda}:
                torch.cuda.synchronize(device)

    def _params(self):
        return ((n, p.detach()) for n, p in self.model.named_parameters())

    def _buffers(self) -> Tensors:
        if self._free:
            return self._free.pop()
        return {n: torch.empty(p.shape, dtype=torch.float32, pin_memory=self.pin)
                for n, p in self._params()}

    def of_model(self) -> Tensors:
        """A copy of the parameters as they are now."""
        if not self.offload:
            return {n: p.to(torch.float32, copy=True) for n, p in self._params()}
        out = self._buffers()
        for n, p in self._params():
            out[n].copy_(p, non_blocking=True)
        self._sync()
        return out

    def copy(self, src: Tensors, into: Tensors, names: Collection[str] | None = None) -> Tensors:
        """A copy of `src` (copies of the same model, or global parameters):
        written over `into` with offload, else fresh on each parameter's device.
        With `names`, only those tensors are copied; `into` keeps the others."""
        if not self.offload:
            return {n: src[n].to(p.device, torch.float32, copy=True)
                    if names is None or n in names else into[n] for n, p in self._params()}
        for n, t in into.items():
            if names is None or n in names:
                t.copy_(src[n], non_blocking=True)
        self._sync()
        return into

    def release(self, copies: Tensors) -> None:
        if self.offload:
            self._free.append(copies)

    def delta(self, start: Tensors, names: Collection[str] | None = None) -> Tensors:
        """The pseudo-gradient start - params, fp32, on the parameters' device
        (of the tensors in `names` only, if given)."""
        out = {n: start[n].to(p.device, non_blocking=True) - p.to(torch.float32)
               for n, p in self._params() if names is None or n in names}
        self._sync()   # `start` may be overwritten as soon as this returns
        return out
