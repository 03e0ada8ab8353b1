"""Committing merged rounds, in a thread of its own.

A site that merged round r holds its new global state until the round is
committed to the store (`global/r`): by the site that decided it, or — if that
site has not committed it in time — by any other (RoundExchange.ensure_committed),
so that committed rounds have no gaps. Committing a round whose state is kept
(`sync.state_every`, the last round) uploads the whole model and outer
momentum: for a 1 B-parameter model, minutes on a 100 Mbit/s link. Doing that
in the merge thread held up every merge after it — and with them the site's
training and every site waiting for it — so `Commits` runs a thread that does
nothing else.

While an upload is in flight the rounds merged after it wait here. Each keeps
its global state only if its own commit needs it (or it is the newest), so a
long upload costs a few copies of the model, not one per round; a round kept
without its state is committed without an eval record.

    commits = Commits(exchange, on_commit, should_stop, notify)
    commits.start()
    commits.add(r, params, momentum, digest, decision, decided_by_me)
    commits.settle(wait=True)    # at the end: every merged round committed by someone
    commits.close()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from geotrain.sync.rounds import RoundExchange, SyncError

Tensors = dict[str, torch.Tensor]


class Commits:
    """The rounds this site merged and nobody has committed yet, and the thread
    that commits them. `notify` is called when the thread fails (the error is
    then `error`, and `check()` raises it)."""

    def __init__(self, exchange: RoundExchange,
                 on_commit: Callable[[int, Tensors], dict] | None,
                 should_stop: Callable[[], bool], notify: Callable[[], None] = lambda: None):
        self.exchange, self.on_commit, self.should_stop = exchange, on_commit, should_stop
        self.notify = notify
        self.error: BaseException | None = None
        self._pending: dict[int, list] = {}
        self._lock = threading.Lock()        # guards _pending
        self._settling = threading.Lock()    # one thread commits at a time
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="diloco-committer", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5) -> None:
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def wake(self) -> None:
        self._wake.set()

    def add(self, r: int, params: Tensors, momentum: Tensors, digest: str, decision: dict,
            decided_by_me: bool) -> None:
        """Round r is merged: commit it (in the thread, once started)."""
        with self._lock:
            older = [q for q, e in self._pending.items() if q < r and e[0] is not None]
        # One read of the run's last round (a store GET), outside the lock.
        last = self.exchange.last_round() if older else None
        with self._lock:
            self._pending[r] = [params, momentum, digest, decision, decided_by_me]
            for q in older:
                entry = self._pending.get(q)
                if entry is not None and not self.exchange.keeps_state(q, last):
                    entry[0] = entry[1] = None
        self._wake.set()

    def pending(self) -> list[int]:
        with self._lock:
            return sorted(self._pending)

    def kept_state(self, r: int) -> bool:
        """Whether pending round r still holds its global state (for tests)."""
        with self._lock:
            return r in self._pending and self._pending[r][0] is not None

    def check(self) -> None:
        """Raise the thread's failure, if it failed."""
        if self.error is not None:
            raise SyncError(f"committing failed: {self.error}") from self.error

    def _run(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                with self._settling:
                    self._once()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self.error = e
                self.notify()
                return

    def _once(self) -> None:
        """One pass, in round order: commit what is ours to commit; forget what
        is committed. It stops at the first round still uncommitted (its decider has
        it, until the takeover delay): a later round is never committed before an
        earlier one, so the committed rounds are always 0..r. Otherwise, should every
        site holding the earlier round die, a site joining would start from the later
        commit and nobody would ever replay, and commit, the round between."""
        with self._lock:
            pending = sorted((r, tuple(e)) for r, e in self._pending.items())
        for r, (params, momentum, digest, decision, mine) in pending:
            if self.exchange.ensure_committed(r, params, momentum, digest, decision, mine):
                if self.on_commit and params is not None:
                    self.exchange.store.put_eval(
                        r, dict(self.on_commit(r, params), by=self.exchange.site))
            if not self.exchange.store.is_committed(r):
                return
            with self._lock:
                self._pending.pop(r, None)

    def settle(self, wait: bool = False) -> None:
        """One pass now; with `wait`, until every round here is committed by someone."""
        while True:
            self.check()
            with self._settling:
                self._once()
            with self._lock:
                if not wait or not self._pending:
                    return
            if self.should_stop():
                raise SyncError("stopped while waiting for the last rounds to be committed")
            time.sleep(0.2)
