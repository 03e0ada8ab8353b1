"""Tests of DiLoCo through the run store (geotrain/sync/diloco.py, rounds.py).

Checked against references: one site with H=1, outer lr 1 and no momentum is
plain AdamW; the outer step is hand-written Nesterov SGD and torch's SGD; two
sites in threads end every round with bit-identical global parameters, with
and without overlap; overlap with nothing to wait for is plain DiLoCo.

    python -m pytest tests/test_sync.py -q
"""

import copy
import struct
import threading
import time
import zlib

import pytest
import torch

from geotrain.store import RunStore
from geotrain.sync import compression
from geotrain.sync.diloco import (DiLoCo, RoundExchange, SyncError, decode, encode, model_params,
                                  outer_step, params_hash, weighted_mean)
from geotrain.sync.rounds import ContributionChanged
from geotrain.train.model import build, config_for
from tests.helpers import wait_for

# A guard against a hang, not a speed limit: nothing here waits on how fast the machine is.
pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

CFG = config_for("tiny", 32, n_layer=2, d_model=32, n_head=2)


def batch(gen: torch.Generator, b: int = 4, t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    xy = torch.randint(0, 256, (b, t + 1), generator=gen)
    return xy[:, :-1], xy[:, 1:]


def train_step(model, opt, x, y) -> float:
    _, loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def commit_start(store: RunStore, model) -> str:
    params = model_params(model)
    digest = params_hash(params)
    store.commit_global(0, {"model.safetensors": encode(params)}, {"hash": digest})
    return digest


def rand_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(4, 5, generator=gen), "b": torch.randn(5, generator=gen)}


# ---- one site is plain training -------------------------------------------------

def assert_same_training(name, p, q, step):
    """p == q to 1e-6, except the attention's key bias: its true gradient is zero
    (softmax ignores a constant added to every score of a query), so what it gets
    is float noise that AdamW (eps 1e-8) amplifies from the 1-ulp differences of
    global - (global - local) into ~1e-5 drifts. It gets a loose bound."""
    if name.endswith("attn.qkv.bias"):
        d = CFG.d_model
        assert torch.allclose(p[d:2 * d], q[d:2 * d], atol=1e-4, rtol=0), f"step {step}: {name} (key) diverged"
        p, q = torch.cat([p[:d], p[2 * d:]]), torch.cat([q[:d], q[2 * d:]])
    assert torch.allclose(p, q, atol=1e-6, rtol=0), f"step {step}: {name} diverged"


def test_one_site_h1_is_adamw(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    model = build(CFG, seed=0)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    commit_start(store, model)
    gen = torch.Generator().manual_seed(1)
    hashes = {}
    with DiLoCo(model, opt, RoundExchange(store, "a"), inner_steps=1,
                outer_lr=1.0, outer_momentum=0.0) as diloco:
        for step in range(1, 9):
            x, y = batch(gen)
            train_step(model, opt, x, y)
            train_step(ref, ref_opt, x, y)
            result = diloco.step(tokens=x.numel())
            assert result is not None and result.round == step and diloco.round == step
            for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
                assert_same_training(name, p, q, step)
            params = model_params(model)
            assert result.hash == params_hash(params)  # the model holds the new global state
            hashes[step] = result.hash
    first = model_params(build(CFG, seed=0))
    assert any(not torch.allclose(first[n], params[n], atol=1e-4) for n in params), "nothing trained"
    assert store.committed_rounds() == list(range(9))
    assert len(set(hashes.values())) == 8
    for r, digest in hashes.items():
        files, manifest = store.read_global(r)
        assert manifest["hash"] == digest and manifest["members"] == ["a"]
        assert params_hash(decode(files["model.safetensors"])) == digest
        assert "outer.safetensors" not in files  # no momentum, no outer state
        assert store.results(r) == {"a": {"hash": digest, "site": "a", "round": r}}


def test_enter_without_committed_state_fails(tmp_path):
    model = build(CFG, seed=0)
    exchange = RoundExchange(RunStore("file://" + str(tmp_path)), "a")
    with pytest.raises(SyncError, match="no committed global state"):
        with DiLoCo(model, torch.optim.AdamW(model.parameters()), exchange, inner_steps=1):
            pass


def test_step_syncs_every_h_steps(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    model = build(CFG, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    commit_start(store, model)
    gen = torch.Generator().manual_seed(2)
    results = []
    with DiLoCo(model, opt, RoundExchange(store, "a"), inner_steps=3) as diloco:
        for _ in range(7):
            x, y = batch(gen)
            train_step(model, opt, x, y)
            results.append(diloco.step(tokens=x.numel()))
    assert [r is not None for r in results] == [False, False, True, False, False, True, False]
    assert store.committed_rounds() == [0, 1, 2]
    _, manifest = store.read_contribution(2, "a")
    assert manifest["tokens"] == 3 * 4 * 16 and manifest["inner_steps"] == 3
    files, _ = store.read_global(2)
    assert set(decode(files["outer.safetensors"])) == set(model_params(model))  # momentum saved


# ---- the outer optimizer -----------------------------------------------------------

def reference_outer(theta, grads, lr, mu, nesterov):
    """Nesterov/heavy-ball SGD written out: buf = mu*buf + g; d = g + mu*buf or buf."""
    theta = {n: t.clone() for n, t in theta.items()}
    buf = {n: torch.zeros_like(t) for n, t in theta.items()}
    for g in grads:
        for n in theta:
            buf[n] = mu * buf[n] + g[n]
            d = g[n] + mu * buf[n] if nesterov else buf[n]
            theta[n] = theta[n] - lr * d
    return theta


def torch_sgd(theta, grads, lr, mu, nesterov):
    params = {n: torch.nn.Parameter(t.clone()) for n, t in theta.items()}
    # torch refuses nesterov without momentum; with mu = 0 both are plain SGD
    opt = torch.optim.SGD(params.values(), lr=lr, momentum=mu, nesterov=nesterov and mu > 0)
    for g in grads:
        for n, p in params.items():
            p.grad = g[n].clone()
        opt.step()
    return {n: p.detach() for n, p in params.items()}


@pytest.mark.parametrize("mu,nesterov", [(0.9, True), (0.0, True), (0.5, False)])
def test_outer_step_matches_references(mu, nesterov):
    gen = torch.Generator().manual_seed(3)
    theta0 = rand_tensors(gen)
    grads = [rand_tensors(gen) for _ in range(3)]
    lr = 0.7
    theta = {n: t.clone() for n, t in theta0.items()}
    buf: dict[str, torch.Tensor] = {}
    for g in grads:
        outer_step(theta, g, buf, lr, mu, nesterov)
    expected = reference_outer(theta0, grads, lr, mu, nesterov)
    sgd = torch_sgd(theta0, grads, lr, mu, nesterov)
    for n in theta0:
        assert torch.allclose(theta[n], expected[n], atol=1e-6, rtol=0), n
        assert torch.allclose(theta[n], sgd[n], atol=1e-6, rtol=0), n
        assert not torch.allclose(theta[n], theta0[n], atol=1e-3)
    if mu:
        assert set(buf) == set(theta0)
        g_sum = {n: sum(mu ** (2 - i) * g[n] for i, g in enumerate(grads)) for n in theta0}
        for n in theta0:
            assert torch.allclose(buf[n], g_sum[n], atol=1e-6, rtol=0)
    else:
        assert buf == {}  # no momentum: no state to keep or commit
        for n in theta0:
            plain = theta0[n] - lr * sum(g[n] for g in grads)
            assert torch.allclose(theta[n], plain, atol=1e-6, rtol=0)


def test_nesterov_differs_from_heavy_ball():
    gen = torch.Generator().manual_seed(4)
    theta0, grads = rand_tensors(gen), [rand_tensors(gen) for _ in range(3)]
    a, b = ({n: t.clone() for n, t in theta0.items()} for _ in range(2))
    buf_a, buf_b = {}, {}
    for g in grads:
        outer_step(a, g, buf_a, 0.7, 0.9, True)
        outer_step(b, g, buf_b, 0.7, 0.9, False)
    assert not torch.allclose(a["w"], b["w"], atol=1e-3)


# ---- weighted mean ------------------------------------------------------------------

def test_weighted_mean_weights_by_tokens():
    gen = torch.Generator().manual_seed(5)
    da, db = rand_tensors(gen), rand_tensors(gen)
    out = weighted_mean([("a", da, 100.0), ("b", db, 300.0)])
    for n in da:
        assert torch.allclose(out[n], 0.25 * da[n] + 0.75 * db[n], atol=1e-6, rtol=0)
    equal = weighted_mean([("a", da, 5.0), ("b", db, 5.0)])
    for n in da:
        assert torch.allclose(equal[n], (da[n] + db[n]) / 2, atol=1e-6, rtol=0)
    alone = weighted_mean([("a", da, 7.0)])
    assert all(torch.equal(alone[n], da[n]) for n in da)


def test_weighted_mean_is_bit_identical_in_any_order():
    gen = torch.Generator().manual_seed(6)
    parts = [(s, rand_tensors(gen), w) for s, w in (("c", 3.0), ("a", 1.0), ("b", 7.0))]
    reference = weighted_mean(parts)
    for order in ([0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]):
        out = weighted_mean([parts[i] for i in order])
        assert params_hash(out) == params_hash(reference), order


def test_weighted_mean_triple_weight_counts_three_times():
    gen = torch.Generator().manual_seed(7)
    da, db = rand_tensors(gen), rand_tensors(gen)
    heavy = weighted_mean([("a", da, 3.0), ("b", db, 1.0)])
    copies = weighted_mean([("a1", da, 1.0), ("a2", da, 1.0), ("a3", da, 1.0), ("b", db, 1.0)])
    for n in da:
        assert torch.allclose(heavy[n], copies[n], atol=1e-6, rtol=0)
        assert not torch.allclose(heavy[n], (da[n] + db[n]) / 2, atol=1e-3)


# ---- two sites ----------------------------------------------------------------------

def run_sites(url, specs, rounds, h, overlap=False, exchange_cls=RoundExchange, **exchange_kw):
    """Train sites in threads; specs: {name: (data seed, batch size)}.

    Liveness is not what these runs test: a site counts as alive for 60 s after
    its last beat (not the 4 s default), so a busy machine that delays a beat
    thread cannot make one site decide a round without the other."""
    out: dict[str, dict] = {}
    errors: list[BaseException] = []
    exchange_kw.setdefault("liveness_s", 60.0)

    def site(name: str, seed: int, batch_size: int) -> None:
        try:
            model = build(CFG, seed=0)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            exchange = exchange_cls(RunStore(url), name, poll_s=0.01, **exchange_kw)
            gen = torch.Generator().manual_seed(seed)
            with DiLoCo(model, opt, exchange, inner_steps=h, overlap=overlap) as diloco:
                while diloco.training_round <= rounds:
                    x, y = batch(gen, b=batch_size)
                    train_step(model, opt, x, y)
                    diloco.step(tokens=x.numel())
                diloco.finish()
            out[name] = {"history": diloco.history, "final": params_hash(model_params(model)),
                         "global": params_hash(diloco.global_params)}
        except BaseException as e:  # noqa: BLE001 - re-raised by the main thread
            errors.append(e)

    store = RunStore(url)
    for name in specs:  # both are known to be alive before either finishes a round
        store.alive(name, "starting")
    threads = [threading.Thread(target=site, args=(n, *spec)) for n, spec in specs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)  # the module's pytest timeout is the real limit
    assert not errors, errors[0]
    assert not any(t.is_alive() for t in threads), "a site thread is still running"
    return out


@pytest.mark.parametrize("overlap", [False, True])
def test_two_sites_in_threads_are_bit_identical(tmp_path, overlap):
    url = "file://" + str(tmp_path)
    start = build(CFG, seed=0)
    start_hash = commit_start(RunStore(url), start)
    rounds, h = 4, 3
    out = run_sites(url, {"a": (10, 4), "b": (20, 2)}, rounds, h, overlap=overlap)
    a, b = out["a"]["history"], out["b"]["history"]
    assert [r.round for r in a] == [r.round for r in b] == [1, 2, 3, 4]
    assert [r.hash for r in a] == [r.hash for r in b]
    assert len({start_hash, *(r.hash for r in a)}) == rounds + 1  # every round moved the model
    assert out["a"]["global"] == out["b"]["global"] == a[-1].hash
    if not overlap:  # without overlap the model ends exactly on the global state
        assert out["a"]["final"] == out["b"]["final"] == a[-1].hash
    assert all(r.members == ["a", "b"] for r in a)
    assert a[0].bytes_received == b[0].bytes_sent > 0

    store = RunStore(url)
    assert store.committed_rounds() == [0, 1, 2, 3, 4]
    for res in a:
        results = store.results(res.round)
        assert set(results) == {"a", "b"}
        assert results["a"]["hash"] == results["b"]["hash"] == res.hash
        assert store.read_global(res.round)[1]["hash"] == res.hash
        assert store.members(res.round)["decided_by"] in ("a", "b")

    # Round 1 by hand from what the store holds: tokens 4*16 vs 2*16 per step.
    parts = []
    for s in ("a", "b"):
        payload, manifest = store.read_contribution(1, s)
        parts.append((s, compression.decode(payload), float(manifest["tokens"])))
    assert [p[2] for p in parts] == [h * 4 * 16, h * 2 * 16]
    theta = model_params(start)
    outer_step(theta, weighted_mean(parts), {}, 0.7, 0.9, True)
    assert params_hash(theta) == a[0].hash


def plain_diloco(rounds, h, seed, lr_outer, mu):
    """Reference DiLoCo for one site, written out with no store and no threads."""
    model = build(CFG, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    theta, buf = model_params(model), {}
    gen = torch.Generator().manual_seed(seed)
    hashes = []
    for _ in range(rounds):
        for _ in range(h):
            x, y = batch(gen)
            train_step(model, opt, x, y)
        local = model_params(model)
        outer_step(theta, {n: theta[n] - local[n] for n in theta}, buf, lr_outer, mu, True)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(theta[n])
        hashes.append(params_hash(theta))
    return hashes


def test_exchange_thread_with_no_delay_is_plain_diloco(tmp_path):
    """The background exchange, with instant transfers and zero delay, gives
    bit for bit what plain DiLoCo written out by hand gives."""
    url = "file://" + str(tmp_path)
    commit_start(RunStore(url), build(CFG, seed=0))
    out = run_sites(url, {"a": (3, 4)}, rounds=4, h=2, overlap=0)
    assert [r.hash for r in out["a"]["history"]] == plain_diloco(4, 2, 3, 0.7, 0.9)


def test_overlap_alone_at_outer_lr_1_tracks_no_overlap(tmp_path):
    """One site, outer lr 1, no momentum: each merge lands exactly where the site
    already is, so applying it a round late must not change the trajectory."""
    runs = {}
    for overlap in (False, True):
        url = "file://" + str(tmp_path / str(overlap))
        model = build(CFG, seed=0)
        commit_start(RunStore(url), model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(4)
        with DiLoCo(model, opt, RoundExchange(RunStore(url), "a"), inner_steps=3,
                    outer_lr=1.0, outer_momentum=0.0, overlap=overlap) as diloco:
            while diloco.training_round <= 5:
                x, y = batch(gen)
                train_step(model, opt, x, y)
                diloco.step(tokens=x.numel())
            diloco.finish()
        runs[overlap] = model_params(model)
        assert diloco.round == 5 and RunStore(url).committed_rounds() == list(range(6))
    for n in runs[False]:
        assert_same_training(n, runs[False][n], runs[True][n], "end")


# ---- membership, late work, rejection ----------------------------------------------

def publish(store, r, site, delta, tokens=16.0):
    RoundExchange(store, site).publish(r, delta, tokens=tokens, steps=1, base_round=r - 1)


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


# ---- a round window expiring; a contribution changed after it was accepted ---------

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


# ---- encoding -------------------------------------------------------------------

def test_encode_decode_round_trip_is_exact():
    gen = torch.Generator().manual_seed(8)
    tensors = {"w": torch.randn(3, 7, generator=gen), "b": torch.randn(7, generator=gen),
               "tiny": torch.tensor([1e-45, -0.0, float("inf")]),
               "strided": torch.randn(6, 4, generator=gen).t()}
    back = decode(encode(tensors))
    assert set(back) == set(tensors)
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and back[n].shape == t.shape
        assert torch.equal(back[n].view(torch.int32), t.contiguous().view(torch.int32)), n
    assert params_hash(back) == params_hash(tensors)


def test_params_hash_sees_one_ulp():
    gen = torch.Generator().manual_seed(9)
    tensors = {"w": torch.randn(8, 8, generator=gen), "b": torch.randn(8, generator=gen)}
    digest = params_hash(tensors)
    assert params_hash({n: t.clone() for n, t in tensors.items()}) == digest
    nudged = {n: t.clone() for n, t in tensors.items()}
    nudged["w"][3, 5] = torch.nextafter(nudged["w"][3, 5], torch.tensor(float("inf")))
    assert not torch.equal(nudged["w"], tensors["w"])
    assert params_hash(nudged) != digest
    # names count too: the same bytes under another name are another model
    assert params_hash({"v": tensors["w"], "b": tensors["b"]}) != digest


class SiteClocks:
    """A monotonic clock per thread, for DiLoCo's round timer: each site's clock
    moves only when the site says a step took so long. Rounds by wall time then
    end after exactly the steps the site's speed allows, on any machine.
    Threads without a clock of their own (the exchange, the beats) see real time."""

    def __init__(self):
        self._local = threading.local()

    def start(self) -> None:
        self._local.now = 0.0

    def advance(self, seconds: float) -> None:
        self._local.now += seconds

    def monotonic(self) -> float:
        now = getattr(self._local, "now", None)
        return time.monotonic() if now is None else now

    def __getattr__(self, name):  # time.time, time.sleep, ...: the real ones
        return getattr(time, name)


def test_rounds_by_wall_time_let_a_slow_site_count_less_not_stall(tmp_path, monkeypatch):
    """sync.round_seconds: a fast and a slow site end every round together; the
    slow one trains fewer steps and its contribution weighs its tokens.

    Each site's round timer reads its own clock, moved by what each step costs
    that site (fast 0.125 s, slow 0.5 s: exact in binary), so with 1 s rounds
    the fast site trains exactly 8 steps a round and the slow one 2, however
    fast or busy the machine running the test is."""
    from geotrain.sync import diloco as diloco_module

    clocks = SiteClocks()
    monkeypatch.setattr(diloco_module, "time", clocks)
    url = "file://" + str(tmp_path)
    start = build(CFG, seed=0)
    commit_start(RunStore(url), start)
    out, errors = {}, []
    step_cost = {"fast": 0.125, "slow": 0.5}

    def site(name: str) -> None:
        try:
            clocks.start()
            model = build(CFG, seed=0)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            gen = torch.Generator().manual_seed(len(name))
            ex = RoundExchange(RunStore(url), name, poll_s=0.01, liveness_s=60.0)
            with DiLoCo(model, opt, ex, inner_steps=None, round_seconds=1.0) as diloco:
                while diloco.training_round <= 4:
                    x, y = batch(gen)
                    train_step(model, opt, x, y)
                    clocks.advance(step_cost[name])
                    diloco.step(tokens=x.numel())
                diloco.finish()
            out[name] = diloco.history
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    store = RunStore(url)
    for s in ("fast", "slow"):
        store.alive(s, "starting")
    threads = [threading.Thread(target=site, args=(s,)) for s in ("fast", "slow")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors, errors[0]
    assert [r.hash for r in out["fast"]] == [r.hash for r in out["slow"]]
    assert [r.round for r in out["fast"]] == [1, 2, 3, 4]
    for r in range(1, 5):
        meta = {s: store.contribution_meta(r, s) for s in ("fast", "slow")}
        assert {s: m["inner_steps"] for s, m in meta.items()} == {"fast": 8, "slow": 2}, r
        assert {s: m["tokens"] for s, m in meta.items()} == {"fast": 8 * 4 * 16, "slow": 2 * 4 * 16}, r
        assert {e["site"] for e in store.members(r)["accepted"]} == {"fast", "slow"}
    # Round 1 by hand: weights are the tokens each trained, not one vote per site.
    parts = [(s, compression.decode(store.read_contribution(1, s)[0]),
              store.contribution_meta(1, s)["tokens"]) for s in ("fast", "slow")]
    theta = model_params(start)
    outer_step(theta, weighted_mean(parts), {}, 0.7, 0.9, True)
    assert params_hash(theta) == out["fast"][0].hash


def test_state_every_k_rounds_and_a_joiner_replays_the_rounds_between(tmp_path):
    """With state_every=3 the rounds between commit only their hash; a site that
    joins replays them from the contributions and lands on the same bits."""
    url = "file://" + str(tmp_path)
    commit_start(RunStore(url), build(CFG, seed=0))
    out = run_sites(url, {"a": (1, 4), "b": (2, 4)}, rounds=4, h=2, state_every=3, final_round=8)
    hashes = {r.round: r.hash for r in out["a"]["history"]}
    store = RunStore(url)
    assert store.committed_rounds() == [0, 1, 2, 3, 4]
    holds_state = {r: "model.safetensors" in store.read_global(r)[0] for r in range(5)}
    assert holds_state == {0: True, 1: False, 2: False, 3: True, 4: False}
    assert all(store.global_manifest(r)["hash"] == hashes[r] for r in range(1, 5))
    assert store.latest_global() == 4 and store.latest_state() == 3

    exchange = RoundExchange(store, "c", poll_s=0.01, state_every=3, final_round=8)
    joiner = DiLoCo(build(CFG, seed=5), torch.optim.AdamW(build(CFG, seed=5).parameters()),
                    exchange, inner_steps=2, liveness=False)
    joiner._catch_up()
    assert joiner.round == 4 and params_hash(joiner.global_params) == hashes[4]
    assert joiner.training_round == 5

    # The last round always holds the state (the run's final model is read from it).
    assert exchange.commits_state(8) and exchange.commits_state(9) and not exchange.commits_state(7)
