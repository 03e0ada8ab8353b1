"""Your own training code on geotrain's sites: `train.entrypoint: "module:function"`.

Every worker of every site calls `function(ctx)` with a `SiteContext`. The
function builds its model on `ctx.device` (a GPU of its own, or the CPU) and
its inner optimizer (its own, or `ctx.optimizer(model)`: the one the recipe's
`train.optimizer` names), wraps them with `ctx.diloco(model, optimizer)` and
trains in its own loop; geotrain handles the rounds through the run store,
liveness, stop commands and the final model:

    def train(ctx: SiteContext) -> dict:
        torch.manual_seed(ctx.recipe.train.seed)          # same init everywhere
        model = MyModel().to(ctx.device)
        opt = ctx.optimizer(model)                        # or torch.optim.AdamW(...)
        with ctx.diloco(model, opt, evaluate=lambda m: my_eval(m)) as diloco:
            while not ctx.done(diloco):
                ctx.set_lr(opt, step)                     # the recipe's warmup + cosine
                x, y = (t.to(ctx.device) for t in next(batches))
                with ctx.autocast():                      # the recipe's train.precision
                    loss = model(x, y)
                ctx.scaler.scale(loss).backward()         # scales for fp16 only
                ctx.scaler.step(opt); ctx.scaler.update(); opt.zero_grad()
                diloco.step(tokens=batch_tokens)
                ctx.beat(diloco, loss=loss)               # a tensor is read only when written
            diloco.finish()
        return {"round": diloco.round}

With several workers in a site (`ctx.world > 1`) all-reduce the gradients over
`ctx.group` before `opt.step()`; DiLoCo shares the parameters at round ends.

Round 0 is your model's initial state, committed by whichever site gets there
first (a conditional create decides); the others start from it.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from geotrain.recipe import Recipe
from geotrain.store import RunStore
from geotrain.sync.diloco import DiLoCo, encode, load_params, model_params, params_hash
from geotrain.sync.schedule import OuterLR
from geotrain.train import precision as P
from geotrain.train.model import apply_lr_schedule, build_optimizer


@dataclass
class SiteContext:
    recipe: Recipe
    store: RunStore
    site: str
    site_index: int  # this site's place among the recipe's sites (for sharding data)
    n_sites: int
    rank: int        # this worker inside the site (torch.distributed is set up when world > 1)
    world: int
    device: str = "cpu"  # the torch device to put your model and batches on
    should_stop: Callable[[], bool] = lambda: False
    _first_step_at: float | None = field(default=None, repr=False)
    _last_round: tuple[int, int] = field(default=(-1, 0), repr=False)  # (read at round, last round)
    _scaler: torch.amp.GradScaler | None = field(default=None, repr=False)

    @property
    def group(self) -> torch.distributed.ProcessGroup | None:
        """The site's process group (its workers' gradient all-reduce), or None
        for a worker alone in its site."""
        if self.world > 1 and torch.distributed.is_initialized():
            return torch.distributed.group.WORLD
        return None

    @property
    def precision(self) -> str:
        """The recipe's `train.precision` on this worker's device: 'bf16', 'fp16' or 'fp32'."""
        return P.resolve(self.recipe.train.precision, self.device)

    def autocast(self):
        """The context for your forward pass and loss: torch.autocast in the
        recipe's precision on `device`, or nothing at all for fp32."""
        return P.autocast(self.precision, self.device)

    @property
    def scaler(self) -> torch.amp.GradScaler:
        """The loss scaler for the recipe's precision: active for fp16, passing
        everything straight through otherwise (`scaler.step(opt)` is `opt.step()`).
        The same one on every call."""
        if self._scaler is None:
            self._scaler = P.grad_scaler(self.precision, self.device)
        return self._scaler

    def optimizer(self, model: torch.nn.Module,
                  adamw_params: Iterable[torch.nn.Parameter] = ()) -> torch.optim.Optimizer:
        """The inner optimizer the recipe's train section asks for, over `model`'s
        parameters: AdamW, or (`train.optimizer: muon`) Muon for the hidden
        matrices and AdamW for the rest. Muon leaves embeddings and an output layer
        named head / lm_head / output / classifier to AdamW by itself; list any
        other parameter it should leave in `adamw_params` (geotrain/train/muon.py)."""
        return build_optimizer(model, self.recipe.train, adamw_params)

    def set_lr(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set each group's lr for inner step `step` (counted from 0 over the whole
        run) by the recipe's warmup and cosine schedule, peaking at the group's
        `base_lr` (its lr when first called, for an optimizer of your own)."""
        t = self.recipe.train
        apply_lr_schedule(optimizer, step, t, t.rounds * t.inner_steps)

    def diloco(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               evaluate: Callable[[torch.nn.Module], float] | None = None, **overrides) -> DiLoCo:
        """A DiLoCo configured from the recipe's train/sync sections around your model.
        `evaluate(model) -> loss` is run on the committed global state each round; the
        outer lr follows the recipe's `sync.outer_lr_schedule` over `train.rounds`."""
        from geotrain.train.trainer import make_exchange

        # Your loop counts its own tokens (diloco.step(tokens=...)), so only the
        # roster and the absolute token bound apply, not batch_size x seq_len.
        exchange = (make_exchange(self.recipe, self.store, self.site, tokens_per_step_known=False)
                    if self.rank == 0 else None)
        if self.rank == 0:
            self._commit_round_zero(model)
        eval_model, stream = None, P.side_stream(self.device)

        def on_commit(r: int, params: dict) -> dict:
            # In the exchange thread, beside training: on a GPU, on a stream of its own.
            nonlocal eval_model
            if evaluate is None:
                return {}
            with torch.cuda.stream(stream):
                if eval_model is None:
                    import copy
                    eval_model = copy.deepcopy(model)
                load_params(eval_model, params)
                loss = float(evaluate(eval_model))
            self.store.event(self.site, "round", f"round {r} committed, eval loss {loss:.4f}",
                             round=r, eval_loss=loss)
            return {"eval_loss": loss}

        s, t = self.recipe.sync, self.recipe.train
        kwargs = dict(round_seconds=s.round_seconds, outer_lr=OuterLR.of(s, t.rounds),
                      outer_momentum=s.outer_momentum, nesterov=s.nesterov, overlap=s.overlap,
                      on_commit=on_commit, should_stop=self.should_stop, liveness=False,
                      offload=None if s.offload == "auto" else s.offload, fragments=s.fragments)
        kwargs.update(overrides)
        return DiLoCo(model, optimizer, exchange, None if s.round_seconds else t.inner_steps, **kwargs)

    def _commit_round_zero(self, model: torch.nn.Module) -> None:
        if self.store.is_committed(0):
            return
        if self.store.claim_round_zero(self.site):
            params = model_params(model)
            self.store.commit_global(0, {"model.safetensors": encode(params)},
                                     {"hash": params_hash(params), "members": []})
            return
        deadline = time.monotonic() + 120
        while not self.store.is_committed(0):
            if time.monotonic() > deadline:
                raise TimeoutError("round 0 was claimed by another site but never committed")
            time.sleep(0.1)

    def done(self, diloco: DiLoCo) -> bool:
        """True once every round of the run has been trained (or a stop came). The
        last round is the recipe's, or earlier once the run is asked to finish; it
        is read from the store once per round, by rank 0, and shared."""
        if diloco.training_round != self._last_round[0]:
            last = torch.tensor([diloco.exchange.last_round() if diloco.exchange is not None
                                 else self.recipe.train.rounds], device=self.device)
            if self.world > 1 and torch.distributed.is_initialized():
                torch.distributed.broadcast(last, 0)
            self._last_round = (diloco.training_round, int(last.item()))
        return diloco.training_round > self._last_round[1] or self.should_stop()

    def beat(self, diloco: DiLoCo, loss: float | torch.Tensor | None = None, **extra) -> None:
        """Report progress (rank 0 only; cheap to call every step, written at most
        once a second). A loss tensor is read (waiting for the device) only when written."""
        if self.rank != 0:
            return
        now = time.time()
        if self._first_step_at is None:
            self._first_step_at = now
        elif now - getattr(self, "_last_beat", 0) < 1.0:
            return
        self._last_beat = now
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().item()
        self.store.beat(self.site, {"state": "training", "round": diloco.round,
                                    "training_round": diloco.training_round, "loss": loss,
                                    "bytes_sent": diloco.bytes_sent,
                                    "bytes_received": diloco.bytes_received,
                                    "first_step_at": self._first_step_at, **extra})


def load_entrypoint(spec: str) -> Callable[[SiteContext], dict]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def run_entrypoint(ctx: SiteContext) -> dict:
    P.prepare_device(ctx.device)
    torch.manual_seed(ctx.recipe.train.seed)
    result = load_entrypoint(ctx.recipe.train.entrypoint)(ctx) or {}
    if ctx.rank == 0:
        ctx.store.beat(ctx.site, {"state": "done", "first_step_at": ctx._first_step_at})
    return {"site": ctx.site, "rank": ctx.rank, "round": result.get("round"),
            "bytes_sent": result.get("bytes_sent", 0), "bytes_received": result.get("bytes_received", 0),
            **result}
