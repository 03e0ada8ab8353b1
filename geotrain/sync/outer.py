"""The outer step every site computes from a round's accepted contributions
(geotrain/sync/diloco.py): their weighted mean, then SGD with (Nesterov)
momentum on the global parameters. Same float ops, same order, same inputs on
every site, so every site gets the same bits. With fragment sync
(geotrain/sync/fragments.py) a contribution holds only some tensors: each
tensor is averaged over the contributions that hold it, and only those tensors
(and their momentum) move.
"""

from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]


def outer_step(params: Tensors, grad: Tensors, momentum_buf: Tensors,
               lr: float, momentum: float, nesterov: bool) -> None:
    """One outer SGD step in place: buf = mu*buf + g; d = g + mu*buf (Nesterov)
    or buf; theta -= lr*d. With momentum 0, d = g. Only the grad's tensors move."""
    for name, g in grad.items():
        if momentum:
            buf = momentum_buf.setdefault(name, torch.zeros_like(g))
            buf.mul_(momentum).add_(g)
            d = g + momentum * buf if nesterov else buf
        else:
            d = g
        params[name].sub_(lr * d)


def weighted_mean(parts: list[tuple[str, Tensors, float]]) -> Tensors:
    """Per tensor, the sum of w_i/W * delta_i over the parts that hold it (W: their
    total weight), always in key order so every site gets the same bits. When every
    part holds every tensor, W is the same sum of all weights for each."""
    parts = sorted(parts, key=lambda p: p[0])
    totals: dict[str, float] = {}
    for _, delta, w in parts:
        for name in delta:
            totals[name] = totals[name] + w if name in totals else w
    out: Tensors = {}
    for _, delta, w in parts:
        for name, t in delta.items():
            scaled = t.to(torch.float32) * (w / totals[name])
            out[name] = out[name] + scaled if name in out else scaled
    return out
