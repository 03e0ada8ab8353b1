"""The built-in trainer: one site's share of a geotrain run.

`train_site()` is what each worker of a site runs (inside a Ray actor, see
geotrain/site/worker.py): build the byte-level GPT, load this worker's
disjoint data shard, and run inner steps (AdamW, or Muon with `train.optimizer:
muon`) wrapped in `DiLoCo`, which meets the other sites through the run store
every `inner_steps` steps. Rank 0 of the site writes heartbeats and talks to
the store; whichever site commits a round evaluates that global model on
held-out data.
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
from geotrain.train import data as D
from geotrain.train.model import GPT, apply_lr_schedule, build, build_optimizer, config_for

EVAL_BYTES_PER_BATCH = 4


@dataclass(frozen=True)
class WorkerPlace:
    """Where a worker sits: which site (of all the run's sites) and which rank
    inside that site."""

    site: str
    site_index: int
    n_sites: int
    rank: int
    world: int


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
def evaluate(model: GPT, batches: list) -> float:
    model.eval()
    losses = [model(x, y)[1].item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def _all_reduce_grads(model: torch.nn.Module, world: int) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


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
                      * x.workers * x.nodes for x in recipe.sites}
    return RoundExchange(store, site, codec=codec, window_s=s.round_timeout_s,
                         join_wait_s=s.join_wait_s, liveness_s=s.liveness_timeout_s,
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

    `drain_requested` (checked on rank 0 once per step) means the site is about
    to go away (a preemption notice): publish the round's progress so far as an
    early contribution and leave, instead of losing it."""
    t, sync = recipe.train, recipe.sync
    torch.set_num_threads(t.threads)
    torch.set_flush_denormal(True)
    train_files, eval_files = files_for(recipe)
    mine = D.shard(D.shard(train_files, place.site_index, place.n_sites), place.rank, place.world)
    data = D.load_bytes(mine)

    model = build(model_config(recipe), seed=t.seed)
    inner = build_optimizer(model, t)
    exchange = make_exchange(recipe, store, place.site) if place.rank == 0 else None
    state = {"eval_loss": None, "eval_model": None, "eval_set": None}

    def on_commit(r: int, params: dict) -> dict:
        # Whoever commits a round evaluates it, on its own copy of the model
        # (this runs in the exchange thread, beside training).
        if state["eval_model"] is None:
            need = t.eval_batches * t.batch_size * (t.seq_len + 1) * EVAL_BYTES_PER_BATCH
            state["eval_set"] = D.eval_batches(D.load_bytes(eval_files, max_bytes=need),
                                               t.batch_size, t.seq_len, t.eval_batches)
            state["eval_model"] = build(model_config(recipe), seed=t.seed)
        load_params(state["eval_model"], params)
        loss = evaluate(state["eval_model"], state["eval_set"])
        state["eval_loss"] = loss
        store.event(place.site, "round", f"round {r} committed, eval loss {loss:.4f}",
                    round=r, eval_loss=loss)
        return {"eval_loss": loss}

    diloco = DiLoCo(model, inner, exchange, None if sync.round_seconds else t.inner_steps,
                    round_seconds=sync.round_seconds, outer_lr=sync.outer_lr,
                    outer_momentum=sync.outer_momentum, nesterov=sync.nesterov,
                    overlap=sync.overlap, on_commit=on_commit, should_stop=should_stop,
                    liveness=False)  # the site agent beats
    total_steps = t.rounds * t.inner_steps
    tokens_per_step = t.batch_size * t.seq_len * place.world
    first_step_at, last_beat, loss_ema, tok_s, steps_done = None, 0.0, None, 0.0, 0

    def beat(status: str) -> None:
        if place.rank == 0:
            store.beat(place.site, {"state": status, "round": diloco.round,
                                    "training_round": diloco.training_round, "step": steps_done,
                                    "loss": loss_ema, "tokens_per_s": tok_s,
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
            while diloco.training_round == r:
                if sync.round_seconds:
                    progress = min(1.0, (time.monotonic() - t_round) / sync.round_seconds)
                    position = int((r - 1 + progress) * t.inner_steps)
                else:
                    position = (r - 1) * t.inner_steps + k
                apply_lr_schedule(inner, position, t, total_steps)
                t0 = time.perf_counter()
                x, y = batches.next()
                _, loss = model(x, y)
                loss.backward()
                if place.world > 1:
                    _all_reduce_grads(model, place.world)
                if t.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                inner.step()
                inner.zero_grad(set_to_none=True)
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"{place.site}: non-finite loss at step {position}")
                loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
                rate = tokens_per_step / max(time.perf_counter() - t0, 1e-9)
                tok_s = rate if not tok_s else 0.9 * tok_s + 0.1 * rate
                k += 1
                steps_done += 1
                if first_step_at is None:
                    first_step_at = time.time()
                    beat("training")
                if time.monotonic() - last_beat > beat_every_s:
                    beat("training")
                    last_beat = time.monotonic()
                diloco.step(tokens_per_step)
                if diloco.training_round == r and _agree(place, drain_requested):
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
    value = torch.tensor([exchange.last_round() if exchange is not None else rounds])
    if place.world > 1:
        dist.broadcast(value, 0)
    return int(value.item())


def _agree(place: WorkerPlace, ask: Callable[[], bool]) -> bool:
    """Rank 0's answer, the same on every rank of the site."""
    flag = torch.tensor([int(ask()) if place.rank == 0 else 0])
    if place.world > 1:
        dist.broadcast(flag, 0)
    return bool(flag.item())


def hash_seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h
