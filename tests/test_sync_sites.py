"""DiLoCo with several sites training in threads through one run store
(geotrain/sync/diloco.py, rounds.py).

Two sites end every round with bit-identical global parameters, with and without
overlap; the background exchange with no delay is plain DiLoCo written out by hand;
overlap alone at outer lr 1 tracks no overlap; rounds by wall time let a slow site count
less without stalling the round; with state every k rounds a joiner replays the rounds
between and lands on the same bits.

    python -m pytest tests/test_sync_sites.py -q
"""

import threading
import time

import pytest
import torch

from geotrain.store import RunStore
from geotrain.sync import compression
from geotrain.sync.diloco import (DiLoCo, RoundExchange, model_params, outer_step, params_hash,
                                  weighted_mean)
from geotrain.train.model import build
from tests.sync_helpers import CFG, assert_same_training, batch, commit_start, run_sites, train_step

# A guard against a hang, not a speed limit: nothing here waits on how fast the machine is.
pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)


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
