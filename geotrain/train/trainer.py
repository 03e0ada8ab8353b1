"""The built-in trainer: one site's share of a geotrain run.

`train_site()` is what each worker of a site runs (inside a Ray actor, see
geotrain/site/worker.py): build the byte-level GPT on the worker's device,
load this worker's disjoint data shard, and run inner steps (AdamW, or Muon
with `train.optimizer: muon`; in `train.precision`, geotrain/train/precision.py)
wrapped in `DiLoCo`, which meets the other sites through the run store every
`inner_steps` steps. Rank 0 of the site writes heartbeats and talks to the
store; whichever site commits a round evaluates that global model on held-out
data.

No step waits for the device: losses are summed where they are computed and
read about once a beat (`Meter`), and rank 0 asks about a drain about once a
second (`Agreement`), so a GPU can run ahead of the host.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from geotrain.errors import StoreError
from geotrain.recipe import Recipe
from geotrain.store import RunStore
from geotrain.sync import compression
from geotrain.sync.diloco import DiLoCo, RoundExchange, load_params, model_params
from geotrain.sync.rounds import TOKEN_SLACK
from geotrain.sync.schedule import OuterLR
from geotrain.train import data as D
from geotrain.train import precision as P
from geotrain.train.model import GPT, apply_lr_schedule, build, build_optimizer, config_for

EVAL_BYTES_PER_BATCH = 4
AGREE_EVERY_S = 1.0      # how often rank 0's answers (a drain) are shared with the other ranks
MAX_AGREE_STEPS = 1000   # ... and at least every this many steps


@dataclass(frozen=True)
class WorkerPlace:
    """Where a worker sits: which site (of all the run's sites) and which rank
    inside that site."""

    site: str
    site_index: int
    n_sites: int
    rank: int
    world: int
    device: str = "cpu"  # the torch device this worker trains on ('cuda:0' under Ray's GPU)


def model_config(recipe: Recipe):
    m = recipe.model
    return config_for(m.preset, recipe.train.seq_len, n_layer=m.n_layer, n_head=m.n_head,
                      d_model=m.d_model, dropout=m.dropout)


def initial_state(recipe: Recipe) -> dict[str, torch.Tensor]:
    """The round-0 global parameters: a deterministic function of the recipe."""
    return model_params(build(model_config(recipe), seed=recipe.train.seed))


def files_for(recipe: Recipe) -> tuple[list, list]:
    files = D.stdlib_files() if recipe.data.source == "python-stdlib" else D.glob_files(recipe.data.paths)
    return D.split(files, recipe.data.eval_fraction, recipe.train.seed)


@torch.no_grad()
def evaluate(model: GPT, batches: list, precision: str = "fp32") -> float:
    """Mean loss of `model` over `batches` (on the model's device), summed there
    in float64 (what summing each loss as a Python float gives) and read once."""
    device = next(model.parameters()).device
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    with P.autocast(precision, device):
        for x, y in batches:
            total += model(x, y)[1]
    model.train()
    return total.item() / len(batches)


def _all_reduce_grads(model: torch.nn.Module, world: int) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def inner_step(model: torch.nn.Module, forward: Callable, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, precision: str, x: torch.Tensor, y: torch.Tensor,
               grad_clip: float, world: int = 1) -> torch.Tensor:
    """One inner step of `model` (run through `forward`, the model or its compiled
    self): forward and loss under the precision's autocast, backward through the
    scaler, the site's gradient all-reduce, clipping of the unscaled gradients,
    the optimizer step (which an fp16 scaler skips when the gradients overflowed).
    Returns the loss, still on the device: nothing here waits for it."""
    with P.autocast(precision, x.device):
        _, loss = forward(x, y)
    scaler.scale(loss).backward()
    if world > 1:
        _all_reduce_grads(model, world)
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


class Meter:
    """The losses and tokens of the steps since the last read: the losses summed
    on the device, so no step waits for it; `read()` waits once for all of them.
    `loss` is an EMA of the step losses (0.9 per step), `tokens_per_s` of the
    rates between reads (the same weight per step)."""

    def __init__(self, device: torch.device, tokens_per_step: int):
        self.loss: float | None = None
        self.tokens_per_s = 0.0
        self._sum = torch.zeros((), device=device)
        self._steps, self._tokens_per_step = 0, tokens_per_step
        self._since = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self._sum += loss.float()
        self._steps += 1

    def read(self) -> bool:
        """Fold the steps since the last read in; False if a loss among them was not finite."""
        if not self._steps:
            return True
        total, now = self._sum.item(), time.perf_counter()
        n, self._steps = self._steps, 0
        self._sum.zero_()
        if not math.isfinite(total):
            return False
        keep = 0.9 ** n
        rate = n * self._tokens_per_step / max(now - self._since, 1e-9)
        self.loss = total / n if self.loss is None else keep * self.loss + (1 - keep) * total / n
        self.tokens_per_s = rate if not self.tokens_per_s else keep * self.tokens_per_s + (1 - keep) * rate
        self._since = now
        return True

    def restart_clock(self) -> None:
        """Time the rate from now: what passed since the last read was no training
        (a round's exchange)."""
        self._since = time.perf_counter()


class Agreement:
    """Rank 0's answer to `ask` (is a drain requested?), the same on every rank of
    the site. Alone in its site, a worker asks at every step; with others, rank 0
    asks about every AGREE_EVERY_S and shares its answer together with the number
    of steps until the next question, so the ranks meet in the same broadcast
    without one per step."""

    def __init__(self, place: WorkerPlace, ask: Callable[[], bool]):
        self.place, self.ask = place, ask
        self.next_at = 0
        self._last = (0, time.monotonic())

    def __call__(self, step: int) -> bool:
        if step < self.next_at:
            return False
        if self.place.world == 1:
            return self.ask()
        answer, every = 0, 1
        if self.place.rank == 0:
            (s0, t0), now = self._last, time.monotonic()
            per_s = (step - s0) / max(now - t0, 1e-9)
            answer, every = int(self.ask()), max(1, min(MAX_AGREE_STEPS, int(per_s * AGREE_EVERY_S)))
            self._last = (step, now)
        answer, every = _broadcast([answer, every], self.place)
        self.next_at = step + every
        return bool(answer)


def make_exchange(recipe: Recipe, store: RunStore, site: str,
                  tokens_per_step_known: bool = True) -> RoundExchange:
    """The site's side of the rounds, configured from the recipe's sync section.

    Only the recipe's sites (and their migrated members `name~k`) may
    contribute. With `tokens_per_step_known` (the built-in trainer: a step is
    batch_size x seq_len tokens per worker) and rounds of `inner_steps` steps, a
    contribution may claim at most TOKEN_SLACK x what its site trains in a round;
    otherwise (`sync.round_seconds`, or a user's entrypoint counting its own
    tokens) only the absolute MAX_TOKENS bound applies."""
    s, t = recipe.sync, recipe.train
    codec = compression.make_codec(s.compression, topk_fraction=s.topk_fraction,
                                   chunk=s.topk_chunk, value_bits=s.value_bits,
                                   error_decay=s.error_decay)
    max_tokens = None
    if tokens_per_step_known and not s.round_seconds:
        max_tokens = {x.name: TOKEN_SLACK * t.inner_steps * t.batch_size * t.seq_len
                      * x.most_workers() * x.nodes for x in recipe.sites}  # auto: a bound
    return RoundExchange(store, site, codec=codec, window_s=s.round_timeout_s,
                         join_wait_s=s.join_wait_s, liveness_s=recipe.liveness_s(),
                         reject_norm_factor=s.reject_norm_factor, state_every=s.state_every,
                         final_round=recipe.train.rounds,
                         roster=[x.name for x in recipe.sites], max_tokens=max_tokens,
                         initial_hash=_initial_hash(store))


def _initial_hash(store: RunStore) -> str | None:
    """Round 0's hash as run.json (signed by the operator) names it; None without one."""
    try:
        value = store.read_run().get("initial_hash")
    except StoreError:
        return None
    return value if isinstance(value, str) else None


def train_site(recipe: Recipe, store: RunStore, place: WorkerPlace,
               should_stop: Callable[[], bool] = lambda: False, beat_every_s: float = 1.0,
               drain_requested: Callable[[], bool] = lambda: False) -> dict:
    """Train until the recipe's last round is merged and committed; return a summary.

    Losses are read (and a non-finite one raises FloatingPointError) about once
    per `beat_every_s`, and always before a round is published.
    `drain_requested` (asked on rank 0, see Agreement) means the site is about
    to go away (a preemption notice): publish the round's progress so far as an
    early contribution and leave, instead of losing it."""
    t, sync = recipe.train, recipe.sync
    torch.set_num_threads(t.threads)
    torch.set_flush_denormal(True)
    device = P.prepare_device(place.device)
    precision = P.resolve(t.precision, device)
    train_files, eval_files = files_for(recipe)
    mine = D.shard(D.shard(train_files, place.site_index, place.n_sites), place.rank, place.world)
    data = D.load_bytes(mine)

    model = build(model_config(recipe), seed=t.seed).to(device)
    forward = torch.compile(model) if t.compile else model  # DiLoCo sees the plain module
    inner = build_optimizer(model, t)
    scaler = P.grad_scaler(precision, device)
    exchange = make_exchange(recipe, store, place.site) if place.rank == 0 else None
    state = {"eval_loss": None, "eval_model": None, "eval_set": None,
             "stream": P.side_stream(device)}

    def on_commit(r: int, params: dict) -> dict:
        # Whoever commits a round evaluates it, on its own copy of the model
        # (this runs in the exchange thread, beside training; on a stream of its own).
        with torch.cuda.stream(state["stream"]):
            if state["eval_model"] is None:
                need = t.eval_batches * t.batch_size * (t.seq_len + 1) * EVAL_BYTES_PER_BATCH
                batches = D.eval_batches(D.load_bytes(eval_files, max_bytes=need),
                                         t.batch_size, t.seq_len, t.eval_batches)
                state["eval_set"] = [(P.to_device(x, device), P.to_device(y, device))
                                     for x, y in batches]
                state["eval_model"] = build(model_config(recipe), seed=t.seed).to(device)
            load_params(state["eval_model"], params)
            loss = evaluate(state["eval_model"], state["eval_set"], precision)
        state["eval_loss"] = loss
        store.event(place.site, "round", f"round {r} committed, eval loss {loss:.4f}",
                    round=r, eval_loss=loss)
        return {"eval_loss": loss}

    diloco = DiLoCo(model, inner, exchange, None if sync.round_seconds else t.inner_steps,
                    round_seconds=sync.round_seconds, outer_lr=OuterLR.of(sync, t.rounds),
                    outer_momentum=sync.outer_momentum, nesterov=sync.nesterov,
                    overlap=sync.overlap, on_commit=on_commit, should_stop=should_stop,
                    offload=None if sync.offload == "auto" else sync.offload,
                    fragments=sync.fragments, liveness=False)  # the site agent beats
    total_steps = t.rounds * t.inner_steps
    tokens_per_step = t.batch_size * t.seq_len * place.world
    meter, drain = Meter(device, tokens_per_step), Agreement(place, drain_requested)
    first_step_at, last_beat, steps_done = None, 0.0, 0

    def beat(status: str) -> None:
        if place.rank == 0:
            store.beat(place.site, {"state": status, "round": diloco.round,
                                    "training_round": diloco.training_round, "step": steps_done,
                                    "loss": meter.loss, "tokens_per_s": meter.tokens_per_s,
                                    "bytes_sent": diloco.bytes_sent,
                                    "bytes_received": diloco.bytes_received,
                                    "wait_s": diloco.wait_s, "first_step_at": first_step_at,
                                    "eval_loss": state["eval_loss"]})

    with diloco:
        beat("training")
        # The last round is the recipe's, or earlier if the run was asked to finish.
        while diloco.training_round <= (last := _last_round(place, exchange, t.rounds)) \
                and not should_stop():
            r = diloco.training_round
            # Reseeded per round, so a site that resumes at round r reads the
            # same stream it would have read without the interruption.
            batches = D.Batches(data, t.batch_size, t.seq_len,
                                seed=hash_seed(t.seed, place.site_index, place.rank, r))
            t_round, k = time.monotonic(), 0
            meter.restart_clock()
            while diloco.training_round == r:
                if sync.round_seconds:
                    progress = min(1.0, (time.monotonic() - t_round) / sync.round_seconds)
                    position = int((r - 1 + progress) * t.inner_steps)
                else:
                    position = (r - 1) * t.inner_steps + k
                apply_lr_schedule(inner, position, t, total_steps)
                x, y = batches.next()
                meter.add(inner_step(model, forward, inner, scaler, precision, P.to_device(x, device),
                                     P.to_device(y, device), t.grad_clip, place.world))
                k += 1
                steps_done += 1
                # Read before the round may be published (by DiLoCo's rule for its end), on
                # the first step, and when a beat is due.
                round_ends = (time.monotonic() - t_round >= sync.round_seconds
                              if sync.round_seconds else k >= t.inner_steps)
                beat_due = time.monotonic() - last_beat > beat_every_s
                if (round_ends or beat_due or first_step_at is None) and not meter.read():
                    raise FloatingPointError(f"{place.site}: non-finite loss by step {position}")
                if first_step_at is None:
                    first_step_at = time.time()
                    beat("training")
                if beat_due:
                    beat("training")
                    last_beat = time.monotonic()
                diloco.step(tokens_per_step)
                if diloco.training_round != r:
                    meter.restart_clock()
                elif drain(steps_done):
                    diloco.end_round(publish_only=True)  # what we can: this round so far
                    beat("drained")
                    return {"site": place.site, "rank": place.rank, "round": diloco.round,
                            "bytes_sent": diloco.bytes_sent, "bytes_received": diloco.bytes_received,
                            "drained": True, "first_step_at": first_step_at}
        beat("syncing")
        if not should_stop():
            diloco.finish()
    beat("done" if diloco.round >= last else "stopped")
    return {"site": place.site, "rank": place.rank, "round": diloco.round,
            "bytes_sent": diloco.bytes_sent, "bytes_received": diloco.bytes_received,
            "wait_s": diloco.wait_s, "hashes": {h.round: h.hash for h in diloco.history},
            "first_step_at": first_step_at, "eval_loss": state["eval_loss"]}


def _last_round(place: WorkerPlace, exchange: RoundExchange | None, rounds: int) -> int:
    """The run's last round as rank 0 reads it from the store, the same on every rank."""
    (value,) = _broadcast([exchange.last_round() if exchange is not None else rounds], place)
    return value


def _broadcast(values: list[int], place: WorkerPlace) -> list[int]:
    """Rank 0's `values` on every rank of the site. The tensor sits on the worker's
    device, which every backend takes (NCCL only GPU tensors)."""
    if place.world == 1:
        return values
    t = torch.tensor(values, device=place.device)
    dist.broadcast(t, 0)
    return t.tolist()


def hash_seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h
