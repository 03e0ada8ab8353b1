"""Muon, an inner optimizer for the hidden weight matrices, with AdamW for the rest.

Muon is SGD with Nesterov momentum whose update for each 2-D weight matrix is
replaced by an approximately orthogonal matrix with the same singular vectors
(a few Newton–Schulz iterations, `orthogonalize`), so every direction of the
matrix moves by about the same amount. It suits hidden layers only: the token
and position embeddings, the output head, and every 1-D parameter (biases,
norm gains) go to AdamW groups of the same optimizer object, so a training
loop keeps one `.step()`, one `.zero_grad()` and one `state_dict()`:

    opt = configure_muon(model, muon_lr=0.02, adamw_lr=3e-3, weight_decay=0.1,
                         betas=(0.9, 0.95))
    loss.backward(); opt.step(); opt.zero_grad()

Each group carries `kind` ("muon" or "adamw") and `base_lr`, its peak lr: a
schedule sets `group["lr"]` from its own group's `base_lr` (see
geotrain/train/model.py `apply_lr_schedule`). Chosen with `train.optimizer:
muon` in a recipe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

# The quintic iteration's coefficients from the Muon write-up: chosen so that
# small singular values grow as fast as possible (slope a at 0) while all of
# them end up in a band around 1 (about 0.7 to 1.2) instead of exactly at 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Modules whose weight is a model's output layer, found by their attribute name
# (a head tied to an embedding is found as the embedding's weight).
HEAD_NAMES = ("head", "lm_head", "output", "classifier")


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximately orthogonal matrix with g's singular vectors (U V^T of
    g = U S V^T, singular values in about [0.7, 1.2]), by `steps` quintic
    Newton–Schulz iterations; in float32, or bfloat16 on CUDA. Same shape and
    dtype as g."""
    assert g.ndim == 2, "orthogonalize takes a matrix"
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:                       # iterate on the smaller Gram matrix x x^T
        x = x.mT
    x = x / (x.norm() + 1e-7)      # singular values <= 1, where the iteration converges
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the groups with kind "muon" (2-D parameters only), AdamW for
    the groups with kind "adamw". Group settings, with their defaults:

    - every group: `lr`, `base_lr` (defaults to `lr`), `weight_decay` (0,
      decoupled: p <- p·(1 - lr·weight_decay))
    - muon: `momentum` (0.95), `nesterov` (True), `ns_steps` (5); the step is
      lr · max(1, rows/cols)^0.5 · orthogonalize(momentum-smoothed gradient)
    - adamw: `betas` ((0.9, 0.95)), `eps` (1e-8), as torch.optim.AdamW
    """

    def __init__(self, groups: list[dict], *, lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        betas=betas, eps=eps, weight_decay=weight_decay, kind="muon")
        super().__init__(groups, defaults)
        for group in self.param_groups:
            group.setdefault("base_lr", group["lr"])
            if group["kind"] not in ("muon", "adamw"):
                raise ValueError(f"parameter group kind {group['kind']!r}; valid: muon, adamw")
            if group["kind"] == "muon" and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon orthogonalises matrices: put parameters that are not "
                                 "2-D in an 'adamw' group")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon if group["kind"] == "muon" else self._adamw)(group)
        return loss

    def _muon(self, group: dict) -> None:
        m, lr = group["momentum"], group["lr"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - m)
            g = p.grad.lerp(buf, m) if group["nesterov"] else buf
            scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])
            p.add_(orthogonalize(g, group["ns_steps"]), alpha=-lr * scale)

    def _adamw(self, group: dict) -> None:
        (beta1, beta2), lr = group["betas"], group["lr"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))


def split_params(model: nn.Module, adamw_params: Iterable[nn.Parameter] = ()
                 ) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices for Muon, other matrices for AdamW with weight decay,
    1-D parameters for AdamW without). Not Muon: embedding weights, the weight
    of a Linear named one of HEAD_NAMES, parameters of more than 2 dimensions,
    and whatever `adamw_params` lists (say, your own model's output layer)."""
    other = {id(p) for p in adamw_params}
    other |= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    other |= {id(m.weight) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in HEAD_NAMES}
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = [p for p in params if p.ndim == 2 and id(p) not in other]
    chosen = {id(p) for p in hidden}
    decay = [p for p in params if p.ndim >= 2 and id(p) not in chosen]
    return hidden, decay, [p for p in params if p.ndim < 2]


def configure_muon(model: nn.Module, *, muon_lr: float, adamw_lr: float, weight_decay: float,
                   betas: tuple[float, float], adamw_params: Iterable[nn.Parameter] = ()
                   ) -> Muon:
    """Muon at `muon_lr` for the hidden matrices (no weight decay, as in Muon's
    write-up); AdamW at `adamw_lr` for the rest, `weight_decay` on its
    matrices only (as configure_optimizer in geotrain/train/model.py)."""
    hidden, decay, flat = split_params(model, adamw_params)
    groups = [{"params": hidden, "kind": "muon", "lr": muon_lr},
              {"params": decay, "kind": "adamw", "lr": adamw_lr, "weight_decay": weight_decay},
              {"params": flat, "kind": "adamw", "lr": adamw_lr, "weight_decay": 0.0}]
    return Muon([g for g in groups if g["params"]], betas=betas)
