"""DiLoCo across sites, through the run store — around any model and optimizer.

Each site runs inner optimizer steps on its own data; at the end of a round
(H steps, or `round_seconds` of wall time) it publishes its pseudo-gradient —
its progress since the round began — encoded by its codec. The round's
accepted contributions are averaged, weighted by tokens trained, and the outer
optimizer (SGD with Nesterov momentum) moves the global parameters. Every site
does the same float operations in the same order on the same decoded inputs,
on the CPU in fp32, so every site holds bit-identical global parameters after
every round (each records their hash in `rounds/r/results/`).

With `overlap=True` the round's exchange (upload, waiting for the others,
download, outer step) runs in a background thread while the site trains the
next round; the merged update is applied one round late, keeping the local
progress made meanwhile: on landing, the site adds `global_r - anchor_r` to
its parameters, where anchor_r is what it had when it published round r.
Compute waits only when an exchange takes longer than a whole round. With
`overlap=False` (or an instant exchange and zero delay) this is plain DiLoCo.

With `fragments=P` > 1 (Streaming DiLoCo) round r publishes and merges only
fragment (r - 1) % P of the model (geotrain/sync/fragments.py); the other
tensors keep their round-start snapshot, so their progress is sent on their own
turn, and a landing merge shifts them only by how far the global state moved.

On a GPU the pseudo-gradient is computed and encoded there; with `offload`
(the default on a GPU) the site's copies of the model and the codec's residual
live in pinned host memory instead (geotrain/sync/offload.py).

In a user's own loop:

    exchange = RoundExchange(RunStore(url), site="a")
    with DiLoCo(model, inner_opt, exchange, inner_steps=50) as diloco:
        for x, y in data:
            loss = model(x, y); loss.backward(); inner_opt.step(); inner_opt.zero_grad()
            diloco.step(tokens=x.numel())
            if diloco.done(rounds=100): break
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from geotrain.errors import StoreError
from geotrain.sync.fragments import Fragments
from geotrain.sync.commits import Commits
from geotrain.sync.joining import state_problem, states_newest_first
from geotrain.sync.offload import ModelCopies, on_cuda
from geotrain.sync.outer import outer_step, weighted_mean
from geotrain.sync.rounds import ContributionChanged, RoundExchange, SyncError
from geotrain.sync.state import decode, encode, load_params, model_params, params_hash

Tensors = dict[str, torch.Tensor]

__all__ = ["DiLoCo", "RoundExchange", "RoundResult", "SyncError", "decode", "encode",
           "load_params", "model_params", "outer_step", "params_hash", "weighted_mean"]


@dataclass
class RoundResult:
    round: int
    hash: str
    bytes_sent: int
    bytes_received: int
    wait_s: float  # how long compute waited for this round's merge
    members: list[str]
    rejected: list[str] = field(default_factory=list)


@dataclass
class _Merged:
    round: int
    params: Tensors
    momentum: Tensors
    hash: str
    members: list[str]
    rejected: list[str]
    received: int


class DiLoCo:
    """Wraps a model and its inner optimizer; call `step(tokens)` after each
    inner step. With torch.distributed initialised (several workers in one
    site, gradients all-reduced inside it) rank 0 alone talks to the store and
    broadcasts parameters to the others at round boundaries. `outer_lr` is a
    number, or the lr of round r as a function of r (geotrain/sync/schedule.py).
    `fragments`: how many parts of the model take turns, one per round (module
    docstring); ValueError if the model has fewer tensors."""

    def __init__(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer,
                 exchange: RoundExchange | None, inner_steps: int | None = 50, *,
                 round_seconds: float | None = None,
                 outer_lr: float | Callable[[int], float] = 0.7,
                 outer_momentum: float = 0.9, nesterov: bool = True, overlap: bool | int = False,
                 on_commit: Callable[[int, Tensors], dict] | None = None,
                 should_stop: Callable[[], bool] = lambda: False, liveness: bool = True,
                 offload: bool | None = None, fragments: int = 1):
        if not inner_steps and not round_seconds:
            raise ValueError("DiLoCo needs inner_steps or round_seconds to end a round")
        self.model, self.inner_optimizer, self.exchange = model, inner_optimizer, exchange
        self.inner_steps, self.round_seconds = inner_steps, round_seconds
        self.outer_lr, self.outer_momentum, self.nesterov = outer_lr, outer_momentum, nesterov
        # Rounds a merge may land late: 0 is plain DiLoCo, 1 overlaps one round.
        self.delay = int(overlap)
        self.on_commit, self.should_stop = on_commit, should_stop
        # Beat sites/<site>/alive from a thread (a geotrain site agent does it
        # itself; a user's own script gets it here).
        self.liveness = liveness
        # Where the copies of the model and the codec residual live; None: on
        # when the model is on a GPU (geotrain/sync/offload.py).
        self.offload = on_cuda(model) if offload is None else bool(offload)
        self._copies = ModelCopies(model, self.offload)
        self.fragments = Fragments.of_model(model, fragments)
        if exchange is not None:
            exchange.codec.offload = self.offload
        self._closing = threading.Event()
        self.round = 0            # the newest global round applied to the model
        self.training_round = 1   # the round the current inner steps will be published to
        self.global_params: Tensors = {}
        self.momentum: Tensors = {}
        self.bytes_sent = self.bytes_received = 0
        self.wait_s = 0.0
        self.history: list[RoundResult] = []
        self._steps = self._tokens = 0
        self._round_t0 = time.monotonic()
        self._start: Tensors = {}           # params when this round began (rank 0)
        self._anchors: dict[int, Tensors] = {}  # params when we published round r
        self._sent: dict[int, int] = {}
        self._todo: queue.Queue = queue.Queue()
        self._merged: dict[int, _Merged | BaseException] = {}
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._queued = 0  # highest round handed to the merger
        # With overlap the merger also uploads our contributions: the newest round
        # whose upload was queued, and the newest one uploaded (under _cv).
        self._upload_queued = self._uploaded = 0
        # Merged rounds are committed in a thread of their own (geotrain/sync/commits.py).
        self._commits = Commits(exchange, on_commit, should_stop, self._notify) \
            if exchange is not None else None

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> DiLoCo:
        if self.rank == 0:
            # Contributions must decode to exactly this model's tensors (names,
            # shapes; fp32 as every codec decodes), checked before any merge.
            self.exchange.expect({n: (tuple(p.shape), torch.float32)
                                  for n, p in self.model.named_parameters()}, self.fragments)
            self._catch_up()
            self._thread = threading.Thread(target=self._merger, name="diloco-merger", daemon=True)
            self._thread.start()
            self._commits.start()
            if self.liveness:
                threading.Thread(target=self._beat, name="diloco-liveness", daemon=True).start()
        self._broadcast_round()
        if self.rank == 0:
            load_params(self.model, self.global_params)
        self._broadcast_model()
        if self.rank == 0:
            self._start = self._copies.of_model()
        self._round_t0 = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        if self._commits is not None:
            self._commits.close()
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        store, site = self.exchange.store, self.exchange.site
        while True:
            try:
                store.alive(site, "training", training_round=self.training_round, pid=None)
            except Exception:  # noqa: BLE001 - a missed beat must not stop training
                pass
            if self._closing.wait(1.0):
                store.alive(site, "done", training_round=self.training_round)
                return

    def _catch_up(self) -> None:
        """Start from the newest committed global state, then apply every round
        decided since (committed with only its hash, or not yet committed) so we
        join at the first open round."""
        store = self.exchange.store
        for r in states_newest_first(store):
            try:
                files, manifest = store.read_global(r)
                params = decode(files["model.safetensors"])
                momentum = decode(files["outer.safetensors"]) if "outer.safetensors" in files else {}
                why = state_problem(store, r, params_hash(params), manifest, self.exchange.is_member,
                                    self.exchange.initial_hash)
            except (StoreError, KeyError, ValueError, RuntimeError) as e:  # unreadable: as bad
                why = f"unreadable ({str(e)[:200]})"
            if why is None:
                break
            store.event(self.exchange.site, "rejected-state", f"did not start from round {r}'s "
                        f"committed state: {why}; trying an older one", round=r, reason=why)
        else:
            raise SyncError("no committed global state in the store to start from")
        self.round, self.global_params, self.momentum = r, params, momentum
        while (decision := store.members(self.round + 1)) is not None:
            # A round this member decided (its last incarnation, replaced before it
            # committed) is this site's to commit: while the member beats again, no
            # other site takes it over before TAKEOVER_LIVE_S.
            merged = self._merge(self.round + 1, decision,
                                 decided_by_me=decision.get("decided_by") == self.exchange.site)
            self.round, self.global_params, self.momentum = merged.round, merged.params, merged.momentum
        self.training_round = self.round + 1
        self.exchange.joined_round = self.training_round
        self._queued = self.round

    def done(self, rounds: int) -> bool:
        """True once round `rounds` has been published and its merge applied."""
        return self.round >= rounds

    # -- the inner loop's hook -----------------------------------------------------------

    def step(self, tokens: int) -> RoundResult | None:
        """Count one inner step of `tokens` site-wide tokens; at a round's end,
        publish and apply whatever merges are due. Returns the newest result applied."""
        self._steps += 1
        self._tokens += tokens
        if not self._round_over():
            return None
        return self.end_round()

    def _round_over(self) -> bool:
        if self.round_seconds is None:
            return self._steps >= self.inner_steps
        over = torch.tensor([int(time.monotonic() - self._round_t0 >= self.round_seconds
                                 or bool(self.inner_steps and self._steps >= self.inner_steps))])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(over, 0)  # rank 0's clock decides for the whole site
        return bool(over.item())

    def end_round(self, final: bool = False, publish_only: bool = False) -> RoundResult | None:
        """Publish this round's progress; apply merges that are due (all of them
        when `final`, or without overlap). With `publish_only` (a site leaving
        for good) publish and return at once."""
        result = None
        if publish_only:
            if self.rank == 0 and self._steps:
                r = self.exchange.first_open_round(self.training_round)
                delta = self._copies.delta(self._start, self._part(r))
                self.bytes_sent += self.exchange.publish(r, delta, self._tokens, self._steps, self.round)
            return None
        if self.rank == 0:
            local = self._copies.of_model()
            r = self.exchange.first_open_round(self.training_round)
            # A store migration switches every site at the same round boundary; an
            # upload queued for the store we are leaving goes there first.
            self._wait_uploads_if_switching()
            if self.exchange.store.follow_switch(before_round=r, wait=True,
                                                 should_stop=self.should_stop):
                r = self.exchange.first_open_round(self.training_round)
            delta = self._copies.delta(self._start, self._part(r))   # == start - local
            upload = None
            if self.delay:
                # Overlapped: encode here (the codec's residual goes round by round),
                # upload in the background, so a thin link's upload does not stop
                # training either.
                payload = self.exchange.codec.encode(delta)
                self._sent[r] = len(payload)
                upload = (payload, self._tokens, self._steps, self.round)
                self._upload_queued = r
            else:
                self._sent[r] = self.exchange.publish(r, delta, self._tokens, self._steps,
                                                      self.round)
            del delta
            self.bytes_sent += self._sent[r]
            self._anchors[r] = local
            # Only the tensors just sent start over; the others keep accumulating.
            self._start = self._copies.copy(local, into=self._start, names=self._part(r))
            self.training_round = r + 1
            with self._cv:
                self._queued = r
            self._todo.put((r, upload))
            result = self._apply_until(r if final else r - self.delay, just_published=r)
        self._steps = self._tokens = 0
        self._broadcast_round()
        self._broadcast_model()
        self._round_t0 = time.monotonic()
        return result

    def finish(self) -> RoundResult | None:
        """Wait for every published round's merge and apply it (end of training)."""
        result = None
        if self.rank == 0:
            result = self._apply_until(self.training_round - 1)
            self.settle_commits(wait=True)
        self._broadcast_round()
        self._broadcast_model()
        return result

    def _apply_until(self, due: int, just_published: int | None = None) -> RoundResult | None:
        result = None
        while self.round < due:
            t0 = time.monotonic()
            merged = self._wait_merged(self.round + 1)
            waited = time.monotonic() - t0
            self.wait_s += waited
            anchor = self._anchors.pop(merged.round, None)
            # The tensors we published in this round (none if we were not in it).
            sent = frozenset() if anchor is None else self.fragments.names(merged.round)
            # Nothing trained since we published them: take their global state exactly.
            exact = sent if merged.round == just_published else frozenset()
            # The others keep the progress made since: shift them by global - anchor
            # for what we sent, else by how far the global moved (0 if it did not).
            correction = {}
            for n in merged.params:
                if n not in exact:
                    base = anchor if n in sent else self.global_params
                    correction[n] = merged.params[n].to(base[n].device) - base[n]
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if n in exact:
                        p.copy_(merged.params[n].to(p.device, p.dtype))
                    else:
                        p.add_(correction[n].to(p.device, p.dtype))
            if exact:
                self._start = self._copies.copy(merged.params, into=self._start,
                                                names=self._part(merged.round))
            for t in [self._start, *self._anchors.values()]:
                for n in t:
                    if n in correction:
                        t[n].add_(correction[n].to(t[n].device))
            if anchor is not None:
                self._copies.release(anchor)
            self.round, self.global_params, self.momentum = merged.round, merged.params, merged.momentum
            self.bytes_received += merged.received
            result = RoundResult(merged.round, merged.hash, self._sent.pop(merged.round, 0),
                                 merged.received, waited, merged.members, merged.rejected)
            self.history.append(result)
        return result

    def _part(self, r: int) -> frozenset[str] | None:
        """The tensors round r syncs; None: all of them (no fragments)."""
        return None if self.fragments.count == 1 else self.fragments.names(r)

    def _wait_uploads_if_switching(self) -> None:
        """Before following a store switch, let queued uploads reach the store they
        were meant for (only asks the store when one is still queued)."""
        with self._cv:
            if self._uploaded >= self._upload_queued:
                return
        if self.exchange.store.switch_request() is None:
            return
        with self._cv:
            while self._uploaded < self._upload_queued:
                if self.should_stop() or (self._thread and not self._thread.is_alive()):
                    return
                self._cv.wait(timeout=0.2)

    def _wait_merged(self, r: int) -> _Merged:
        with self._cv:
            while r not in self._merged:
                self._commits.check()
                if self.should_stop():
                    raise SyncError(f"round {r}: stopped while waiting for the merge")
                self._cv.wait(timeout=0.2)
            out = self._merged.pop(r)
        if isinstance(out, BaseException):
            raise out
        return out

    # -- the exchange, in the background -------------------------------------------------

    def _merger(self) -> None:
        """Resolve rounds in order, up to the newest one we published."""
        g_round, params, momentum = self.round, self.global_params, self.momentum
        while True:
            item = self._todo.get()
            if item is None:
                return
            target, upload = item
            try:
                if upload is not None:
                    self.exchange.upload(target, *upload)
                    with self._cv:
                        self._uploaded = target
                        self._cv.notify_all()
                while g_round < target:
                    decision, won = self.exchange.decide(g_round + 1, self.should_stop,
                                                         tick=self._commits.wake)
                    merged = self._merge(g_round + 1, decision, won, params, momentum)
                    g_round, params, momentum = merged.round, merged.params, merged.momentum
                    with self._cv:
                        self._merged[merged.round] = merged
                        self._cv.notify_all()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                with self._cv:
                    self._merged[g_round + 1] = e
                    self._cv.notify_all()
                return

    def _merge(self, r: int, decision: dict, decided_by_me: bool,
               params: Tensors | None = None, momentum: Tensors | None = None) -> _Merged:
        """Apply round r's decision to (params, momentum): a new global state."""
        params = {n: t.clone() for n, t in (params if params is not None else self.global_params).items()}
        momentum = {n: t.clone() for n, t in (momentum if momentum is not None else self.momentum).items()}
        try:
            parts, received = self.exchange.gather(decision)
        except ContributionChanged as e:
            return self._take_committed(r, decision, e)
        if parts:
            grad = weighted_mean([(f"{e.round:09d}/{e.site}", d, e.tokens) for e, d in parts])
            lr = self.outer_lr(r) if callable(self.outer_lr) else self.outer_lr
            outer_step(params, grad, momentum, lr, self.outer_momentum, self.nesterov)
        digest = params_hash(params)
        store, site = self.exchange.store, self.exchange.site
        store.put_result(r, site, {"hash": digest})
        self._commits.add(r, params, momentum, digest, decision, decided_by_me)
        members = [f"{e.site}@{e.round}" if e.round != r else e.site for e, _ in parts]
        rejected = [f"{e['site']}@{e['round']}" for e in decision.get("rejected", [])]
        return _Merged(r, params, momentum, digest, members, rejected, received)

    def _take_committed(self, r: int, decision: dict, why: ContributionChanged) -> _Merged:
        """Round r's accepted bytes are gone from the store (changed after its
        decision), so this site cannot merge the round itself: it takes the global
        state from the round's commit, made by a site that merged what it had read
        and checked, so every site still ends the round on the same bits."""
        store, site = self.exchange.store, self.exchange.site
        store.event(site, "contribution-changed", f"{why}; taking round {r} from its commit", round=r)
        deadline = time.monotonic() + self.exchange.window_s
        while not store.is_committed(r):
            if self.should_stop() or time.monotonic() > deadline:
                raise SyncError(f"{why}, and no site that merged round {r} committed it")
            time.sleep(0.2)
        files, _ = store.read_global(r)
        if "model.safetensors" not in files:
            raise SyncError(f"{why}, and round {r}'s commit holds no state to take")
        params = decode(files["model.safetensors"])
        momentum = decode(files["outer.safetensors"]) if "outer.safetensors" in files else {}
        digest = params_hash(params)
        store.put_result(r, site, {"hash": digest})
        accepted = sorted(decision["accepted"], key=lambda e: (e["round"], e["site"]))
        members = [e["site"] if e["round"] == r else f"{e['site']}@{e['round']}" for e in accepted]
        rejected = [f"{e['site']}@{e['round']}" for e in decision.get("rejected", [])]
        return _Merged(r, params, momentum, digest, members, rejected, sum(map(len, files.values())))

    def _notify(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def settle_commits(self, wait: bool = False) -> None:
        """Commit the rounds we merged whose decider has not committed them (after
        the takeover delay), so committed rounds never have a gap. With `wait`,
        block until every round we merged is committed by someone."""
        self._commits.settle(wait)

    # -- inside a site -------------------------------------------------------------------

    def _broadcast_round(self) -> None:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        r = torch.tensor([self.round, self.training_round])
        dist.broadcast(r, 0)
        self.round, self.training_round = int(r[0]), int(r[1])

    def _broadcast_model(self) -> None:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        with torch.no_grad():
            for _, p in sorted(self.model.named_parameters()):
                dist.broadcast(p.data, 0)

