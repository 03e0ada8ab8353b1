"""DiLoCo across sites, through the run store.

Each site runs H inner optimizer steps on its own data, then publishes its
pseudo-gradient (global - local) to the store, reads every member's, averages
them weighted by tokens trained, and applies the outer optimizer (SGD with
Nesterov momentum) to the global parameters. Every site does the same float
operations in the same order on the same inputs, on the CPU in fp32, so every
site ends a round with bit-identical global parameters; each records the hash
it got, and the round's leader commits the new global state to the store.

In a user's own loop (the built-in trainer uses exactly this):

    with DiLoCo(model, inner_opt, exchange, inner_steps=50) as diloco:
        for batch in data:
            loss = model(batch).backward(); inner_opt.step(); inner_opt.zero_grad()
            diloco.step(tokens=batch.numel())   # syncs every 50 inner steps
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from geotrain.errors import GeotrainError
from geotrain.store import RunStore

Tensors = dict[str, torch.Tensor]


class SyncError(GeotrainError):
    """A round could not complete (a member never published, a bad payload)."""


def params_hash(params: Tensors) -> str:
    """sha256 over names and raw bytes in name order: equal iff bit-identical."""
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def encode(tensors: Tensors) -> bytes:
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


def outer_step(params: Tensors, grad: Tensors, momentum_buf: Tensors,
               lr: float, momentum: float, nesterov: bool) -> None:
    """One outer SGD step in place: buf = mu*buf + g; d = g + mu*buf (Nesterov)
    or buf; theta -= lr*d. With momentum 0, d = g."""
    for name, g in grad.items():
        if momentum:
            buf = momentum_buf.setdefault(name, torch.zeros_like(g))
            buf.mul_(momentum).add_(g)
            d = g + momentum * buf if nesterov else buf
        else:
            d = g
        params[name].sub_(lr * d)


def weighted_mean(parts: list[tuple[str, Tensors, float]]) -> Tensors:
    """Sum of w_i/W * delta_i, always in site-name order so every site gets the
    same bits."""
    parts = sorted(parts, key=lambda p: p[0])
    total = sum(w for _, _, w in parts)
    out: Tensors = {}
    for _, delta, w in parts:
        for name, t in delta.items():
            scaled = t.to(torch.float32) * (w / total)
            out[name] = out[name] + scaled if name in out else scaled
    return out


@dataclass
class RoundResult:
    round: int
    hash: str
    bytes_sent: int
    bytes_received: int
    wait_s: float
    members: list[str]


class RoundExchange:
    """The store side of a round: publish a contribution, gather the members',
    commit the global state. Membership is fixed to `members` here."""

    def __init__(self, store: RunStore, site: str, members: list[str],
                 timeout_s: float = 600.0, poll_s: float = 0.05):
        self.store, self.site, self.members = store, site, sorted(members)
        self.timeout_s, self.poll_s = timeout_s, poll_s

    @property
    def leader(self) -> bool:
        return self.site == self.members[0]

    def latest(self) -> tuple[int, Tensors, Tensors] | None:
        """The newest committed global state: (round, params, momentum)."""
        r = self.store.latest_global()
        if r is None:
            return None
        files, _ = self.store.read_global(r)
        momentum = decode(files["outer.safetensors"]) if "outer.safetensors" in files else {}
        return r, decode(files["model.safetensors"]), momentum

    def publish(self, r: int, delta: Tensors, tokens: int, steps: int) -> int:
        payload = encode(delta)
        self.store.put_contribution(r, self.site, payload,
                                    {"tokens": tokens, "inner_steps": steps, "codec": "none"})
        return len(payload)

    def gather(self, r: int, should_stop: Callable[[], bool] = lambda: False
               ) -> tuple[list[tuple[str, Tensors, float]], int]:
        """Wait for every member's contribution to round r; return them with the
        bytes downloaded."""
        deadline = time.monotonic() + self.timeout_s
        while set(self.members) - set(self.store.contributions(r)):
            if time.monotonic() > deadline:
                missing = sorted(set(self.members) - set(self.store.contributions(r)))
                raise SyncError(f"round {r}: no contribution from {', '.join(missing)} "
                                f"within {self.timeout_s:g} s")
            if should_stop():
                raise SyncError(f"round {r}: stopped while waiting for the other sites")
            time.sleep(self.poll_s)
        parts, received = [], 0
        for site in self.members:
            payload, manifest = self.store.read_contribution(r, site)
            received += len(payload) if site != self.site else 0
            parts.append((site, decode(payload), float(manifest["tokens"])))
        return parts, received

    def commit(self, r: int, params: Tensors, momentum: Tensors, meta: dict) -> None:
        files = {"model.safetensors": encode(params)}
        if momentum:
            files["outer.safetensors"] = encode(momentum)
        self.store.commit_global(r, files, meta)


@dataclass
class DiLoCo:
    """Wraps a model and its inner optimizer; `step()` after each inner step
    syncs through the store every `inner_steps` steps.

    With torch.distributed initialised (several workers in one site), the
    site's local model is identical on every rank (gradients are all-reduced
    inside the site); rank 0 alone talks to the store and broadcasts the new
    global parameters to the others.
    """

    model: torch.nn.Module
    inner_optimizer: torch.optim.Optimizer
    exchange: RoundExchange
    inner_steps: int
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    # Called on the leader after each round with the new global model loaded;
    # returns extra fields for the commit manifest (the trainer's eval loss).
    on_commit: Callable[[int], dict] | None = None
    should_stop: Callable[[], bool] = lambda: False
    round: int = 0
    global_params: Tensors = field(default_factory=dict)
    momentum: Tensors = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    history: list[RoundResult] = field(default_factory=list)
    _steps: int = 0
    _tokens: int = 0

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def __enter__(self) -> DiLoCo:
        if self.rank == 0:
            latest = self.exchange.latest()
            if latest is None:
                raise SyncError("no committed global state in the store to start from")
            self.round, self.global_params, self.momentum = latest
        else:
            self.global_params = model_params(self.model)
        self._broadcast_global()
        load_params(self.model, self.global_params)
        return self

    def __exit__(self, *exc) -> None:
        return None

    def _broadcast_global(self) -> None:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        r = torch.tensor([self.round])
        dist.broadcast(r, 0)
        self.round = int(r.item())
        for name in sorted(self.global_params):
            dist.broadcast(self.global_params[name], 0)

    def step(self, tokens: int) -> RoundResult | None:
        """Count one inner step of `tokens` site-wide tokens; sync when a round ends."""
        self._steps += 1
        self._tokens += tokens
        if self._steps < self.inner_steps:
            return None
        return self.sync()

    def sync(self) -> RoundResult | None:
        r = self.round + 1
        local = model_params(self.model)
        result = None
        if self.rank == 0:
            delta = {n: self.global_params[n] - local[n] for n in local}
            sent = self.exchange.publish(r, delta, self._tokens, self._steps)
            t0 = time.monotonic()
            parts, received = self.exchange.gather(r, self.should_stop)
            wait = time.monotonic() - t0
            grad = weighted_mean(parts)
            outer_step(self.global_params, grad, self.momentum,
                       self.outer_lr, self.outer_momentum, self.nesterov)
            digest = params_hash(self.global_params)
            self.bytes_sent += sent
            self.bytes_received += received
            result = RoundResult(r, digest, sent, received, wait, [p[0] for p in parts])
            self.history.append(result)
        self.round = r
        self._broadcast_global()
        load_params(self.model, self.global_params)
        self._steps = self._tokens = 0
        if self.rank == 0:
            self.exchange.store.put_result(r, self.exchange.site, {"hash": result.hash})
            if self.exchange.leader:
                meta = {"hash": result.hash, "members": result.members}
                if self.on_commit:
                    meta.update(self.on_commit(r))
                self.exchange.commit(r, self.global_params, self.momentum, meta)
        return result

