"""The outer learning-rate schedule (geotrain/sync/schedule.py, `sync.outer_lr_*`).

Its values round by round; the default (constant) gives the same bits as a plain
number; the built-in trainer and a user's SiteContext apply the recipe's schedule
(checked by replaying the store's contributions by hand); two sites on a cosine
schedule end bit-identical, and a site that joins late replays the rounds between
state commits to the same hash; the recipe's fields and the benchmark's arm knobs.

    python -m pytest tests/test_outer_schedule.py -q
"""

import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

from geotrain.errors import RecipeError
from geotrain.recipe import loads
from geotrain.recipe.sections import SyncSpec
from geotrain.store import RunStore
from geotrain.sync import compression
from geotrain.sync.diloco import DiLoCo, RoundExchange, decode, outer_step, params_hash
from geotrain.sync.schedule import OuterLR
from geotrain.train import trainer
from geotrain.train.entry import SiteContext
from geotrain.train.model import build
from tests.sync_helpers import CFG, batch, commit_start, one_site_store, train_step

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)


# ---- the schedule's values --------------------------------------------------------

def test_constant_is_the_number_itself_every_round():
    lr = OuterLR(0.7, rounds=10)
    assert [lr(r) for r in (1, 5, 10, 11, 100)] == [0.7] * 5  # exactly, not approximately


def test_cosine_goes_from_lr_to_its_floor_at_the_last_round_and_stays():
    lr = OuterLR(1.0, rounds=11, schedule="cosine", min_ratio=0.1)
    assert lr(1) == 1.0
    assert lr(6) == pytest.approx(0.55)  # halfway down
    assert lr(11) == lr(12) == lr(1000) == pytest.approx(0.1)
    values = [lr(r) for r in range(1, 12)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert OuterLR(2.0, rounds=5, schedule="cosine", min_ratio=0.0)(5) == pytest.approx(0.0)
    assert OuterLR(2.0, rounds=1, schedule="cosine")(1) == 2.0  # a one-round run: the peak


def test_warmup_ramps_linearly_then_follows_the_schedule():
    cos = OuterLR(1.0, rounds=12, schedule="cosine", warmup=4, min_ratio=0.2)
    assert [cos(r) for r in range(1, 5)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert cos(5) == pytest.approx(1.0)  # the cosine starts from the peak
    assert cos(12) == pytest.approx(0.2)
    const = OuterLR(0.8, rounds=12, warmup=2)
    assert [const(r) for r in (1, 2, 3, 12, 20)] == pytest.approx([0.4, 0.8, 0.8, 0.8, 0.8])


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="linear"), "valid: constant, cosine"),
    (dict(rounds=0), "rounds must be at least 1"),
    (dict(warmup=-1), "warmup at least 0"),
    (dict(min_ratio=1.5), r"min_ratio in \[0, 1\]"),
])
def test_bad_schedules_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OuterLR(**dict(dict(lr=0.7, rounds=10), **kwargs))


# ---- through DiLoCo -----------------------------------------------------------------

def one_site(tmp_path, name: str, outer_lr, rounds: int = 4) -> tuple[list[str], RunStore]:
    """One site, H=2, momentum 0.9: the hash of every round, and its store."""
    store = RunStore("file://" + str(tmp_path / name))
    model = build(CFG, seed=0)
    commit_start(store, model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    with DiLoCo(model, opt, RoundExchange(store, "a"), inner_steps=2, outer_lr=outer_lr,
                liveness=False) as diloco:
        while diloco.training_round <= rounds:
            x, y = batch(gen)
            train_step(model, opt, x, y)
            diloco.step(tokens=x.numel())
        diloco.finish()
    return [r.hash for r in diloco.history], store


def replay(store: RunStore, rounds: int, lr, sites: list[str]) -> list[str]:
    """Round by round from round 0: each round's contributions, token-weighted, and
    an outer step at lr(r), written out here rather than through DiLoCo."""
    theta = decode(store.read_global(0)[0]["model.safetensors"])
    momentum, hashes = {}, []
    for r in range(1, rounds + 1):
        parts = [(compression.decode(store.read_contribution(r, s)[0]),
                  store.contribution_meta(r, s)["tokens"]) for s in sorted(sites)]
        total = sum(w for _, w in parts)
        grad = {}
        for delta, w in parts:
            for n, t in delta.items():
                grad[n] = grad[n] + t * (w / total) if n in grad else t * (w / total)
        outer_step(theta, grad, momentum, lr(r), 0.9, True)
        hashes.append(params_hash(theta))
    return hashes


def test_the_default_schedule_gives_the_bits_a_plain_number_gives(tmp_path):
    default = OuterLR.of(SyncSpec(), rounds=4)
    plain, _ = one_site(tmp_path, "plain", 0.7)
    scheduled, _ = one_site(tmp_path, "default", default)
    cosine, store = one_site(tmp_path, "cosine", OuterLR(0.7, 4, "cosine"))
    assert scheduled == plain and len(set(plain)) == 4
    assert cosine[0] == plain[0] and cosine[1:] != plain[1:]  # round 1 is at the peak either way
    assert replay(store, 4, OuterLR(0.7, 4, "cosine"), ["a"]) == cosine


def train_sites(url: str, outer_lr, rounds: int, **exchange_kw) -> dict[str, list[str]]:
    """Sites a and b in threads, H=2: the hash of every round at each."""
    out, errors = {}, []

    def site(name: str, seed: int) -> None:
        try:
            model = build(CFG, seed=0)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            # Alive for 60 s after a beat: a busy machine cannot leave a site out.
            exchange = RoundExchange(RunStore(url), name, poll_s=0.01, liveness_s=60.0, **exchange_kw)
            gen = torch.Generator().manual_seed(seed)
            with DiLoCo(model, opt, exchange, inner_steps=2, outer_lr=outer_lr) as diloco:
                while diloco.training_round <= rounds:
                    x, y = batch(gen)
                    train_step(model, opt, x, y)
                    diloco.step(tokens=x.numel())
                diloco.finish()
            out[name] = [r.hash for r in diloco.history]
        except BaseException as e:  # noqa: BLE001 - re-raised by the main thread
            errors.append(e)

    store = RunStore(url)
    for name in ("a", "b"):
        store.alive(name, "starting")
    threads = [threading.Thread(target=site, args=args) for args in (("a", 1), ("b", 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors, errors[0]
    return out


def test_two_sites_on_a_cosine_agree_and_a_joiner_replays_to_the_same_bits(tmp_path):
    url = "file://" + str(tmp_path / "run")
    commit_start(RunStore(url), build(CFG, seed=0))
    lr = OuterLR(0.7, rounds=4, schedule="cosine", warmup=1, min_ratio=0.1)
    out = train_sites(url, lr, rounds=4, state_every=3, final_round=8)
    assert out["a"] == out["b"] and len(out["a"]) == 4
    store = RunStore(url)
    assert replay(store, 4, lr, ["a", "b"]) == out["a"]
    assert store.latest_state() == 3  # round 4 committed only its hash: a joiner replays it

    def join(url: str, outer_lr) -> str:
        exchange = RoundExchange(RunStore(url), "c", poll_s=0.01, state_every=3, final_round=8)
        joiner = DiLoCo(build(CFG, seed=5), torch.optim.AdamW(build(CFG, seed=5).parameters()),
                        exchange, inner_steps=2, outer_lr=outer_lr, liveness=False)
        joiner._catch_up()
        assert joiner.round == 4
        return params_hash(joiner.global_params)

    # On a copy of the store, a joiner with the wrong lr (the schedule's peak) is
    # not on the sites' bits: the replay really depends on the schedule.
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    assert join("file://" + str(tmp_path / "copy"), 0.7) != out["a"][3]
    assert join(url, lr) == out["a"][3]


RUN = """\
name: sched
model: {preset: tiny, n_layer: 1, d_model: 16, n_head: 2}
train: {rounds: 3, inner_steps: 2, batch_size: 2, seq_len: 16, eval_batches: 1, warmup_steps: 1,
        precision: fp32}
sync: {outer_lr_schedule: cosine, outer_lr_min_ratio: 0.2}
sites: [{name: a}]
"""


def test_the_trainer_applies_the_recipes_schedule(tmp_path):
    recipe = loads(RUN)
    store = one_site_store(recipe, tmp_path)
    out = trainer.train_site(recipe, store, trainer.WorkerPlace("a", 0, 1, 0, 1))
    assert out["round"] == 3
    hashes = [store.global_manifest(r)["hash"] for r in (1, 2, 3)]
    assert replay(store, 3, OuterLR(0.7, 3, "cosine", 0, 0.2), ["a"]) == hashes
    assert replay(store, 3, lambda r: 0.7, ["a"])[1:] != hashes[1:]


def test_site_context_hands_diloco_the_recipes_schedule(tmp_path):
    recipe = loads(RUN)
    store = RunStore(f"file://{tmp_path}")
    ctx = SiteContext(recipe, store, "a", 0, 1, 0, 1)
    model = build(CFG, seed=0)
    diloco = ctx.diloco(model, torch.optim.AdamW(model.parameters()))
    assert diloco.outer_lr == OuterLR(0.7, 3, "cosine", 0, 0.2)
    assert diloco.outer_lr(3) == pytest.approx(0.14)


# ---- the recipe and the benchmark ---------------------------------------------------

def test_recipe_fields_default_to_a_constant_and_check_their_ranges():
    r = loads("name: x\nsync: {outer_lr_schedule: cosine, outer_lr_min_ratio: 0, "
              "outer_lr_warmup: 3}\nsites: [{name: a}]\n")
    assert (r.sync.outer_lr_schedule, r.sync.outer_lr_min_ratio, r.sync.outer_lr_warmup) == (
        "cosine", 0, 3)
    default = loads("name: x\nsites: [{name: a}]\n")
    assert OuterLR.of(default.sync, default.train.rounds) == OuterLR(0.7, 20)


@pytest.mark.parametrize("field, value, message", [
    ("outer_lr_schedule", "linear", "expected one of 'constant', 'cosine' (got 'linear')"),
    ("outer_lr_min_ratio", "1.5", "must be <= 1 (got 1.5)"),
    ("outer_lr_min_ratio", "-0.1", "must be >= 0 (got -0.1)"),
    ("outer_lr_warmup", "-1", "must be >= 0 (got -1)"),
    ("outer_lr_warmup", "1.5", "expected an integer (got 1.5)"),
])
def test_bad_recipe_fields_give_one_line_naming_the_field(field, value, message):
    with pytest.raises(RecipeError) as info:
        loads(f"name: x\nsync:\n  {field}: {value}\nsites: [{{name: a}}]\n", source="r.yaml")
    assert str(info.value) == f"r.yaml:3: sync.{field}: {message}"


def test_benchmark_arm_knobs_parse_and_a_bad_schedule_says_what_is_valid():
    sys.path.insert(0, str(ROOT))
    from benchmarks.sync import parse_arm

    assert parse_arm("none:olr=1:om=0:olrs=cosine:olrmin=0.05:olrw=2") == (
        "none", ":olr=1:om=0:olrs=cosine:olrmin=0.05:olrw=2",
        {"outer_lr": 1.0, "outer_momentum": 0.0, "outer_lr_schedule": "cosine",
         "outer_lr_min_ratio": 0.05, "outer_lr_warmup": 2})
    with pytest.raises(SystemExit, match="valid: constant, cosine"):
        parse_arm("none:olrs=linear")
