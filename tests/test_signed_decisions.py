"""Round decisions and evals count only when signed by the member that wrote them
(geotrain/store/decisions.py, issue 12).

Three parties share one file:// store: the operator (the run's control key and the
roster of members a, b), the members' nodes (the public control key and their own
member key), and a forger with write access to the store and no member key. What
the forger puts in a decision slot is passed over — reported, and the sites decide
in the next slot, all of them the same one; a forged eval is not read; without a
control key plain records are taken as they are.

    python -m pytest tests/test_signed_decisions.py -q
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from geotrain.errors import StoreError
from geotrain.store import RunStore, roster, round_key
from geotrain.store.control import ControlKey
from geotrain.store.decisions import SLOTS, slot_key
from geotrain.sync.diloco import DiLoCo, RoundExchange, SyncError, params_hash
from geotrain.train.model import build
from tests.sync_helpers import CFG, batch, commit_start, publish, train_step

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

KEYS = {"a": ControlKey.generate(), "b": ControlKey.generate()}
MALLORY = ControlKey.generate()  # a key of no member


class Parties:
    def __init__(self, tmp_path: Path):
        self.url = "file://" + str(tmp_path / "run")
        self.control = ControlKey.generate()
        self.operator = RunStore(self.url, control=self.control, site_key=None, member_key=None)
        self.operator.write_roster({m: k.public_text() for m, k in KEYS.items()})
        self.forger = RunStore(self.url, control=None, site_key=None, member_key=None)

    def node(self, member: str, key: ControlKey | None = None) -> RunStore:
        public = ControlKey.from_public(self.control.public_text())
        return RunStore(self.url, control=public, site_key=None, member_key=key or KEYS[member])

    def plant(self, r: int, slot: int, record) -> None:
        data = record if isinstance(record, bytes) else json.dumps(record).encode()
        assert self.forger.create(slot_key(r, slot), data)


@pytest.fixture
def parties(tmp_path: Path) -> Parties:
    return Parties(tmp_path)


def decision(by: str, r: int = 1, accepted=("a", "b")) -> dict:
    return {"accepted": [{"site": s, "round": r, "sha256": "0" * 64, "tokens": 16.0, "norm": 1.0}
                         for s in accepted],
            "rejected": [], "decided_by": by, "decided_at": time.time(), "norms": {}, "round": r}


# What a writer without a member's key can put in round r's slot, and why each is passed over.
def _tampered(r: int) -> dict:
    rec = KEYS["a"].sign("decision", decision("a", r))
    rec["body"]["accepted"] = []
    return rec


FORGED = {
    "unsigned": (lambda r: decision("a", r, accepted=()), "not a decision signed by a member"),
    "not JSON": (lambda r: b"\xff{not json", "not JSON"),
    "not a member": (lambda r: MALLORY.sign("decision", decision("mallory", r)),
                     "'mallory', who it says signed it, is not on the run's roster"),
    "signed by a non-member as a": (lambda r: MALLORY.sign("decision", decision("a", r)),
                                    "not signed by a: 'decision' record: bad signature"),
    "signed by b as a": (lambda r: KEYS["b"].sign("decision", decision("a", r)),
                         "not signed by a: 'decision' record: bad signature"),
    "another round": (lambda r: KEYS["a"].sign("decision", decision("a", r + 1)),
                      "it is for round {next}, not {r}"),
    "tampered": (_tampered, "bad signature"),
    "another kind": (lambda r: KEYS["a"].sign("result", decision("a", r)),
                     "not a version-1 'decision' record"),
}


def test_a_signed_decision_round_trips(parties):
    a, b = parties.node("a"), parties.node("b")
    mine, won = a.decide_members(1, decision("a"))
    assert won and mine["decided_by"] == "a"
    raw = json.loads(a.get(slot_key(1, 0)))
    assert raw["kind"] == "decision" and "sig" in raw and raw["body"] == mine
    assert b.members(1) == parties.operator.members(1) == mine
    # Another member deciding the same round later finds it and takes it.
    assert b.decide_members(1, decision("b")) == (mine, False)
    assert not b.exists(slot_key(1, 1))


@pytest.mark.parametrize("case", sorted(FORGED))
def test_a_forged_decision_is_passed_over_and_the_next_slot_decides(parties, case, caplog):
    # A round of its own per case: a reason is logged once per (key, reason) per process.
    r = 10 + sorted(FORGED).index(case)
    make, why = FORGED[case]
    why = why.format(r=r, next=r + 1)
    parties.plant(r, 0, make(r))
    b = parties.node("b")
    assert b.members(r) is None  # the round is still open
    assert why in b.rejected_decisions(r)[0]
    assert any(why in rec.getMessage() for rec in caplog.records)  # reported
    mine, won = b.decide_members(r, decision("b", r))
    assert won and b.exists(slot_key(r, 1))
    for reader in (parties.node("a"), parties.operator):
        assert reader.members(r) == mine and reader.rejected_decisions(r).keys() == {0}


def test_without_a_control_key_plain_decisions_count_as_before(parties):
    keyless = RunStore(parties.url, control=None, site_key=None, member_key=None)
    plain, won = keyless.decide_members(1, decision("a"))
    assert won and json.loads(keyless.get(slot_key(1, 0)))["decided_by"] == "a"
    assert keyless.members(1) == plain
    # A signed reader does not take it (it is what a forger writes).
    assert parties.node("b").members(1) is None


def test_a_node_without_its_member_key_writes_no_decision(parties):
    unkeyed = parties.node("a")
    unkeyed.member_key = None
    with pytest.raises(StoreError, match="would not count: not a decision signed by a member"):
        unkeyed.decide_members(1, decision("a"))
    assert not unkeyed.exists(slot_key(1, 0))  # no slot taken by a record nobody believes


def test_a_member_added_to_the_roster_is_believed_at_once(parties, monkeypatch):
    monkeypatch.setattr(roster, "REFRESH_S", 1e9)  # only a fresh read can learn of a~1
    reader = parties.node("b")
    assert reader.members(1) is None and reader.roster.key("a") is not None  # roster read
    migrated = ControlKey.generate()
    parties.operator.write_roster({**{m: k.public_text() for m, k in KEYS.items()},
                                   "a~1": migrated.public_text()})
    mine, won = parties.node("a~1", migrated).decide_members(1, decision("a~1"))
    assert won and reader.members(1) == mine  # not passed over for a stale roster


def two_exchanges(parties: Parties) -> dict[str, RoundExchange]:
    out = {}
    for s in ("a", "b"):
        out[s] = RoundExchange(parties.node(s), s, poll_s=0.001)
        publish(out[s].store, 1, s, {"w": torch.full((3,), float(ord(s)))})
    return out


def test_two_sites_racing_past_a_forged_decision_agree_on_the_next_slot(parties):
    parties.plant(1, 0, decision("a", accepted=()))  # leaves both sites' work out
    exchanges, results, barrier = two_exchanges(parties), {}, threading.Barrier(2)

    def decide(site):
        barrier.wait()
        results[site] = exchanges[site].decide(1)

    threads = [threading.Thread(target=decide, args=(s,)) for s in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    (da, won_a), (db, won_b) = results["a"], results["b"]
    assert won_a != won_b and da == db == parties.operator.members(1)
    assert [e["site"] for e in da["accepted"]] == ["a", "b"]
    assert json.loads(parties.operator.get(slot_key(1, 1)))["body"] == da
    events = parties.operator.events(["a", "b"])
    passed = [e for e in events if e["kind"] == "rejected-decision"]
    assert passed and all(e["slot"] == 0 and e["round"] == 1 for e in passed)
    assert len({e["source"] for e in passed}) == len(passed)  # once per site


def test_every_slot_forged_fails_the_round_with_a_clear_error(parties):
    for slot in range(SLOTS):
        parties.plant(1, slot, MALLORY.sign("decision", decision("mallory")))
    ex = two_exchanges(parties)["a"]
    with pytest.raises(SyncError, match=f"round 1: all {SLOTS} decision slots hold records that "
                                        "are not decisions signed by a member of the run"):
        ex.decide(1)
    with pytest.raises(StoreError, match=f"all {SLOTS} decision slots .* not decisions signed"):
        ex.store.decide_members(1, decision("a"))
    slots = [e["slot"] for e in ex.store.events(["a"]) if e["kind"] == "rejected-decision"]
    assert slots == list(range(SLOTS))


def test_the_last_free_slot_still_decides(parties):
    for slot in range(SLOTS - 1):
        parties.plant(1, slot, decision("a", accepted=()))
    mine, won = two_exchanges(parties)["b"].decide(1)
    assert won and parties.operator.members(1) == mine
    assert parties.operator.exists(slot_key(1, SLOTS - 1))


# -- sites training in threads past forged decisions -------------------------------------


def train(parties: Parties, rounds: int, h: int = 2) -> dict[str, list]:
    """Sites a and b train in threads, each through its own signed store."""
    out, errors = {}, []
    for s in KEYS:  # both are known to be alive (signed) before either finishes a round
        parties.node(s).alive(s, "starting")

    def site(name: str, seed: int) -> None:
        try:
            model = build(CFG, seed=0)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            exchange = RoundExchange(parties.node(name), name, poll_s=0.01, liveness_s=60.0)
            gen = torch.Generator().manual_seed(seed)
            with DiLoCo(model, opt, exchange, inner_steps=h,
                        on_commit=lambda r, p: {"eval_loss": float(r)}) as diloco:
                while diloco.training_round <= rounds:
                    x, y = batch(gen)
                    train_step(model, opt, x, y)
                    diloco.step(tokens=x.numel())
                diloco.finish()
            out[name] = [(r.round, r.hash) for r in diloco.history] + [params_hash(diloco.global_params)]
        except BaseException as e:  # noqa: BLE001 - re-raised by the main thread
            errors.append(e)

    threads = [threading.Thread(target=site, args=(n, i)) for i, n in enumerate(KEYS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors, errors[0]
    return out


def test_sites_decide_past_forged_decisions_and_never_apply_them(parties):
    commit_start(parties.operator, build(CFG, seed=0))
    rounds = 3
    # Planted before any site decides: decisions that drop both sites' work (marked
    # rejected, so never carried) and plant a norm history that would reject them later.
    drop = dict(decision("a", accepted=()), norms={"a": [[1e-12, 1.0]] * 5, "b": [[1e-12, 1.0]] * 5})
    for r in range(1, rounds + 1):
        drop.update(round=r, rejected=[{"site": s, "round": r, "reason": "x"} for s in KEYS])
        parties.plant(r, 0, drop)
    parties.plant(2, 1, MALLORY.sign("decision", dict(drop, decided_by="mallory")))
    parties.plant(3, 1, MALLORY.sign("decision", dict(drop, decided_by="b")))

    out = train(parties, rounds)
    assert out["a"] == out["b"]  # every round, and the end, bit-identical

    op = parties.operator
    contributed = set()
    for r in range(1, rounds + 1):
        standing = op.members(r)
        assert standing["decided_by"] in KEYS and standing["round"] == r
        assert not standing["rejected"]
        contributed |= {(e["round"], e["site"]) for e in standing["accepted"]}
        assert sorted(op.rejected_decisions(r)) == ([0] if r == 1 else [0, 1])
        assert {v["hash"] for v in op.results(r).values()} == {op.global_manifest(r)["hash"]}
        assert op.read_eval(r) == {"round": r, "by": op.read_eval(r)["by"], "eval_loss": float(r)}
    # Every contribution was merged (none dropped by a forged decision).
    assert contributed == {(r, s) for r in range(1, rounds + 1) for s in KEYS}
    passed = {(e["round"], e["slot"]) for e in op.events(list(KEYS)) if e["kind"] == "rejected-decision"}
    assert passed == {(1, 0), (2, 0), (2, 1), (3, 0), (3, 1)}


# -- evals --------------------------------------------------------------------------------


def test_a_signed_eval_is_read(parties):
    parties.node("a").put_eval(4, {"eval_loss": 2.5, "by": "a"})
    assert parties.operator.read_eval(4) == {"round": 4, "by": "a", "eval_loss": 2.5}
    assert parties.operator.read_eval(5) is None


@pytest.mark.parametrize("forge", ["unsigned", "not a member", "b as a", "another round", "a string"])
def test_a_forged_eval_is_not_reported(parties, forge):
    body = {"eval_loss": 0.01, "by": "a", "round": 4}
    record = {"unsigned": body, "not a member": MALLORY.sign("eval", dict(body, by="mallory")),
              "b as a": KEYS["b"].sign("eval", body),
              "another round": KEYS["a"].sign("eval", dict(body, round=3)),
              "a string": KEYS["a"].sign("eval", dict(body, eval_loss="0.01"))}[forge]
    parties.forger.put_json(f"global/{round_key(4)}/eval.json", record)
    assert parties.operator.read_eval(4) is None
    assert parties.node("b").read_eval(4) is None


def test_without_a_control_key_a_plain_eval_is_read(parties):
    keyless = RunStore(parties.url, control=None, site_key=None, member_key=None)
    keyless.put_eval(4, {"eval_loss": 2.5, "by": "a"})
    assert keyless.read_eval(4) == {"round": 4, "by": "a", "eval_loss": 2.5}
