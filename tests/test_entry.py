"""A user's own model and loop, trained across sites through `SiteContext`
(`train.entrypoint`), and a rogue sender whose NaN and corrupted
contributions are rejected while the run finishes."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest
import torch

from geotrain.recipe import loads
from geotrain.store import RunStore
from geotrain.sync.diloco import encode
from geotrain.train.entry import SiteContext, run_entrypoint
from tests.helpers import geotrain_cmd

pytestmark = pytest.mark.timeout(120)

RECIPE = """\
name: user-model
train: {entrypoint: "geotrain.examples.regression:train", rounds: 6, inner_steps: 10,
        batch_size: 32, lr: 3.0e-3}
sites: [{name: a}, {name: b}]
"""


def test_users_own_model_trains_across_two_sites_despite_a_rogue_sender(tmp_path):
    recipe = loads(RECIPE)
    url = "file://" + str(tmp_path)
    store = RunStore(url)
    store.write_run({"id": "user-model", "recipe": recipe.to_dict()})
    for s in ("a", "b"):
        store.alive(s, "starting")
    results, errors, done = {}, [], threading.Event()

    def site(i: int, name: str) -> None:
        try:
            stop_beats = threading.Event()

            def beat():  # what the site agent does for a real site
                while not stop_beats.wait(0.5):
                    store.alive(name, "running")
            threading.Thread(target=beat, daemon=True).start()
            ctx = SiteContext(recipe, RunStore(url), name, i, 2, 0, 1)
            results[name] = run_entrypoint(ctx)
            stop_beats.set()
            store.alive(name, "done")
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    def rogue() -> None:
        # Something publishing garbage into every open round, as a broken or
        # hostile sender would: NaN values, and bytes that do not match the manifest.
        r = 1
        while not done.is_set() and r <= 6:
            if store.members(r) is None:
                nan = encode({"0.weight": torch.full((64, 16), float("nan"))})
                store.put_contribution(r, "rogue", nan, {"tokens": 32, "codec": "none",
                                                         "published_at": time.time()})
                store.put_contribution(r, "flipped", b"x" * 100, {"tokens": 32, "codec": "none",
                                                                  "published_at": time.time()})
                store.put(f"rounds/{r:06d}/flipped.bin", b"y" * 100)
            r += 1
            time.sleep(0.05)

    threads = [threading.Thread(target=site, args=(i, n)) for i, n in enumerate(("a", "b"))]
    threads.append(threading.Thread(target=rogue))
    for t in threads:
        t.start()
    for t in threads[:2]:
        t.join(100)
    done.set()
    threads[2].join(5)
    assert not errors, errors[0]
    assert results["a"]["round"] == results["b"]["round"] == 6
    assert store.committed_rounds() == list(range(7))
    losses = [store.read_eval(r)["eval_loss"] for r in range(1, 7)]
    assert losses[-1] < losses[0]
    for r in range(1, 7):
        decision = store.members(r)
        assert {e["site"] for e in decision["accepted"]} <= {"a", "b"}
        hashes = {v["hash"] for v in store.results(r).values()}
        assert hashes == {store.global_manifest(r)["hash"]}
    rejected = [e for e in store.events(["a", "b"]) if e["kind"] == "rejected"]
    assert {e["site"] for e in rejected} == {"rogue", "flipped"}


def test_entrypoint_must_be_module_colon_function(tmp_path):
    from geotrain.errors import RecipeError

    with pytest.raises(RecipeError, match="must be 'module:function'"):
        loads(RECIPE.replace("geotrain.examples.regression:train", "not a function"))


def test_launch_refuses_an_entrypoint_it_cannot_import(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(RECIPE.replace("geotrain.examples.regression", "no_such_module_xyz"))
    out = subprocess.run(geotrain_cmd("launch", str(path)), capture_output=True, text=True,
                         env=dict(os.environ, GEOTRAIN_HOME=str(tmp_path / "home")), timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "train.entrypoint" in out.stderr and "no_such_module_xyz" in out.stderr
