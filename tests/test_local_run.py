"""End to end with real local sites: each site its own Ray cluster, the CLI as
a user runs it, the run store checked afterwards, and no process left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from geotrain.store import RunStore
from tests.helpers import geotrain_cmd, geotrain_home, listening_sockets, tagged_processes, wait_for  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

RECIPE = """\
name: {name}
model: {{preset: tiny, n_layer: 2, d_model: 64, n_head: 4}}
train: {{rounds: {rounds}, inner_steps: 10, batch_size: 4, seq_len: 64, lr: 4.0e-3, warmup_steps: 5}}
sites:
  - {{name: a, provider: local}}
  - {{name: b, provider: local, workers: {workers_b}}}
"""


def write_recipe(tmp_path: Path, name: str, rounds: int, workers_b: int = 1) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(RECIPE.format(name=name, rounds=rounds, workers_b=workers_b))
    return path


def status(home: Path, run: str) -> dict:
    out = subprocess.run(geotrain_cmd("status", run, "--json"), capture_output=True, text=True,
                         env=dict(os.environ, GEOTRAIN_HOME=str(home)), check=True)
    return json.loads(out.stdout)


def test_two_sites_train_one_model(tmp_path: Path, geotrain_home: Path):
    """Site a has one worker, site b two (a gloo group inside the site)."""
    recipe = write_recipe(tmp_path, "two", rounds=4, workers_b=2)
    proc = subprocess.run(geotrain_cmd("launch", str(recipe), "--json"), capture_output=True,
                          text=True, env=dict(os.environ, GEOTRAIN_HOME=str(geotrain_home)), timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads(proc.stdout)
    assert s["state"] == "succeeded"
    assert s["rounds_done"] == s["rounds_total"] == 4
    assert s["started_at"] <= s["first_step_at"] <= s["finished_at"]
    assert s["controller_pid"] is None  # no controller once finished
    assert [site["name"] for site in s["sites"]] == ["a", "b"]
    assert all(site["provider"] == "local" and site["pid"] for site in s["sites"])

    store = RunStore(s["store"])
    assert store.committed_rounds() == [0, 1, 2, 3, 4]
    losses = []
    for r in range(1, 5):
        results = store.results(r)
        manifest = store.global_manifest(r)
        # Every site ended the round with the same bits, and that is what was committed.
        assert set(results) == {"a", "b"}
        assert {v["hash"] for v in results.values()} == {manifest["hash"]}
        losses.append(store.read_eval(r)["eval_loss"])
    assert losses[-1] < losses[0] < 5.55
    final = store.read_final()
    assert final["rounds"] == 4 and final["hash"] == store.global_manifest(4)["hash"]
    assert store.exists("final/model.safetensors")
    assert s["eval_loss"] == pytest.approx(losses[-1])
    assert tagged_processes(s["id"]) == []

    logs = subprocess.run(geotrain_cmd("logs", s["id"], "--site", "a"), capture_output=True, text=True,
                          env=dict(os.environ, GEOTRAIN_HOME=str(geotrain_home)), check=True).stdout
    assert "finished at round 4" in logs and "controller" not in logs
    every = subprocess.run(geotrain_cmd("logs", s["id"]), capture_output=True, text=True,
                           env=dict(os.environ, GEOTRAIN_HOME=str(geotrain_home)), check=True).stdout
    assert "round 4 committed" in every and "controller" in every


def test_ctrl_c_stops_cleanly(tmp_path: Path, geotrain_home: Path):
    recipe = write_recipe(tmp_path, "ctrlc", rounds=200)
    env = dict(os.environ, GEOTRAIN_HOME=str(geotrain_home))
    proc = subprocess.Popen(geotrain_cmd("launch", str(recipe)), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        run = wait_for(lambda: _only_run(geotrain_home), timeout=120)
        wait_for(lambda: status(geotrain_home, run)["rounds_done"] >= 1, timeout=180)
        assert len(tagged_processes(run)) >= 2  # agents and their Ray processes are up
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    s = status(geotrain_home, run)
    assert s["state"] == "stopped" and s["finished_at"]
    assert tagged_processes(run) == []


def test_detach_then_down(tmp_path: Path, geotrain_home: Path):
    """Also: while it trains, nothing of the run listens beyond loopback."""
    recipe = write_recipe(tmp_path, "detach", rounds=200, workers_b=2)
    env = dict(os.environ, GEOTRAIN_HOME=str(geotrain_home))
    out = subprocess.run(geotrain_cmd("launch", str(recipe), "--detach", "--json"), env=env,
                         capture_output=True, text=True, check=True, timeout=60)
    assert set(json.loads(out.stdout)) == {"run"}
    run = json.loads(out.stdout)["run"]
    s = wait_for(lambda: (x := status(geotrain_home, run))["first_step_at"] and x, timeout=180)
    assert s["state"] == "running" and s["controller_pid"]
    assert {site["state"] for site in s["sites"]} <= {"training", "syncing"}
    controller = s["controller_pid"]
    sockets = listening_sockets(tagged_processes(run))
    assert len(sockets) >= 6  # Ray's GCS, raylets, workers, gloo ... all there
    assert {addr for _, addr, _ in sockets} == {"127.0.0.1"}, sockets
    down = subprocess.run(geotrain_cmd("down", run, "--json"), env=env, capture_output=True,
                          text=True, timeout=90)
    assert down.returncode == 0, down.stderr
    report = json.loads(down.stdout)
    assert report["state"] == "stopped" and len(report["terminated"]) == 2
    s = status(geotrain_home, run)
    assert s["state"] == "stopped" and s["controller_pid"] is None
    assert tagged_processes(run) == []
    wait_for(lambda: not Path(f"/proc/{controller}").exists()
             or "Z" in Path(f"/proc/{controller}/stat").read_text().rsplit(")", 1)[1][:3], timeout=60)


def _only_run(home: Path) -> str | None:
    out = subprocess.run(geotrain_cmd("status", "--json"), capture_output=True, text=True,
                         env=dict(os.environ, GEOTRAIN_HOME=str(home)))
    runs = json.loads(out.stdout) if out.returncode == 0 else []
    return runs[0]["id"] if runs else None



def test_a_failing_site_fails_the_run_and_leaves_nothing(tmp_path: Path, geotrain_home: Path):
    """lr 1e6 makes the loss non-finite within a few steps: the site reports it,
    the controller replaces it like a lost site, the replacement fails the same
    way, and past the replacement limit (1 here) the run fails, saying why;
    every site is torn down."""
    recipe = tmp_path / "diverge.yaml"
    recipe.write_text(RECIPE.format(name="diverge", rounds=50, workers_b=1).replace("lr: 4.0e-3", "lr: 1.0e+6")
                      + "sync: {max_replacements: 1}\n")
    proc = subprocess.run(geotrain_cmd("launch", str(recipe), "--json"), capture_output=True, text=True,
                          env=dict(os.environ, GEOTRAIN_HOME=str(geotrain_home)), timeout=240)
    assert proc.returncode == 1
    s = json.loads(proc.stdout)
    assert s["state"] == "failed" and s["finished_at"]
    assert "non-finite loss" in s["error"] and "was lost 2 times; giving up (failed: " in s["error"]
    lost = [e for e in RunStore(s["store"]).events([]) if e["kind"] == "site-lost"]
    assert lost and all(e["reason"].startswith("failed: ") for e in lost)
    assert tagged_processes(s["id"]) == []
