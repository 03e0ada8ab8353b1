"""Fragment sync, `sync.fragments` (geotrain/sync/fragments.py): each round syncs one
part of the model in turn.

The partition is balanced, contiguous and deterministic; P = 1 is plain DiLoCo bit
for bit; with P = 2 and 3 every site ends every round on the same bits, a round
moves only its fragment, each payload holds only its fragment (about 1/P of the
bytes), a joiner replays the rounds and lands on the same bits; a contribution
with the wrong tensors is rejected with a reason; norms are compared per fragment;
the recipe refuses 0 and the plan divides the bytes.

    python -m pytest tests/test_fragments.py -q
"""

import sys
from pathlib import Path

import pytest
import torch

from geotrain.recipe import RecipeError, loads
from geotrain.store import RunStore
from geotrain.sync import compression
from geotrain.sync.diloco import (DiLoCo, RoundExchange, decode, model_params, outer_step,
                                  params_hash, weighted_mean)
from geotrain.sync.fragments import Fragments, partition
from geotrain.train.model import build
from tests.helpers import geotrain_home  # noqa: F401
from tests.sync_helpers import (CFG, assert_same_training, batch, commit_start, publish, run_sites,
                                train_step)

# A guard against a hang, not a speed limit: nothing here waits on how fast the machine is.
pytestmark = pytest.mark.timeout(180)
torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


def sizes_of(model) -> list[tuple[str, int]]:
    return [(n, p.numel()) for n, p in model.named_parameters()]


# ---- the partition ------------------------------------------------------------------

def test_partition_is_contiguous_balanced_and_deterministic():
    equal = [(f"t{i}", 10) for i in range(8)]
    assert partition(equal, 4) == [("t0", "t1"), ("t2", "t3"), ("t4", "t5"), ("t6", "t7")]
    assert partition(equal, 1) == [tuple(n for n, _ in equal)]
    # One big tensor is a fragment of its own; the small ones share the rest.
    assert partition([("big", 100), ("a", 30), ("b", 30), ("c", 40)], 2) == [("big",), ("a", "b", "c")]
    # Every fragment takes one tensor at least, even when sizes would say otherwise.
    assert partition([("a", 1000), ("b", 1), ("c", 1)], 3) == [("a",), ("b",), ("c",)]

    model = build(CFG, seed=0)
    sizes = sizes_of(model)
    total, largest = sum(s for _, s in sizes), max(s for _, s in sizes)
    for p in (1, 2, 3, 5, len(sizes)):
        parts = partition(sizes, p)
        assert len(parts) == p and all(parts)
        assert [n for part in parts for n in part] == [n for n, _ in sizes]  # each once, in order
        numel = dict(sizes)
        for part in parts:  # balanced: off the even share by less than one tensor
            assert abs(sum(numel[n] for n in part) - total / p) <= largest
        # The same on every site: from the names and sizes only, not the values.
        assert Fragments.of_model(build(CFG, seed=7), p).parts == Fragments(sizes, p).parts
    f = Fragments(sizes, 3)
    assert [f.index(r) for r in range(1, 8)] == [0, 1, 2, 0, 1, 2, 0]
    assert f.names(4) == f.parts[0] and f.norm_key("a", 2) == "a#1"
    assert Fragments(sizes, 1).norm_key("a", 2) == "a"


def test_more_fragments_than_tensors_is_a_clear_error(tmp_path):
    model = build(CFG, seed=0)
    n = len(list(model.parameters()))
    with pytest.raises(ValueError, match=f"{n + 1} fragments, but the model has only {n} tensors"):
        DiLoCo(model, torch.optim.AdamW(model.parameters()), None, inner_steps=2, fragments=n + 1)
    with pytest.raises(ValueError, match="must be >= 1"):
        partition([("a", 1)], 0)


# ---- the merge ----------------------------------------------------------------------

def test_weighted_mean_divides_each_tensor_by_the_weight_of_the_parts_that_hold_it():
    gen = torch.Generator().manual_seed(0)
    parts = [(k, {"x": torch.randn(50, generator=gen), "y": torch.randn(7, generator=gen)}, w)
             for k, w in (("b", 3.0), ("a", 1.5), ("c", 0.7))]
    # Every part holds every tensor: the same floats as the one total of all weights.
    ordered = sorted(parts, key=lambda p: p[0])
    total = sum(w for _, _, w in ordered)
    for name in ("x", "y"):
        ref = None
        for _, d, w in ordered:
            s = d[name] * (w / total)
            ref = s if ref is None else ref + s
        assert torch.equal(weighted_mean(parts)[name], ref)
    # Parts of different fragments (a carried contribution of another one).
    mixed = [("1/a", {"x": torch.full((2,), 2.0)}, 1.0), ("1/b", {"x": torch.full((2,), 4.0)}, 3.0),
             ("0/a", {"y": torch.full((3,), 5.0)}, 2.0)]
    out = weighted_mean(mixed)
    assert out["x"].tolist() == [3.5, 3.5] and out["y"].tolist() == [5.0] * 3


# ---- one site against a reference written out by hand -------------------------------

def streaming_reference(rounds, h, seed, fragments):
    """Fragment-sync DiLoCo for one site with no store and no threads: round r
    sends start - local for its fragment only; those tensors take the global
    state, the others keep training from where they are."""
    model = build(CFG, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    frag = Fragments(sizes_of(model), fragments)
    theta, buf, start = model_params(model), {}, model_params(model)
    gen = torch.Generator().manual_seed(seed)
    hashes = []
    for r in range(1, rounds + 1):
        for _ in range(h):
            x, y = batch(gen)
            train_step(model, opt, x, y)
        local = model_params(model)
        names = frag.names(r)
        outer_step(theta, {n: start[n] - local[n] for n in theta if n in names}, buf, 0.7, 0.9, True)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in names:
                    p.copy_(theta[n])
                    start[n] = theta[n].clone()
        hashes.append(params_hash(theta))
    return hashes


@pytest.mark.parametrize("fragments", [1, 3])
def test_one_site_matches_the_reference_bit_for_bit(tmp_path, fragments):
    url = "file://" + str(tmp_path)
    commit_start(RunStore(url), build(CFG, seed=0))
    out = run_sites(url, {"a": (3, 4)}, rounds=6, h=2, fragments=fragments)
    assert [r.hash for r in out["a"]["history"]] == streaming_reference(6, 2, 3, fragments)


def test_overlap_at_outer_lr_1_tracks_no_overlap(tmp_path):
    """One site, outer lr 1, no momentum: a fragment's merge lands where the site
    was when it published, and the other tensors' global state did not move, so
    landing a round late must change nothing: no tensor's local progress is
    pulled back to an old global value. Copies kept as offload keeps them (buffers
    written in place) give the same bits as fresh ones."""
    runs = {}
    for overlap, offload in ((False, False), (True, False), (False, True), (True, True)):
        url = "file://" + str(tmp_path / f"{overlap}-{offload}")
        model = build(CFG, seed=0)
        commit_start(RunStore(url), model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(4)
        with DiLoCo(model, opt, RoundExchange(RunStore(url), "a"), inner_steps=3, outer_lr=1.0,
                    outer_momentum=0.0, overlap=overlap, offload=offload, fragments=3) as diloco:
            while diloco.training_round <= 6:
                x, y = batch(gen)
                train_step(model, opt, x, y)
                diloco.step(tokens=x.numel())
            diloco.finish()
        runs[overlap, offload] = model_params(model)
    for overlap in (False, True):
        assert params_hash(runs[overlap, False]) == params_hash(runs[overlap, True])
    for n in runs[False, False]:
        assert_same_training(n, runs[False, False][n], runs[True, False][n], "end")


# ---- sites in threads ---------------------------------------------------------------

def contribution_names(store, r, site) -> set[str]:
    return set(compression.decode(store.read_contribution(r, site)[0]))


@pytest.mark.parametrize("fragments, sites, overlap", [(2, 2, False), (3, 3, True)])
def test_sites_agree_every_round_and_each_round_moves_its_fragment(tmp_path, fragments, sites,
                                                                   overlap):
    url = "file://" + str(tmp_path)
    start = build(CFG, seed=0)
    commit_start(RunStore(url), start)
    rounds = 2 * fragments
    specs = {"abc"[i]: (10 * (i + 1), 4 - i) for i in range(sites)}
    out = run_sites(url, specs, rounds, h=2, overlap=overlap, fragments=fragments)
    hist = {s: out[s]["history"] for s in specs}
    assert all([r.round for r in h] == list(range(1, rounds + 1)) for h in hist.values())
    assert len({tuple(r.hash for r in h) for h in hist.values()}) == 1  # every round, every site
    assert len({out[s]["global"] for s in specs}) == 1
    assert all(r.members == sorted(specs) for r in hist["a"])

    frag = Fragments(sizes_of(start), fragments)
    store = RunStore(url)
    prev = model_params(start)
    for r in range(1, rounds + 1):
        for s in specs:  # each payload holds exactly its round's fragment
            assert contribution_names(store, r, s) == frag.names(r), (r, s)
        files, manifest = store.read_global(r)
        now = decode(files["model.safetensors"])
        assert params_hash(now) == manifest["hash"] == hist["a"][r - 1].hash
        moved = {n for n in now if not torch.equal(now[n], prev[n])}
        assert moved == frag.names(r), r  # training happened, in that fragment only
        momentum = decode(files["outer.safetensors"])
        assert set(momentum) == set().union(*(frag.names(q) for q in range(1, r + 1)))
        prev = now


def test_bytes_per_publish_are_about_one_pth(tmp_path):
    sent = {}
    for p in (1, 2, 3):
        url = "file://" + str(tmp_path / str(p))
        commit_start(RunStore(url), build(CFG, seed=0))
        out = run_sites(url, {"a": (1, 2)}, rounds=p, h=1, fragments=p)
        sent[p] = [r.bytes_sent for r in out["a"]["history"]]
    whole = sent[1][0]
    model = build(CFG, seed=0)
    assert 4 * sum(s for _, s in sizes_of(model)) <= whole < 4.2 * sum(s for _, s in sizes_of(model))
    for p in (2, 3):
        assert all(0.6 / p * whole < b < 1.4 / p * whole for b in sent[p]), (p, sent[p], whole)
        assert sum(sent[p]) < whole * 1.1  # P rounds of P = p carry one model's bytes


def test_a_joiner_replays_fragment_rounds_and_trains_on_the_same_bits(tmp_path):
    """Rounds 1-4 by two sites (state every 3: round 4 commits only its hash), then a
    new site joins: it replays round 4 from its fragment's contributions, lands on
    the same bits, and trains rounds 5-6 with the others, all on the same bits."""
    url = "file://" + str(tmp_path)
    commit_start(RunStore(url), build(CFG, seed=0))
    kw = dict(fragments=2, state_every=3, final_round=6)
    first = run_sites(url, {"a": (1, 4), "b": (2, 3)}, rounds=4, h=2, **kw)
    hashes = {r.round: r.hash for r in first["a"]["history"]}
    store = RunStore(url)
    assert "model.safetensors" not in store.read_global(4)[0]

    joiner = DiLoCo(build(CFG, seed=5), torch.optim.AdamW(build(CFG, seed=5).parameters()),
                    RoundExchange(store, "c", state_every=3, final_round=6), inner_steps=2,
                    liveness=False, fragments=2)
    joiner._catch_up()
    assert joiner.round == 4 and params_hash(joiner.global_params) == hashes[4]

    second = run_sites(url, {"a": (1, 4), "b": (2, 3), "c": (3, 2)}, rounds=6, h=2, **kw)
    assert {tuple((r.round, r.hash) for r in second[s]["history"]) for s in "abc"} == {
        tuple((r, second["a"]["history"][r - 5].hash) for r in (5, 6))}
    assert all(r.members == ["a", "b", "c"] for r in second["c"]["history"])
    assert len({second[s]["global"] for s in "abc"}) == 1


# ---- checks on contributions --------------------------------------------------------

SPEC = {"w": ((2, 3), torch.float32), "b": ((3,), torch.float32)}


def exchange_with_fragments(store, site="a") -> RoundExchange:
    ex = RoundExchange(store, site)
    ex.expect(SPEC, Fragments([("w", 6), ("b", 3)], 2))  # round 1: w; round 2: b
    return ex


def test_a_contribution_with_other_tensors_than_its_fragment_is_rejected(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    ex = exchange_with_fragments(store)
    publish(store, 1, "a", {"w": torch.ones(2, 3)})
    publish(store, 1, "whole", {"w": torch.ones(2, 3), "b": torch.ones(3)})
    publish(store, 1, "other", {"b": torch.ones(3)})
    decision, won = ex.decide(1)
    assert won and [e["site"] for e in decision["accepted"]] == ["a"]  # the round goes on
    rejected = {e["site"]: e["reason"] for e in decision["rejected"]}
    assert set(rejected) == {"whole", "other"}
    assert all("round 1 syncs fragment 1 of 2 (1 tensors)" in why for why in rejected.values())
    assert "'b' is not one of the model's" in rejected["whole"]
    # A decoded delta that bypasses the codec's header check: the exchange's own.
    with pytest.raises(Exception, match="round 2's, fragment 2 of 2"):
        ex._check_tensors({"w": torch.ones(2, 3)}, 2)
    ex._check_tensors({"b": torch.ones(3)}, 2)


def test_norms_are_compared_within_a_fragment(tmp_path):
    """A fragment's norm may differ by far from another fragment's: each is compared
    with the same fragment's history only ('a#0', 'a#1')."""
    store = RunStore("file://" + str(tmp_path))
    ex = exchange_with_fragments(store)
    publish(store, 1, "a", {"w": torch.full((2, 3), 0.01)})
    ex.decide(1)
    publish(store, 2, "a", {"b": torch.full((3,), 5.0)})  # ~350x round 1's norm
    decision, _ = ex.decide(2)
    assert [e["site"] for e in decision["accepted"]] == ["a"], decision["rejected"]
    assert set(decision["norms"]) == {"a#0", "a#1"}
    publish(store, 3, "a", {"w": torch.full((2, 3), 1.0)})  # 100x the same fragment's
    decision, _ = ex.decide(3)
    assert [e["site"] for e in decision["rejected"]] == ["a"]
    assert "median" in decision["rejected"][0]["reason"]


# ---- recipe, trainer, plan, benchmark -----------------------------------------------

RUN = """\
name: frag
model: {preset: tiny, n_layer: 1, d_model: 16, n_head: 2}
train: {rounds: 3, inner_steps: 2, batch_size: 2, seq_len: 16, eval_batches: 1, warmup_steps: 1,
        precision: fp32}
sync: {fragments: 3}
sites: [{name: a}]
"""


def test_the_trainer_and_a_users_loop_take_the_recipes_fragments(tmp_path):
    from geotrain.train import trainer
    from geotrain.train.entry import SiteContext
    from tests.sync_helpers import one_site_store

    recipe = loads(RUN)
    store = one_site_store(recipe, tmp_path / "run")
    assert trainer.train_site(recipe, store, trainer.WorkerPlace("a", 0, 1, 0, 1))["round"] == 3
    frag = Fragments(sizes_of(build(trainer.model_config(recipe), seed=0)), 3)
    assert [contribution_names(store, r, "a") for r in (1, 2, 3)] == [frag.names(r) for r in (1, 2, 3)]

    ctx = SiteContext(recipe, RunStore(f"file://{tmp_path / 'own'}"), "a", 0, 1, 0, 1)
    mine = build(CFG, seed=0)
    assert ctx.diloco(mine, torch.optim.AdamW(mine.parameters())).fragments.count == 3

RECIPE = "name: x\nmodel: {{preset: tiny}}\n{sync}sites: [{{name: a}}]\n"
TWO_CLOUDS = """\
name: two
model: {preset: tiny}
train: {rounds: 10, hours: 2}
store: {url: 's3://bucket/runs'}
sync: {fragments: FR}
sites:
  - {name: a, provider: aws, region: us-east-1, instance_type: g5.xlarge}
  - {name: b, provider: gcp, region: us-central1, instance_type: g2-standard-4}
"""


def test_recipe_takes_fragments_and_refuses_zero():
    assert loads(RECIPE.format(sync="")).sync.fragments == 1
    assert loads(RECIPE.format(sync="sync:\n  fragments: 4\n")).sync.fragments == 4
    with pytest.raises(RecipeError) as info:
        loads(RECIPE.format(sync="sync:\n  fragments: 0\n"), source="r.yaml")
    assert str(info.value) == "r.yaml:4: sync.fragments: must be >= 1 (got 0)"


def test_plan_divides_the_bytes_per_round_by_the_fragments(geotrain_home):
    from geotrain.plan import make_plan

    one = make_plan(loads(TWO_CLOUDS.replace("FR", "1")))
    four = make_plan(loads(TWO_CLOUDS.replace("FR", "4")))
    assert one.egress_bytes == 10 * 2 * 2 * 819_200 * 4
    assert four.egress_bytes == one.egress_bytes / 4
    assert four.egress_usd == pytest.approx(one.egress_usd / 4, abs=1e-4)


def test_benchmark_arms_take_fr():
    sys.path.insert(0, str(ROOT))
    from benchmarks.sync import parse_arm

    assert parse_arm("int8:fr=4") == ("int8", ":fr=4", {"fragments": 4})
