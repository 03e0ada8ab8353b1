"""A joining site checks the committed state before it starts from it
(geotrain/sync/joining.py): a commit whose model is not what the sites that
merged the round ended it with is passed over for an older one, and the
rounds between are replayed, landing on the sites' bits.

    python -m pytest tests/test_joining.py -q
"""

import pytest
import torch

from geotrain.store import RunStore, round_key
from geotrain.sync.diloco import DiLoCo, RoundExchange, encode, params_hash
from geotrain.sync.joining import state_problem
from geotrain.train.model import build
from tests.sync_helpers import CFG, commit_start, run_sites

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)


def forge_commit(store: RunStore, r: int, params: dict, hash_: str | None = None) -> None:
    """Rewrite round r's commit as a writer of the store could: a consistent manifest
    and marker around another model."""
    store.commit_global(r, {"model.safetensors": encode(params)},
                        {"hash": hash_ or params_hash(params), "members": ["a", "b"]})


def joiner(store: RunStore) -> tuple[DiLoCo, RoundExchange]:
    exchange = RoundExchange(store, "c", poll_s=0.01, roster=["a", "b", "c"])
    model = build(CFG, seed=5)
    d = DiLoCo(model, torch.optim.AdamW(model.parameters()), exchange, inner_steps=2,
               liveness=False)
    return d, exchange


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two sites, three rounds: every round commits its state."""
    url = "file://" + str(tmp_path_factory.mktemp("run"))
    commit_start(RunStore(url), build(CFG, seed=0))
    out = run_sites(url, {"a": (1, 4), "b": (2, 4)}, rounds=3, h=2, final_round=3)
    return url, {r.round: r.hash for r in out["a"]["history"]}


def test_an_honest_commit_is_adopted(trained, tmp_path):
    url, hashes = trained
    d, _ = joiner(RunStore(url))
    d._catch_up()
    assert d.round == 3 and params_hash(d.global_params) == hashes[3]
    assert not [e for e in RunStore(url).events(["c"]) if e["kind"] == "rejected-state"]


@pytest.mark.parametrize("how", ["consistent", "mislabelled"])
def test_a_forged_commit_is_passed_over_and_the_round_replayed(trained, tmp_path, how):
    url, hashes = trained
    copy = "file://" + str(tmp_path / "copy")
    src, dst = RunStore(url), RunStore(copy)
    for key in src.keys():
        dst.put(key, src.get(key))
    evil = {n: torch.full_like(t, 7.0) for n, t in build(CFG, seed=9).state_dict().items()
            if n in dict(build(CFG, seed=9).named_parameters())}
    # consistent: its manifest names its own hash; mislabelled: the sites' hash over other bytes.
    forge_commit(dst, 3, evil, None if how == "consistent" else hashes[3])
    d, _ = joiner(dst)
    d._catch_up()
    assert d.round == 3 and params_hash(d.global_params) == hashes[3]  # replayed from round 2
    rejected = [e for e in dst.events(["c"]) if e["kind"] == "rejected-state"]
    assert [e["round"] for e in rejected] == [3]
    assert ("ended it with" if how == "consistent" else "its manifest records") in rejected[0]["reason"]


def test_results_from_non_members_or_malformed_do_not_vote(trained, tmp_path):
    url, hashes = trained
    store = RunStore(url)
    manifest = store.global_manifest(3)
    member = lambda s: s in ("a", "b")  # noqa: E731
    assert state_problem(store, 3, hashes[3], manifest, member) is None
    copy = RunStore("file://" + str(tmp_path / "copy"))
    for key in store.keys():
        copy.put(key, store.get(key))
    for s in ("x1", "x2", "x3"):  # not of the run: outvote nobody
        copy.put_result(3, s, {"hash": "0" * 64})
    copy.put(f"rounds/{round_key(3)}/results/zz.json", b"{not json")
    assert state_problem(copy, 3, hashes[3], manifest, member) is None
    # A tie between members is no agreement: the joiner looks further back.
    copy.put_result(3, "a", {"hash": "1" * 64})
    assert "ended it with" in state_problem(copy, 3, hashes[3], manifest, member)


def test_round_zero_must_be_the_model_the_run_was_launched_with(trained):
    url, _ = trained
    store = RunStore(url)
    files, manifest = store.read_global(0)
    digest = manifest["hash"]
    member = lambda s: s in ("a", "b")  # noqa: E731
    assert state_problem(store, 0, digest, manifest, member, initial_hash=digest) is None
    # A round 0 rewritten consistently (manifest and model agree) is still not the signed one.
    why = state_problem(store, 0, "1" * 64, dict(manifest, hash="1" * 64), member, initial_hash=digest)
    assert "the run was launched with" in why
    # Without a signed hash (a user's entrypoint commits its own round 0): its manifest only.
    assert state_problem(store, 0, "1" * 64, dict(manifest, hash="1" * 64), member) is None


def test_a_replaced_decider_commits_the_round_its_last_incarnation_left(trained, tmp_path):
    """The site that decided the last round was replaced before it committed it. Its
    replacement (the same member, beating again) replays the round and commits it at once:
    no other site takes over a round whose decider beats (found by test_chaos, where the
    run hung at its last round, every site waiting for the other)."""
    import shutil

    url, hashes = trained
    copy = tmp_path / "run"
    shutil.copytree(url[len("file://"):], copy)
    store = RunStore(f"file://{copy}")
    decider = store.members(3)["decided_by"]
    shutil.rmtree(copy / "global" / round_key(3))
    assert not store.is_committed(3)
    store.alive(decider, "training", pid=1)  # the new incarnation beats
    exchange = RoundExchange(store, decider, poll_s=0.01, roster=["a", "b"], takeover_s=600.0)
    model = build(CFG, seed=5)
    d = DiLoCo(model, torch.optim.AdamW(model.parameters()), exchange, inner_steps=2,
               liveness=False)
    d._catch_up()
    assert d.round == 3 and params_hash(d.global_params) == hashes[3]
    d._commits.settle()
    assert store.is_committed(3) and store.global_manifest(3)["hash"] == hashes[3]
