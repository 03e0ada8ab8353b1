"""`geotrain finish`: a run ended early keeps what it learned.

The controller picks the last round (the one after the round being trained),
records it, and every site — the built-in trainer and a user's own loop alike —
trains and publishes that round, commits its full global state and stops there.
Sites here are threads that run the real trainer code on one file:// store;
nothing waits on time: the request is made once round 2 is committed, and the
sites run until they stop by themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from geotrain.controller import Controller
from geotrain.runs import create_run
from geotrain.recipe import loads
from geotrain.store import RunStore
from geotrain.train.entry import SiteContext, run_entrypoint
from geotrain.train.trainer import WorkerPlace, train_site
from tests.helpers import as_member, geotrain_cmd, geotrain_home, wait_for  # noqa: F401

pytestmark = pytest.mark.timeout(300)

BUILTIN = """\
name: fin
model: {preset: tiny, n_layer: 1, d_model: 32, n_head: 2}
train: {rounds: 100000, inner_steps: 3, batch_size: 2, seq_len: 32, eval_batches: 1}
sync: {state_every: 5}
sites: [{name: a}, {name: b}]
"""
USER = """\
name: fin-user
train: {entrypoint: "geotrain.examples.regression:train", rounds: 100000, inner_steps: 3,
        batch_size: 8}
sites: [{name: a}, {name: b}]
"""


def run_sites(ctl: Controller, train) -> tuple[dict, list, list]:
    """Start both sites in threads; returns (results, errors, threads), filled as they end."""
    results, errors = {}, []

    def site(i: int, name: str) -> None:
        store = as_member(ctl, name)
        try:
            stop_beats = threading.Event()

            def beat() -> None:  # what the site agent does for a real site
                while not stop_beats.wait(0.5):
                    store.alive(name, "running")
            threading.Thread(target=beat, daemon=True).start()
            results[name] = train(i, name)
            stop_beats.set()
            store.alive(name, "done")
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    for name in ("a", "b"):
        as_member(ctl, name).alive(name, "starting")
    threads = [threading.Thread(target=site, args=(i, n), daemon=True) for i, n in enumerate("ab")]
    for t in threads:
        t.start()
    return results, errors, threads


def finish_after_round_2(ctl: Controller, threads) -> int:
    wait_for(lambda: (ctl.store.latest_global() or 0) >= 2, timeout=240)
    ctl.start_finish()
    last = ctl.rounds_total
    for t in threads:
        t.join(240)
    return last


def assert_ends_at(ctl: Controller, last: int, results: dict, errors: list) -> RunStore:
    assert not errors, errors[0]
    store = ctl.store
    assert 3 <= last < 100000
    assert store.committed_rounds() == list(range(last + 1))  # no gap, nothing past the end
    assert "model.safetensors" in store.read_global(last)[0]  # the last round holds the state
    assert store.members(last + 1) is None
    for r in range(1, last + 1):
        assert {v["hash"] for v in store.results(r).values()} == {store.global_manifest(r)["hash"]}
    assert ctl.db.run(ctl.run_id)["rounds_total"] == last
    finishing = [e for e in store.events([]) if e["kind"] == "finishing"]
    assert [e["at_round"] for e in finishing] == [last]
    for name in "ab":
        assert store.heartbeat(name)["state"] == "done", store.heartbeat(name)
    return store


def test_the_built_in_trainer_ends_at_the_chosen_round(tmp_path: Path, geotrain_home: Path):
    recipe = loads(BUILTIN)
    ctl = Controller(create_run(recipe, str(tmp_path / "r.yaml"), geotrain_home), geotrain_home)
    results, errors, threads = run_sites(
        ctl, lambda i, n: train_site(recipe, as_member(ctl, n), WorkerPlace(n, i, 2, 0, 1)))
    last = finish_after_round_2(ctl, threads)
    store = assert_ends_at(ctl, last, results, errors)
    assert results["a"]["round"] == results["b"]["round"] == last
    # Rounds between state commits hold only their hash, as before the request.
    with_state = [r for r in store.committed_rounds() if "model.safetensors" in store.read_global(r)[0]]
    assert with_state == [r for r in range(last + 1) if r % 5 == 0 or r == last]
    # The controller's own finish writes the final model from that round.
    ctl.finish(last)
    assert store.read_final()["rounds"] == last
    # Asked again, the run keeps the round it was given.
    ctl.start_finish()
    assert ctl.rounds_total == last
    assert [e["at_round"] for e in store.events([]) if e["kind"] == "finishing"] == [last, last]


def test_a_users_own_loop_ends_at_the_chosen_round(tmp_path: Path, geotrain_home: Path):
    recipe = loads(USER)
    ctl = Controller(create_run(recipe, str(tmp_path / "r.yaml"), geotrain_home), geotrain_home)
    results, errors, threads = run_sites(
        ctl, lambda i, n: run_entrypoint(SiteContext(recipe, as_member(ctl, n), n, i, 2, 0, 1)))
    last = finish_after_round_2(ctl, threads)
    assert_ends_at(ctl, last, results, errors)
    assert results["a"]["round"] == results["b"]["round"] == last


def test_a_forged_or_broken_finish_record_is_no_request(tmp_path: Path):
    store = RunStore("file://" + str(tmp_path))
    for bad in (b"not json", b"[1]", b'{"at_round": "3"}', b'{"at_round": 0}', b'{"at_round": true}'):
        store.put("control/finish.json", bad)
        assert store.finish_round() is None, bad
    store.request_finish(7)
    assert store.finish_round() == 7


def test_finish_without_a_controller_is_one_line(tmp_path: Path, geotrain_home: Path):
    recipe = loads(BUILTIN)
    run = create_run(recipe, str(tmp_path / "r.yaml"), geotrain_home)
    out = subprocess.run(geotrain_cmd("finish", run), capture_output=True, text=True, timeout=120,
                         env={**os.environ, "GEOTRAIN_HOME": str(geotrain_home)})
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "has no running controller" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = subprocess.run(geotrain_cmd("finish", run, "--json"), capture_output=True, text=True,
                         timeout=120, env={**os.environ, "GEOTRAIN_HOME": str(geotrain_home)})
    assert out.returncode == 1 and "no running controller" in json.loads(out.stdout)["error"]["message"]
