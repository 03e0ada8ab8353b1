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

The AdamW groups run torch's own AdamW (`torch.optim.adamw.adamw`), fused on
CUDA. There (`fused`) the optimizer also takes an fp16 GradScaler's scale and
overflow flag as tensors on the device, as torch's fused AdamW does: the
gradients are unscaled inside the step, and an overflowing step leaves every
parameter and buffer as it was by a choice made on the device, so `scaler.step`
never waits for the GPU.

Each group carries `kind` ("muon" or "adamw") and `base_lr`, its peak lr: a
schedule sets `group["lr"]` from its own group's `base_lr` (see
geotrain/train/model.py `apply_lr_schedule`). Chosen with `train.optimizer:
muon` in a recipe.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.adamw import adamw

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

    `fused` (default: whether every parameter is on CUDA): the AdamW groups run
    torch's fused kernel, and a GradScaler hands this optimizer its scale and
    overflow flag instead of reading them on the host (`_step_supports_amp_scaling`).
    """

    def __init__(self, groups: list[dict], *, lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, fused: bool | None = None):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        betas=betas, eps=eps, weight_decay=weight_decay, kind="muon")
        super().__init__(groups, defaults)
        params = [p for group in self.param_groups for p in group["params"]]
        self.fused = bool(params) and all(p.is_cuda for p in params) if fused is None else fused
        self._step_supports_amp_scaling = self.fused  # read by torch.amp.GradScaler.step
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
        # Set by a GradScaler around this call when `fused`: the scale to divide the
        # gradients by (None once the scaler has unscaled them) and the overflow flag.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            (self._muon if group["kind"] == "muon" else self._adamw)(group, grad_scale, found_inf)
        return loss

    def _muon(self, group: dict, grad_scale: torch.Tensor | None,
              found_inf: torch.Tensor | None) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            grad = p.grad if grad_scale is None else p.grad / grad_scale
            if found_inf is None:
                _muon_update(p, buf, grad, group)
                continue
            # Under a scaler: step copies, and keep the old values where the gradients
            # overflowed, a choice made on the device (no host read of found_inf).
            new_p, new_buf = p.clone(), buf.clone()
            _muon_update(new_p, new_buf, grad, group)
            skip = found_inf > 0
            p.copy_(torch.where(skip, p, new_p))
            buf.copy_(torch.where(skip, buf, new_buf))

    def _adamw(self, group: dict, grad_scale: torch.Tensor | None,
               found_inf: torch.Tensor | None) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            state = self.state[p]
            if not state:  # as torch.optim.AdamW keeps it: the fused kernel wants the step on the device
                state["step"] = torch.zeros((), dtype=torch.float32,
                                            device=p.device if self.fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if not params:
            return
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
              [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
              fused=self.fused or None, grad_scale=grad_scale, found_inf=found_inf,
              amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def _muon_update(p: torch.Tensor, buf: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
    """Muon's step of matrix `p` with momentum `buf`, both in place."""
    m, lr = group["momentum"], group["lr"]
    buf.lerp_(grad, 1 - m)
    g = grad.lerp(buf, m) if group["nesterov"] else buf
    scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
    if group["weight_decay"]:
        p.mul_(1 - lr * group["weight_decay"])
    p.add_(orthogonalize(g, group["ns_steps"]), alpha=-lr * scale)


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
                   betas: tuple[float, float], adamw_params: Iterable[nn.Parameter] = (),
                   fused: bool | None = None) -> Muon:
    """Muon at `muon_lr` for the hidden matrices (no weight decay, as in Muon's
    write-up); AdamW at `adamw_lr` for the rest, `weight_decay` on its
    matrices only (as configure_optimizer in geotrain/train/model.py)."""
    hidden, decay, flat = split_params(model, adamw_params)
    groups = [{"params": hidden, "kind": "muon", "lr": muon_lr},
              {"params": decay, "kind": "adamw", "lr": adamw_lr, "weight_decay": weight_decay},
              {"params": flat, "kind": "adamw", "lr": adamw_lr, "weight_decay": 0.0}]
    return Muon([g for g in groups if g["params"]], betas=betas, fused=fused)
