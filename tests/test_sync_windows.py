"""A DiLoCo round window expiring, and a contribution changed after it was accepted
(geotrain/sync/rounds.py, diloco.py).

When `window_s` (sync.round_timeout_s) runs out the round goes on without a late site,
whose work is carried into the next round with its own tokens; a contribution changed
in the store after the decision accepted it is never merged: every site merges exactly
what was accepted, or takes the round from the decider's commit.

    python -m pytest tests/test_sync_windows.py -q
"""

import threading

import pytest
import torch

from geotrain.store import RunStore
from geotrain.sync import compression
from geotrain.sync.diloco import (DiLoCo, RoundExchange, decode, model_params, outer_step,
                                  params_hash, weighted_mean)
from geotrain.sync.rounds import ContributionChanged
from geotrain.train.model import build
from tests.helpers import wait_for
from tests.sync_helpers import CFG, batch, commit_start, publish, run_sites, train_step

# A guard against a hang, not a speed limit: nothing here waits on how fast the machine is.
pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)


def test_a_round_window_expires_and_a_late_contribution_is_carried(tmp_path):
    """window_s (sync.round_timeout_s): a, first in round 1, waits for b, alive and
    training round 1, for the whole window, then decides round 1 alone. b's
    contribution, written to round 1 after that, is carried: round 2's decision
    accepts it as b@1 with its own tokens, next to the round's own work."""
    store = RunStore("file://" + str(tmp_path))
    window = 1.0
    # liveness_s: b beats once and stays alive for the test; only the window can end the wait.
    ex = RoundExchange(store, "a", poll_s=0.01, window_s=window, liveness_s=3600)
    store.alive("b", "training", training_round=1)
    publish(store, 1, "a", {"w": torch.ones(2)})
    polls = []
    d1, won = ex.decide(1, should_stop=lambda: polls.append(1) and False)
    assert won and d1["decided_by"] == "a" and d1["rejected"] == []
    assert [(e["site"], e["round"]) for e in d1["accepted"]] == [("a", 1)]
    assert polls  # it waited (a decision with nobody to wait for polls no time at all) ...
    assert d1["decided_at"] - store.contribution_meta(1, "a")["published_at"] >= window  # ... the whole window

    publish(store, 1, "b", {"w": torch.full((2,), 3.0)}, tokens=48)  # too late for round 1
    store.alive("b", "training", training_round=2)
    publish(store, 2, "a", {"w": torch.ones(2)})
    publish(store, 2, "b", {"w": torch.ones(2)})
    polls.clear()
    d2, won = ex.decide(2, should_stop=lambda: polls.append(1) and False)
    assert won and not polls  # everyone it would wait for is there: no wait
    assert [(e["site"], e["round"]) for e in d2["accepted"]] == [("b", 1), ("a", 2), ("b", 2)]
    parts, _ = ex.gather(d2)
    assert [(e.site, e.round, e.tokens) for e, _ in parts] == [("b", 1, 48.0), ("a", 2, 16.0), ("b", 2, 16.0)]
    carried = [e for e in store.events(["a"]) if e["kind"] == "carried"]
    assert [[(c["site"], c["round"]) for c in e["carried"]] for e in carried] == [[("b", 1)]]


def test_a_round_window_expires_and_the_late_sites_work_lands_in_the_next_round(tmp_path):
    """Two sites training, a with round_timeout_s = 1 s. a finishes round 1 and waits for
    b (alive, training round 1, held back by the test) for the whole window, then
    the round goes on without it. b's work, when it ends its round, goes to the
    first round still open — round 2 — based on round 0, and is merged there
    weighted by its own tokens; every site ends every round on the same bits."""
    url = "file://" + str(tmp_path)
    store = RunStore(url)
    commit_start(store, build(CFG, seed=0))
    window, h, rounds = 1.0, 2, 2
    b_may_train, a_may_go_on = threading.Event(), threading.Event()
    out, errors = {}, []

    def site(name: str, seed: int) -> None:
        try:
            model = build(CFG, seed=0)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            # liveness_s: beats are not what is tested; only the window ends a's wait.
            # b's own window is long: in round 2 it waits for a however long a takes.
            ex = RoundExchange(RunStore(url), name, poll_s=0.01, liveness_s=3600,
                               window_s=window if name == "a" else 3600)
            gen = torch.Generator().manual_seed(seed)
            with DiLoCo(model, opt, ex, inner_steps=h) as diloco:
                if name == "b":
                    assert b_may_train.wait(60)  # alive and on round 1, but slow
                while diloco.training_round <= rounds:
                    if name == "a" and diloco.round == 1:
                        assert a_may_go_on.wait(60)  # round 2 stays open until b published
                    x, y = batch(gen)
                    train_step(model, opt, x, y)
                    diloco.step(tokens=x.numel())
                diloco.finish()
            out[name] = diloco.history
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = {n: threading.Thread(target=site, args=(n, seed)) for n, seed in (("a", 1), ("b", 2))}
    try:
        threads["b"].start()
        wait_for(lambda: (store.liveness().get("b") or {}).get("training_round") == 1, 60)
        threads["a"].start()
        wait_for(lambda: store.members(1) or errors, 60, every=0.01)
        b_may_train.set()
        wait_for(lambda: "b" in store.contributions(2) or errors, 60, every=0.01)
    finally:
        b_may_train.set()
        a_may_go_on.set()
        for t in threads.values():
            t.join(60)
    assert not errors, errors[0]

    m1 = store.members(1)
    assert [(e["site"], e["round"]) for e in m1["accepted"]] == [("a", 1)]
    assert m1["decided_by"] == "a" and m1["rejected"] == []
    assert m1["decided_at"] - store.contribution_meta(1, "a")["published_at"] >= window  # waited it out
    assert store.contributions(1) == ["a"]  # b never wrote to the round that went on without it
    b_meta = store.contribution_meta(2, "b")
    assert (b_meta["base_round"], b_meta["inner_steps"], b_meta["tokens"]) == (0, h, h * 4 * 16)
    m2 = store.members(2)
    assert [(e["site"], e["round"]) for e in m2["accepted"]] == [("a", 2), ("b", 2)]
    for name in ("a", "b"):
        assert [(r.round, r.members) for r in out[name]] == [(1, ["a"]), (2, ["a", "b"])], name
    assert [r.hash for r in out["a"]] == [r.hash for r in out["b"]]
    for r in (1, 2):
        assert {v["hash"] for v in store.results(r).values()} == {store.global_manifest(r)["hash"]}
        assert set(store.results(r)) == {"a", "b"}
    # Round 2 by hand from round 1's commit: b's work weighs its own tokens.
    files, _ = store.read_global(1)
    theta, momentum = decode(files["model.safetensors"]), decode(files["outer.safetensors"])
    parts = [(s, compression.decode(store.read_contribution(2, s)[0]), store.contribution_meta(2, s)["tokens"])
             for s in ("a", "b")]
    outer_step(theta, weighted_mean(parts), momentum, 0.7, 0.9, True)
    assert params_hash(theta) == out["a"][1].hash


@pytest.mark.parametrize("change", ["payload", "bits", "manifest"])
def test_a_contribution_changed_after_it_was_accepted_is_not_merged(tmp_path, change):
    """Round 1's decision lists a's contribution (its sha256 and tokens); then,
    before either site merges the round, the store changes under it: a new
    payload with a manifest to match (`payload`), bits flipped in the payload
    (`bits`), or the manifest alone, claiming 100x the tokens and other bytes
    (`manifest`). Every site still merges exactly what the decision accepted —
    the decider (a) from what it read and checked; b, which comes to each round
    once a decided it and so reads the store only after the change, takes the
    round from a's commit when the accepted bytes are gone, and says so in an
    event — no site fails, and every round ends on the same bits."""
    url = "file://" + str(tmp_path)
    store = RunStore(url)
    start = build(CFG, seed=0)
    commit_start(store, start)
    changed, seen, errors = threading.Event(), {}, []

    class Held(RoundExchange):
        def decide(self, r, *args, **kwargs):  # b: never the decider, never reads while deciding
            if self.site == "b":
                wait_for(lambda: self.store.members(r), 60, every=0.01)
            return super().decide(r, *args, **kwargs)

        def gather(self, decision):  # merging round 1 waits until the store was changed
            if decision["round"] == 1:
                assert changed.wait(60)
            return super().gather(decision)

    def change_it() -> None:
        try:
            decision = wait_for(lambda: store.members(1), 60, every=0.01)
            seen["decision"] = decision
            seen["accepted"] = []
            for e in decision["accepted"]:
                payload, _ = store.read_contribution(e["round"], e["site"])
                seen["accepted"].append((e["site"], compression.decode(payload), e["tokens"]))
            meta = store.contribution_meta(1, "a")
            if change == "payload":
                other = {n: 2 * t for n, t in seen["accepted"][0][1].items()}
                store.put_contribution(1, "a", compression.make_codec("none").encode(other),
                                       {k: v for k, v in meta.items() if k not in ("sha256", "bytes")})
                seen["changed"] = [("a", other, meta["tokens"]), seen["accepted"][1]]
            elif change == "bits":
                path = tmp_path / "rounds" / "000001" / "a.bin"
                data = path.read_bytes()
                path.write_bytes(data[:-4] + bytes(b ^ 0xFF for b in data[-4:]))
            else:
                store.put_json("rounds/000001/a.json", dict(meta, tokens=meta["tokens"] * 100,
                                                            sha256="0" * 64))
                seen["changed"] = [("a", seen["accepted"][0][1], meta["tokens"] * 100), seen["accepted"][1]]
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
        finally:
            changed.set()

    t = threading.Thread(target=change_it)
    t.start()
    try:
        out = run_sites(url, {"a": (10, 4), "b": (20, 2)}, rounds=2, h=2, exchange_cls=Held)
    finally:
        changed.set()
        t.join(60)
    assert not errors, errors[0]
    decision = seen["decision"]
    assert [(e["site"], e["round"]) for e in decision["accepted"]] == [("a", 1), ("b", 1)]
    assert decision["decided_by"] == "a"
    a, b = out["a"]["history"], out["b"]["history"]
    assert [r.round for r in a] == [r.round for r in b] == [1, 2]
    assert [r.hash for r in a] == [r.hash for r in b]
    for r in (1, 2):
        assert store.results(r)["a"]["hash"] == store.results(r)["b"]["hash"] == store.global_manifest(r)["hash"]

    # Round 1 is exactly the accepted contributions, weighted by the decision's tokens.
    theta = model_params(start)
    outer_step(theta, weighted_mean(seen["accepted"]), {}, 0.7, 0.9, True)
    assert a[0].hash == params_hash(theta)
    if "changed" in seen:  # ... and what the store holds now would have given other bits
        other = model_params(start)
        outer_step(other, weighted_mean(seen["changed"]), {}, 0.7, 0.9, True)
        assert params_hash(other) != a[0].hash

    events = [e for e in store.events(["a", "b"]) if e["kind"] == "contribution-changed"]
    if change == "manifest":  # the accepted bytes are intact: merged as decided, nothing to say
        assert events == []
    else:
        assert [(e["source"], e["round"]) for e in events] == [("b", 1)]


def test_a_site_that_lost_the_race_to_decide_merges_what_was_accepted_not_what_it_read(tmp_path):
    """a looks for round 1's decision (none yet), b decides it, a's contribution
    changes in the store, a reads it while deciding and loses the create: a must
    not merge the bytes it read, which the decision never accepted."""
    url = "file://" + str(tmp_path)
    store = RunStore(url)
    publish(store, 1, "a", {"w": torch.ones(4)})
    publish(store, 1, "b", {"w": torch.full((4,), 2.0)})

    class Late(RunStore):  # the decision lands just after a looked for it
        def members(self, r):
            if not getattr(self, "looked", False):
                self.looked = True
                decided["d"] = ex_b.decide(1)[0]
                publish(store, 1, "a", {"w": torch.full((4,), 9.0)})  # the store changes
                return None
            return super().members(r)

    decided, ex_b = {}, RoundExchange(store, "b")
    ex = RoundExchange(Late(url), "a")
    decision, won = ex.decide(1)
    assert not won and decision["decided_by"] == "b"
    assert [e["sha256"] for e in decision["accepted"]] == [e["sha256"] for e in decided["d"]["accepted"]]
    with pytest.raises(ContributionChanged, match="contribution of a .round 1. changed after it was accepted"):
        ex.gather(decision)
    # b, which read the accepted bytes while deciding, merges them.
    parts, _ = ex_b.gather(decided["d"])
    assert [(e.site, d["w"].tolist()) for e, d in parts] == [("a", [1.0] * 4), ("b", [2.0] * 4)]
