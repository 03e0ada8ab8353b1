"""Committing merged rounds in a thread of its own (geotrain/sync/commits.py).

At a real model's size a round's global state takes minutes to upload on a thin
link (docs/benchmarks.md, "Utilisation at a 1 B model's link ratio"). These tests
hold a state commit in flight on purpose — a store whose commit of one round
waits for the test to let it go — and check that the merges after it go on,
that the rounds behind it keep only the state their own commit needs, and that
every round is committed, in order, once it is let go.
"""

from __future__ import annotations

import threading

import pytest
import torch

from geotrain.store import RunStore
from geotrain.sync.diloco import DiLoCo, RoundExchange
from geotrain.train.model import build
from tests.helpers import wait_for
from tests.sync_helpers import CFG, batch, commit_start, publish, train_step

pytestmark = pytest.mark.timeout(180)
PATIENCE_S = 90  # a hang detector, not a speed bound


class HeldStore(RunStore):
    """A file:// run store whose commit of round `held` waits until `release` is set."""

    def __init__(self, url: str, held: int):
        super().__init__(url)
        self.held, self.release, self.holding = held, threading.Event(), threading.Event()

    def commit_global(self, r, files, manifest):
        if r == self.held and files:
            self.holding.set()
            assert self.release.wait(PATIENCE_S), "the test never released the held commit"
        return super().commit_global(r, files, manifest)


def _train(diloco, model, opt, rounds: int, errors: list) -> None:
    try:
        gen = torch.Generator().manual_seed(1)
        while diloco.training_round <= rounds:
            x, y = batch(gen)
            train_step(model, opt, x, y)
            diloco.step(tokens=x.numel())
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def test_a_state_commit_in_flight_does_not_hold_up_the_merges_after_it(tmp_path):
    store = HeldStore(f"file://{tmp_path}", held=2)
    model = build(CFG, seed=0)
    commit_start(store, model)
    store.alive("a", "running")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    evals = []
    exchange = RoundExchange(store, "a", state_every=2, final_round=6)
    diloco = DiLoCo(model, opt, exchange, inner_steps=2, liveness=False,
                    on_commit=lambda r, params: evals.append(r) or {"eval_loss": 1.0})
    errors: list = []
    with diloco:
        worker = threading.Thread(target=_train, args=(diloco, model, opt, 5, errors), daemon=True)
        worker.start()
        # Round 2 keeps its state, so its commit is held; rounds 3-5 merge meanwhile.
        assert store.holding.wait(PATIENCE_S)
        wait_for(lambda: diloco.round >= 5 or errors or not worker.is_alive(), PATIENCE_S)
        assert not errors, errors
        assert diloco.round == 5 and not worker.is_alive()
        assert store.committed_rounds() == [0, 1]  # round 2 is in flight; none after it yet
        commits = diloco._commits
        assert commits.pending() == [2, 3, 4, 5]
        # Waiting behind the upload: 3 needs no state of its own (state every 2),
        # 4 does, 5 is the newest (it may become the last round).
        assert [commits.kept_state(r) for r in (2, 3, 4, 5)] == [True, False, True, True]
        store.release.set()
        diloco.finish()
    assert store.committed_rounds() == [0, 1, 2, 3, 4, 5]
    assert not store.read_global(3)[0] and "model.safetensors" in store.read_global(4)[0]
    # Every round's hash is the one the site ended it with; round 3 kept no state
    # to evaluate, so it alone has no eval record.
    for r in range(1, 6):
        assert store.global_manifest(r)["hash"] == store.results(r)["a"]["hash"]
    assert sorted(evals) == [1, 2, 4, 5] and store.read_eval(3) is None


def test_a_failing_commit_fails_the_round_it_is_waited_in(tmp_path):
    """The committer's failure is not swallowed: the training thread raises it."""

    class Failing(RunStore):
        def commit_global(self, r, files, manifest):
            if r == 1:
                raise OSError("the store refused the commit")
            return super().commit_global(r, files, manifest)

    store = Failing(f"file://{tmp_path}")
    model = build(CFG, seed=0)
    commit_start(store, model)
    store.alive("a", "running")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    errors: list = []
    with DiLoCo(model, opt, RoundExchange(store, "a"), inner_steps=2, liveness=False) as diloco:
        _train(diloco, model, opt, 4, errors)
        assert len(errors) == 1 and "committing failed: the store refused the commit" in str(errors[0])
    assert store.committed_rounds() == [0]


def test_a_live_decider_is_left_to_commit_its_round_a_gone_one_is_not(tmp_path):
    """Another site commits a round for its decider only once the decider is gone:
    while it beats it may still be uploading a large state (minutes), and the same
    bytes uploaded beside it by every site would only slow it down."""
    import time

    from geotrain.sync import rounds

    store = RunStore(f"file://{tmp_path}")
    params = {"w": torch.ones(4)}
    ex = RoundExchange(store, "a", takeover_s=0.0, liveness_s=30.0)
    decision = {"accepted": [], "rejected": [], "decided_by": "x", "decided_at": time.time() - 60,
                "round": 1}
    store.alive("x", "training", training_round=2)
    assert not ex.ensure_committed(1, params, {}, "h", decision, decided_by_me=False)
    assert not store.is_committed(1)
    # Past TAKEOVER_LIVE_S even a live decider is helped.
    old = dict(decision, decided_at=time.time() - rounds.TAKEOVER_LIVE_S - 1)
    assert RoundExchange(store, "a", takeover_s=0.0, liveness_s=30.0).ensure_committed(
        1, params, {}, "h", old, decided_by_me=False)
    assert store.is_committed(1)
    # A decider that is done (or silent) is not waited for.
    store.alive("x", "done", training_round=3)
    fresh = RoundExchange(store, "a", takeover_s=0.0, liveness_s=30.0)
    assert fresh.ensure_committed(2, params, {}, "h", dict(decision, round=2), decided_by_me=False)
    assert [e["round"] for e in store.events(["a"]) if e["kind"] == "takeover"] == [1, 2]


def test_a_long_wait_for_a_round_polls_the_store_less_and_less(tmp_path, monkeypatch):
    """Waiting minutes for a thin link's upload must not cost dozens of store requests
    a second: the decider polls every poll_s for POLL_FAST_S, then ever slower, up to
    POLL_MAX_S between polls. On a clock of our own, so the machine's speed is moot."""
    import time as real_time

    from geotrain.sync import rounds

    class Clock:  # rounds' view of time: sleeping advances it, nothing else does
        now = 0.0
        sleeps: list[float] = []

        @classmethod
        def monotonic(cls):
            return cls.now

        @classmethod
        def time(cls):
            return real_time.time() + cls.now

        @classmethod
        def sleep(cls, s):
            cls.sleeps.append(s)
            cls.now += s

    store = RunStore(f"file://{tmp_path}")
    publish(store, 1, "a", {"w": torch.ones(3)})
    ex = RoundExchange(store, "a", liveness_s=1e9, window_s=1e9)
    store.alive("b", "training", training_round=1)  # live, never publishes
    monkeypatch.setattr(rounds, "time", Clock)
    with pytest.raises(rounds.SyncError, match="stopped while waiting"):
        ex.decide(1, should_stop=lambda: Clock.now > 15)
    fast = [s for s in Clock.sleeps if s == ex.poll_s]
    assert fast and sum(fast) <= rounds.POLL_FAST_S + ex.poll_s
    assert max(Clock.sleeps) == rounds.POLL_MAX_S
    # 15 s of waiting: about 40 polls in the first 2 s, then about one a second.
    assert len(Clock.sleeps) < 40 + 25, len(Clock.sleeps)


class HeldUploads(RunStore):
    """A file:// run store whose upload of a contribution to round `held` waits for
    `release`: a thin link's upload, as long as the test wants it."""

    def __init__(self, url: str, held: int):
        super().__init__(url)
        self.held, self.release, self.holding = held, threading.Event(), threading.Event()

    def put_contribution(self, r, site, payload, meta):
        if r == self.held:
            self.holding.set()
            assert self.release.wait(PATIENCE_S), "the test never released the held upload"
        return super().put_contribution(r, site, payload, meta)


def test_with_overlap_a_slow_upload_does_not_stop_training(tmp_path):
    """Overlapped, a round's contribution is encoded by the training thread and
    uploaded in the background: training goes on into the next round while the
    upload is still on the wire, and the result is the same as without the hold."""
    runs = {}
    for held in (2, None):
        store = HeldUploads(f"file://{tmp_path / str(held)}", held=held)
        model = build(CFG, seed=0)
        commit_start(store, model)
        store.alive("a", "running")
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        errors: list = []
        diloco = DiLoCo(model, opt, RoundExchange(store, "a"), inner_steps=2, overlap=True,
                        liveness=False)
        with diloco:
            worker = threading.Thread(target=_train, args=(diloco, model, opt, 4, errors),
                                      daemon=True)
            worker.start()
            if held:
                assert store.holding.wait(PATIENCE_S)
                # Round 2's upload is held, yet training is into round 3 and beyond
                # (its merge is due only at the end of round 3).
                wait_for(lambda: diloco.training_round >= 3 or errors, PATIENCE_S)
                assert not errors and store.contributions(2) == []
                store.release.set()
            worker.join(PATIENCE_S)
            assert not worker.is_alive() and not errors, errors
            diloco.finish()
        assert store.committed_rounds() == [0, 1, 2, 3, 4]
        runs[held] = [store.global_manifest(r)["hash"] for r in range(1, 5)]
    assert runs[2] == runs[None]


def test_a_later_round_is_never_committed_before_an_earlier_one(tmp_path):
    """Round 8 was decided by b, round 9 by us. While b may still commit 8, we do not
    commit 9 either: had we, and then every site holding 8 died, a site joining would
    start from 9's commit and round 8 would stay a gap for ever (found by
    tests/test_chaos.py's store-error bursts). Once b is gone, we take 8 over, then 9."""
    import time

    from geotrain.sync.commits import Commits

    store = RunStore(f"file://{tmp_path}")
    store.alive("b", "running")
    exchange = RoundExchange(store, "a", state_every=1, takeover_s=5.0)
    commits = Commits(exchange, on_commit=None, should_stop=lambda: False)
    params = {"w": torch.ones(3)}
    old = time.time() - 60  # both decided a minute ago: past the takeover delay
    commits.add(8, params, {}, "h8", {"round": 8, "accepted": [], "decided_by": "b", "decided_at": old},
                decided_by_me=False)
    commits.add(9, params, {}, "h9", {"round": 9, "accepted": [], "decided_by": "a", "decided_at": old},
                decided_by_me=True)
    commits.settle()
    assert store.committed_rounds() == [] and commits.pending() == [8, 9]  # b is live: its round
    store.alive("b", "failed")  # b is gone
    exchange._liveness_read = (float("-inf"), {})  # (read every 2 s; the test does not wait)
    commits.settle(wait=True)
    assert store.committed_rounds() == [8, 9] and commits.pending() == []
    assert [e["kind"] for e in store.events(["a"]) if e["kind"] == "takeover"] == ["takeover"]
