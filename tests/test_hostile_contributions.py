"""Contributions are checked before any work is sized by them (issue 12).

A writer with only store access drops contributions into open rounds: from a
name that is not a site of the run, from member names (a migrated member
`a~k`) with NaN or 1e30 tokens, wrong shapes, unknown tensor names, a
decompression bomb, a top-k payload declaring a huge count, a 1e6x update.
Every one is rejected with a reason (decision and event), no site crashes,
both sites end every round bit-identical — and equal to a clean run, since a
rejected contribution changes nothing. Then one unit test per check.

    python -m pytest tests/test_hostile_contributions.py -q
"""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib

import pytest
import torch

from geotrain.store import RunStore
from geotrain.sync import compression
from geotrain.sync.diloco import RoundExchange, model_params
from geotrain.sync.rounds import MAX_TOKENS, member_base
from geotrain.train.model import build
from tests.sync_helpers import CFG, commit_start, run_sites

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

NONE = compression.make_codec("none")


def raw_payload(header: bytes, body: bytes = b"") -> bytes:
    """A payload with a valid prefix and checksum around any header bytes."""
    z = zlib.compress(header, 9)
    crc = zlib.crc32(body, zlib.crc32(z))
    return struct.pack("<3sBII", b"GTC", 1, len(z), crc) + z + body


def bomb(entries: list, body: bytes, spaces: int) -> bytes:
    """A valid header padded with `spaces` bytes of JSON whitespace: tiny on the
    wire, `spaces` bytes once inflated."""
    head = json.dumps({"codec": "none", "block": 64, "chunk": 4096, "k": 41, "t": entries})
    return raw_payload(head.encode() + b" " * spaces, body)


def topk_declaring(name: str, numel: int, chunk: int = 65536) -> bytes:
    """A consistent top-k payload (k = 1 per chunk, 4-bit) for a tensor of
    `numel` values: ~5 bytes per chunk on the wire, 4 x chunk bytes per chunk
    once decoded."""
    nc = -(-numel // chunk)
    head = json.dumps({"codec": "topk", "block": 64, "chunk": chunk, "k": 1,
                       "t": [[name, [numel], "k4"]]}).encode()
    body = (struct.pack("<h", 0x3F80) * nc                 # bf16 scale 1.0
            + b"\x00\x00" * nc + b"\x00" * (-(-nc // 2)))  # index 0, code 0
    return raw_payload(head, body)


def spec_of(model) -> dict:
    return {n: (tuple(p.shape), torch.float32) for n, p in model.named_parameters()}


# ---- two sites and a hostile writer -------------------------------------------------

ROUNDS, H = 4, 3
BATCH = {"a": 4, "b": 2}   # run_sites' batch sizes: tokens per step = batch x 16


def hostile_contributions(params: dict[str, torch.Tensor]) -> dict[str, tuple[bytes, dict]]:
    """name -> (payload, manifest fields) of every kind of bad contribution to a model
    with these parameters."""
    good = {n: torch.full_like(t, 1e-4) for n, t in params.items()}
    big = {n: torch.full_like(t, 1e2) for n, t in params.items()}       # 1e6 x good
    first = sorted(params)[0]
    wrong_shapes = dict(good, **{first: torch.zeros(params[first].shape[0] + 3,
                                                    *params[first].shape[1:])})
    unknown = dict(good, **{"evil.weight": torch.zeros(8)})
    entries = [[n, list(params[n].shape), "f32"] for n in sorted(params)]
    body = b"".join(good[n].numpy().tobytes() for n in sorted(params))
    ok = {"tokens": 64, "codec": "none"}
    return {
        # The intruder: a non-member with the wrong shapes.
        "mallory": (NONE.encode(wrong_shapes), ok),
        "a~7": (NONE.encode(good), {"tokens": float("nan"), "codec": "none"}),
        "b~7": (NONE.encode(good), {"tokens": 1e30, "codec": "none"}),
        "a~8": (NONE.encode(wrong_shapes), ok),
        "a~9": (NONE.encode(unknown), ok),
        "b~8": (bomb(entries, body, 4 << 20), ok),
        "b~9": (topk_declaring(first, 1 << 26), ok),
        "b~6": (NONE.encode(big), ok),
    }


def train_two_sites(url: str, hostile: bool) -> dict:
    store = RunStore(url)
    model = build(CFG, seed=0)
    commit_start(store, model)
    bad = hostile_contributions(model_params(model)) if hostile else {}
    done = threading.Event()

    def writer() -> None:
        # Only store access: drop everything into each round while it is open
        # (round r once round r-1 is decided, i.e. while the sites train r).
        r = 1
        while r <= ROUNDS and not done.is_set():
            if r == 1 or store.members(r - 1) is not None:
                for name, (payload, meta) in bad.items():
                    store.put_contribution(r, name, payload, dict(meta, published_at=time.time()))
                r += 1
            time.sleep(0.01)

    thread = threading.Thread(target=writer, daemon=True)
    if hostile:
        thread.start()
    try:
        out = run_sites(url, {"a": (10, BATCH["a"]), "b": (20, BATCH["b"])}, ROUNDS, H,
                        roster=["a", "b"],
                        max_tokens={s: 2 * H * b * 16 for s, b in BATCH.items()})
    finally:
        done.set()
        if hostile:
            thread.join(10)
    return out


def test_hostile_contributions_are_rejected_and_change_nothing(tmp_path):
    clean = train_two_sites("file://" + str(tmp_path / "clean"), hostile=False)
    url = "file://" + str(tmp_path / "hostile")
    out = train_two_sites(url, hostile=True)
    store = RunStore(url)

    a, b = out["a"]["history"], out["b"]["history"]
    assert [r.round for r in a] == [r.round for r in b] == list(range(1, ROUNDS + 1))
    assert [r.hash for r in a] == [r.hash for r in b]             # bit-identical sites
    assert out["a"]["global"] == out["b"]["global"]
    # Rejected contributions change nothing: every round equals the clean run's.
    assert [r.hash for r in a] == [r.hash for r in clean["a"]["history"]]
    assert out["a"]["final"] == clean["a"]["final"]
    assert store.committed_rounds() == list(range(ROUNDS + 1))

    reasons: dict[str, set[str]] = {}
    for r in range(1, ROUNDS + 1):
        decision = store.members(r)
        assert sorted(e["site"] for e in decision["accepted"]) == ["a", "b"]
        assert all(h["hash"] == store.global_manifest(r)["hash"] for h in store.results(r).values())
        for e in decision["rejected"]:
            reasons.setdefault(e["site"], set()).add(e["reason"])
    expect = {"mallory": "not a site of this run", "a~7": "not a finite number",
              "b~7": "the most b can train", "a~8": "has shape", "a~9": "not one of the model's",
              "b~8": "decompression bomb", "b~9": "has shape", "b~6": "median"}
    assert set(reasons) == set(expect), reasons
    for site, words in expect.items():
        assert all(words in why for why in reasons[site]), (site, reasons[site])
    events = [e for e in store.events(["a", "b"]) if e["kind"] == "rejected"]
    assert {e["site"] for e in events} == set(expect)
    assert all(e["reason"] and e["reason"] in e["message"] for e in events)


# ---- one check at a time --------------------------------------------------------------

def publish(store, r, site, delta, **meta):
    payload = NONE.encode(delta)
    store.put_contribution(r, site, payload, {"tokens": 16, "codec": "none",
                                              "published_at": time.time(), **meta})


def decide(store, r, **kw):
    decision, won = RoundExchange(store, "a", **kw).decide(r)
    assert won
    return ({e["site"] for e in decision["accepted"]},
            {e["site"]: e["reason"] for e in decision["rejected"]})


def test_only_sites_of_the_run_and_their_migrated_members_count(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    for s in ("a", "b", "a~1", "b~12", "c", "a~0", "a~x", "ab", "a~1~2"):
        publish(store, 1, s, {"w": torch.ones(3)})
    accepted, rejected = decide(store, 1, roster=["a", "b"])
    assert accepted == {"a", "b", "a~1", "b~12"}
    assert set(rejected) == {"c", "a~0", "a~x", "ab", "a~1~2"}
    assert all("not a site of this run" in why for why in rejected.values())
    assert member_base("b~12") == "b" and member_base("b") == "b"
    # Without a roster (a user's own script) anyone counts, as before.
    publish(store, 2, "c", {"w": torch.ones(3)})
    assert decide(store, 2)[0] == {"c"}


def test_non_members_do_not_start_the_rounds_clock(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    store.alive("b", "training", training_round=1)
    # A non-member's manifest claiming it was published long ago would otherwise
    # end the wait for b at once.
    publish(store, 1, "mallory", {"w": torch.ones(3)}, published_at=0)
    publish(store, 1, "a", {"w": torch.ones(3)})
    ex = RoundExchange(store, "a", roster=["a", "b"], window_s=3600, liveness_s=3600, poll_s=0.01)
    stop_at = time.monotonic() + 1.0
    with pytest.raises(Exception, match="stopped while waiting"):
        ex.decide(1, should_stop=lambda: time.monotonic() > stop_at)


@pytest.mark.parametrize("tokens, words", [
    (float("nan"), "not a finite number"), (float("inf"), "not a finite number"),
    (0, "not a finite number"), (-5, "not a finite number"), ("16", "not a number"),
    (None, "not a number"), (True, "not a number"), (1e30, "the most a can train"),
    (10 ** 400, "out of range"), (97, "the most a can train")])
def test_token_counts_must_be_finite_positive_and_bounded(tmp_path, tokens, words):
    store = RunStore("file://" + str(tmp_path))
    publish(store, 1, "b", {"w": torch.ones(3)}, tokens=16)
    publish(store, 1, "a", {"w": torch.ones(3)}, tokens=tokens)
    accepted, rejected = decide(store, 1, roster=["a", "b"], max_tokens={"a": 96, "b": 96})
    assert accepted == {"b"} and words in rejected["a"], rejected


def test_the_absolute_token_cap_applies_without_a_step_bound(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    publish(store, 1, "a", {"w": torch.ones(3)}, tokens=MAX_TOKENS)
    publish(store, 1, "b", {"w": torch.ones(3)}, tokens=MAX_TOKENS * 10)
    accepted, rejected = decide(store, 1)
    assert accepted == {"a"} and "the most b can train" in rejected["b"]


def test_a_garbled_manifest_is_rejected_not_a_crash(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    publish(store, 1, "a", {"w": torch.ones(3)})
    publish(store, 1, "b", {"w": torch.ones(3)}, published_at="yesterday")
    store.put("rounds/000001/c.bin", b"x")
    store.put("rounds/000001/c.json", b"[1, 2]")
    store.put("rounds/000001/d.bin", b"x")
    store.put("rounds/000001/d.json", b"{not json")
    accepted, rejected = decide(store, 1)
    assert accepted == {"a", "b"}
    assert "not a JSON object" in rejected["c"] and set(rejected) == {"c", "d"}


def test_contributions_must_have_the_models_names_shapes_and_dtypes(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    ex = RoundExchange(store, "a")
    ex.expect({"w": ((2, 3), torch.float32), "b": ((3,), torch.float32)})
    good = {"w": torch.ones(2, 3), "b": torch.ones(3)}
    publish(store, 1, "a", good)
    publish(store, 1, "shape", {"w": torch.ones(3, 2), "b": torch.ones(3)})
    publish(store, 1, "extra", dict(good, evil=torch.ones(1)))
    publish(store, 1, "missing", {"w": torch.ones(2, 3)})
    decision, _ = ex.decide(1)
    rejected = {e["site"]: e["reason"] for e in decision["rejected"]}
    assert [e["site"] for e in decision["accepted"]] == ["a"]
    assert "has shape [3, 2]" in rejected["shape"]
    assert "not one of the model's" in rejected["extra"]
    assert "missing" in rejected["missing"]
    # The exchange's own check covers dtypes (and a decode that bypasses the codec's).
    with pytest.raises(Exception, match="float16"):
        ex._check_tensors({"w": torch.ones(2, 3, dtype=torch.float16), "b": torch.ones(3)}, 1)


def test_a_decompression_bomb_is_rejected_before_it_inflates():
    body = torch.ones(4).numpy().tobytes()
    assert compression.decode(bomb([["w", [4], "f32"]], body, 1000))["w"].tolist() == [1.0] * 4
    payload = bomb([["w", [4], "f32"]], body, 32 << 20)
    assert len(payload) < 100_000
    with pytest.raises(compression.CodecError, match="decompression bomb"):
        compression.decode(payload)
    # With the model's spec the limit is far smaller: ~2x its header.
    small = bomb([["w", [4], "f32"]], body, 64 << 10)
    with pytest.raises(compression.CodecError, match="decompression bomb"):
        compression.decode(small, {"w": (4,)})


def test_a_topk_payload_cannot_expand_beyond_the_model(tmp_path):
    payload = topk_declaring("w", 1 << 20)   # ~150 bytes for 4 MiB once decoded
    assert compression.decode(payload)["w"].numel() == 1 << 20
    with pytest.raises(compression.CodecError, match=r"has shape \[1048576\]"):
        compression.decode(payload, {"w": (4,)})
    with pytest.raises(compression.CodecError, match="values in all"):
        compression.decode(payload, max_numel=1000)
    # Through the exchange: rejected before the outer step, with a reason.
    store = RunStore("file://" + str(tmp_path))
    ex = RoundExchange(store, "a")
    ex.expect({"w": ((4,), torch.float32)})
    publish(store, 1, "a", {"w": torch.ones(4)})
    store.put_contribution(1, "b", payload, {"tokens": 16, "published_at": time.time()})
    decision, _ = ex.decide(1)
    assert [e["site"] for e in decision["accepted"]] == ["a"]
    assert "has shape" in decision["rejected"][0]["reason"]


def test_an_oversize_declared_count_is_refused_without_allocating():
    # 2^31 + 2^16 values (8 GiB as fp32) in a 160 KB payload: over MAX_NUMEL.
    payload = topk_declaring("w", (1 << 31) + (1 << 16))
    assert len(payload) < 200_000
    with pytest.raises(compression.CodecError, match="values in all"):
        compression.decode(payload)


def run_rounds(store, norms_a, norms_b, tokens_a=None, **kw):
    """Publish a and b with these norms round after round; each round's decision."""
    out = []
    for r, (na, nb) in enumerate(zip(norms_a, norms_b), start=1):
        ta = 16 if tokens_a is None else tokens_a[r - 1]
        publish(store, r, "a", {"w": torch.full((4,), na / 2)}, tokens=ta)  # norm of 4 x v/2 = v
        publish(store, r, "b", {"w": torch.full((4,), nb / 2)})
        decision, _ = RoundExchange(store, "a", **kw).decide(r)
        out.append(decision)
    return out


def test_a_sudden_jump_is_rejected_with_two_sites(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    decisions = run_rounds(store, [1.0, 0.9, 0.8, 1e6, 0.7], [1.1, 1.0, 0.9, 0.8, 0.7])
    last = decisions[3]
    assert [e["site"] for e in last["accepted"]] == ["b"]
    assert "median" in last["rejected"][0]["reason"] and "from a" in last["rejected"][0]["reason"]
    # The decision records each site's last accepted norms; the jump is not among them.
    assert [n for n, _ in last["norms"]["a"]] == pytest.approx([1.0, 0.9, 0.8])
    assert [e["site"] for e in decisions[4]["accepted"]] == ["a", "b"]
    events = [e for e in store.events(["a"]) if e["kind"] == "rejected"]
    assert [(e["site"], e["round"]) for e in events] == [("a", 4)]


def test_first_contributions_warmup_and_decline_are_never_rejected(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    # The smallest factor a recipe allows: the floor (4) is what protects warmup.
    # a: a huge first contribution (no history yet), then linear lr warmup
    # (round k's mean lr ~ k - 1/2: 3x, 1.7x, ... the previous), then lr decay
    # and a short (drained) round: 100x smaller each round.
    a = [1e3, 3e3, 5e3, 7e3, 9e3, 11e3, 13e3, 1.3e2, 1.3, 1.3e-2]
    b = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 6.5e-2, 6.5e-4, 6.5e-6]
    for d in run_rounds(store, a, b, reject_norm_factor=1.01):
        assert [e["site"] for e in d["accepted"]] == ["a", "b"], d["rejected"]


def test_a_longer_round_is_not_a_jump(tmp_path):
    # round_seconds: a first round cut short by start-up (10 steps), then full
    # rounds (100 steps): 10x the norm, but the same norm per token.
    store = RunStore("file://" + str(tmp_path))
    d = run_rounds(store, [0.1, 1.0, 1.0], [1.0, 1.0, 1.0], tokens_a=[10, 100, 100])
    assert all([e["site"] for e in x["accepted"]] == ["a", "b"] for x in d)
    # A jump with the same tokens is one.
    store = RunStore("file://" + str(tmp_path / "2"))
    d = run_rounds(store, [1.0, 1.0, 1e3], [1.0, 1.0, 1.0], tokens_a=[100, 100, 100])
    assert [e["site"] for e in d[-1]["accepted"]] == ["b"]


def test_the_history_check_uses_the_recipes_factor_when_larger(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    # 8x jump: over the floor (4) but under a factor of 10 -> accepted ...
    d = run_rounds(store, [1.0, 1.0, 8.0], [1.0, 1.0, 1.0], reject_norm_factor=10)
    assert [e["site"] for e in d[-1]["accepted"]] == ["a", "b"]
    # ... and rejected with a factor of 5.
    store = RunStore("file://" + str(tmp_path / "2"))
    d = run_rounds(store, [1.0, 1.0, 8.0], [1.0, 1.0, 1.0], reject_norm_factor=5)
    assert [e["site"] for e in d[-1]["accepted"]] == ["b"]


def test_merge_skips_an_accepted_entry_that_fails_the_checks(tmp_path):
    """A decision written by anyone (not only a checking decider) cannot feed the
    outer step NaN or huge tokens: every site skips the same entries."""
    store = RunStore("file://" + str(tmp_path))
    publish(store, 1, "a", {"w": torch.ones(4)})
    ex = RoundExchange(store, "a", roster=["a", "b"])
    decision, _ = ex.decide(1)
    entry = decision["accepted"][0]
    forged = dict(decision, accepted=[dict(entry, tokens=float("nan")),
                                      dict(entry, site="mallory", tokens=16.0)])
    parts, _ = RoundExchange(store, "b", roster=["a", "b"]).gather(forged)
    assert parts == []
    skipped = [e for e in store.events(["b"]) if e["kind"] == "rejected"]
    assert {e["site"] for e in skipped} == {"a", "mallory"}
    assert all(e["at_merge"] for e in skipped)
