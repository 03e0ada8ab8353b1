"""Deciding a DiLoCo round through the run store (geotrain/sync/rounds.py): membership,
late work, rejection.

Two sites racing agree on one decision; a decider waits for a live site, not for a
stale one, and stops when asked; a late contribution lands in the next round, once;
corrupt, NaN and outlier contributions are rejected; a round decided by a site that
died before committing it is committed by another.

    python -m pytest tests/test_sync_decide.py -q
"""

import struct
import threading
import time
import zlib

import pytest
import torch

from geotrain.store import RunStore
from geotrain.sync import compression
from geotrain.sync.diloco import (DiLoCo, RoundExchange, SyncError, decode, model_params,
                                  outer_step, params_hash)
from geotrain.train.model import build
from tests.helpers import wait_for
from tests.sync_helpers import CFG, batch, commit_start, publish, train_step

# A guard against a hang, not a speed limit: nothing here waits on how fast the machine is.
pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)


def test_membership_is_agreed_when_two_sites_race(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    for s in ("a", "b", "c"):
        publish(store, 1, s, {"w": torch.full((3,), float(ord(s)))})
    results, barrier = {}, threading.Barrier(2)

    def decide(site):
        barrier.wait()
        results[site] = RoundExchange(RunStore(store.url), site, poll_s=0.001).decide(1)

    threads = [threading.Thread(target=decide, args=(s,)) for s in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    (da, won_a), (db, won_b) = results["a"], results["b"]
    assert won_a != won_b  # exactly one created the decision
    assert da == db == store.members(1)
    assert [e["site"] for e in da["accepted"]] == ["a", "b", "c"]


class Beater:
    """Beats sites' liveness records from a thread, as their agents would, until
    told to stop beating one (then it goes stale after liveness_s)."""

    def __init__(self, store: RunStore, sites: list[str], training_round: int = 1):
        self.store, self.sites, self.training_round = store, frozenset(sites), training_round
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for s in sorted(self.sites):
                self.store.alive(s, "training", training_round=self.training_round)
            self._stop.wait(0.05)

    def __enter__(self) -> "Beater":
        for s in sorted(self.sites):  # beaten before the first decide looks
            self.store.alive(s, "training", training_round=self.training_round)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def stop_beating(self, site: str) -> None:
        self.sites = self.sites - {site}


def test_decide_waits_for_a_live_site_not_for_a_stale_one(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    # window_s: far beyond this test, so only c going stale can end the wait. The
    # beats come every 0.05 s; liveness_s leaves a busy machine 2 s to deliver one.
    ex = RoundExchange(store, "a", poll_s=0.01, liveness_s=2.0, window_s=3600)
    publish(store, 1, "a", {"w": torch.ones(2)})
    polls, got = [], {}

    def should_stop() -> bool:  # called once per poll while decide waits
        polls.append(time.monotonic())
        return False

    with Beater(store, ["b", "c"]) as beater:  # b and c beat on, whatever the machine's speed
        t = threading.Thread(target=lambda: got.update(d=ex.decide(1, should_stop)))
        t.start()
        wait_for(lambda: len(polls) >= 20, 60, every=0.01)
        assert store.members(1) is None and t.is_alive()  # b and c are alive and on round 1: wait
        publish(store, 1, "b", {"w": torch.ones(2)})
        beater.stop_beating("c")  # c stops beating: after liveness_s the round goes on without it
        t.join(60)
    assert not t.is_alive(), "decide still waits for a site that stopped beating"
    decision, won = got["d"]
    assert won and [e["site"] for e in decision["accepted"]] == ["a", "b"]


def test_decide_stops_when_asked(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    store.alive("b", "training", training_round=1)
    publish(store, 1, "a", {"w": torch.ones(2)})

    def keep_b_alive():
        store.alive("b", "training", training_round=1)
        return True

    with pytest.raises(SyncError, match="stopped"):
        RoundExchange(store, "a", poll_s=0.01).decide(1, should_stop=keep_b_alive)


def test_a_late_contribution_lands_in_the_next_round(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    ex = RoundExchange(store, "a")
    publish(store, 1, "a", {"w": torch.ones(2)})
    d1, _ = ex.decide(1)  # b is not known to be alive: round 1 is a alone
    assert [e["site"] for e in d1["accepted"]] == ["a"]
    publish(store, 1, "b", {"w": torch.full((2,), 3.0)}, tokens=48)  # too late for round 1
    publish(store, 2, "a", {"w": torch.ones(2)})
    d2, _ = ex.decide(2)
    assert [(e["site"], e["round"]) for e in d2["accepted"]] == [("b", 1), ("a", 2)]
    parts, _ = ex.gather(d2)
    assert [(e.site, e.round, e.tokens) for e, _ in parts] == [("b", 1, 48.0), ("a", 2, 16.0)]
    publish(store, 3, "a", {"w": torch.ones(2)})
    d3, _ = ex.decide(3)  # carried once, never twice
    assert [(e["site"], e["round"]) for e in d3["accepted"]] == [("a", 3)]
    assert any(e["kind"] == "carried" for e in store.events(["a"]))


def nan_payload() -> bytes:
    """A well-formed 'none' payload (valid checksum) whose last value is NaN."""
    good = compression.make_codec("none").encode({"w": torch.zeros(4)})
    magic, version, header_len, _ = struct.unpack_from("<3sBII", good)
    body = bytearray(good[12:])
    body[-4:] = struct.pack("<f", float("nan"))
    return struct.pack("<3sBII", magic, version, header_len, zlib.crc32(bytes(body))) + bytes(body)


def test_corrupt_nan_and_outlier_contributions_are_rejected(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    for s in ("a", "b", "c"):
        publish(store, 1, s, {"w": torch.full((4,), 1.0 + ord(s) % 3)})
    publish(store, 1, "d", {"w": torch.full((4,), 1e4)})  # norm far outside the others'
    # e: a NaN tensor published by a broken sender that bypassed its codec's check
    store.put_contribution(1, "e", nan_payload(), {"tokens": 16, "codec": "none",
                                                   "published_at": time.time()})
    # f: bits flipped in the store after the manifest was written
    publish(store, 1, "f", {"w": torch.ones(4)})
    path = tmp_path / "rounds" / "000001" / "f.bin"
    path.write_bytes(path.read_bytes()[:-4] + b"\xff\xff\xff\xff")
    decision, won = RoundExchange(store, "a").decide(1)
    assert won and [e["site"] for e in decision["accepted"]] == ["a", "b", "c"]
    reasons = {e["site"]: e["reason"] for e in decision["rejected"]}
    assert set(reasons) == {"d", "e", "f"}
    assert "median" in reasons["d"] and "non-finite" in reasons["e"] and "checksum" in reasons["f"]
    assert {e["site"] for e in store.events(["a"]) if e["kind"] == "rejected"} == {"d", "e", "f"}


def test_a_dead_deciders_round_is_committed_by_another_site(tmp_path):
    url = "file://" + str(tmp_path)
    store = RunStore(url)
    model = build(CFG, seed=0)
    commit_start(store, model)
    # x published and decided round 1, then died before committing it
    x_delta = {n: torch.zeros_like(t) + 1e-3 for n, t in model_params(model).items()}
    publish(store, 1, "x", x_delta)
    decision, _ = RoundExchange(store, "x").decide(1)
    assert not store.is_committed(1)
    # What round 1 must be: the start plus x's step, by hand (no momentum yet).
    round1 = model_params(model)
    outer_step(round1, x_delta, {}, 0.7, 0.9, True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ex = RoundExchange(store, "a", takeover_s=0.2)
    with DiLoCo(model, opt, ex, inner_steps=2) as diloco:  # joins: applies round 1 itself
        assert diloco.round == 1 and diloco.training_round == 2
        gen = torch.Generator().manual_seed(5)
        while diloco.training_round <= 2:
            x, y = batch(gen)
            train_step(model, opt, x, y)
            diloco.step(tokens=x.numel())
        diloco.finish()
    assert store.committed_rounds() == [0, 1, 2]
    # a applied round 1 while joining (so its history starts at round 2) and
    # committed it for x: exactly the bits x's decision gives.
    assert [r.round for r in diloco.history] == [2]
    files, manifest = store.read_global(1)
    assert manifest["hash"] == store.results(1)["a"]["hash"] == params_hash(round1)
    assert params_hash(decode(files["model.safetensors"])) == params_hash(round1)
    assert manifest["members"] == ["x"] and store.members(1)["decided_by"] == "x"
    assert [e["round"] for e in store.events(["a"]) if e["kind"] == "takeover"] == [1]
