"""Sites on CUDA: runs only where torch sees a CUDA device (a lent GPU machine),
skipped here saying why. The same code paths are tested on the CPU by
tests/test_devices.py (placement, backend choice), tests/test_precision.py
(autocast, loss scaling, the step without host syncs) and tests/test_offload.py
(pinned snapshots, on-device encoding giving the CPU's bytes).

    python -m pytest tests/test_gpu.py -v        # on a machine with CUDA
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from geotrain.store import RunStore
from tests.helpers import geotrain_cmd, geotrain_home, tagged_processes  # noqa: F401

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason=f"needs CUDA: torch {torch.__version__} sees no CUDA device here"),
    pytest.mark.slow, pytest.mark.timeout(600),
]

RECIPE = """\
name: {name}
model: {{preset: small}}
train: {{rounds: 3, inner_steps: 20, batch_size: 8, seq_len: 256, lr: 3.0e-3, warmup_steps: 5}}
sites:
{sites}
"""


def launch(tmp_path: Path, home: Path, name: str, sites: str) -> tuple[dict, str]:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPE.format(name=name, sites=sites))
    env = dict(os.environ, GEOTRAIN_HOME=str(home))
    proc = subprocess.run(geotrain_cmd("launch", str(recipe), "--json"), capture_output=True,
                          text=True, env=env, timeout=540)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    logs = subprocess.run(geotrain_cmd("logs", summary["id"]), capture_output=True, text=True,
                          env=env, check=True).stdout
    return summary, logs


def group_events(store: RunStore, site: str) -> list[dict]:
    return [e for e in store.events([site]) if e.get("source") == site and e.get("kind") == "group"]


def test_a_site_trains_on_its_gpus(tmp_path: Path, geotrain_home: Path):
    """`workers: auto` is one worker per GPU; NCCL forms the group when there are two or
    more, and every rank trains on its own CUDA device."""
    summary, _ = launch(tmp_path, geotrain_home, "gpu-one", "  - {name: a, provider: local}")
    assert summary["state"] == "succeeded" and summary["rounds_done"] == 3
    store = RunStore(summary["store"])
    [group] = group_events(store, "a")
    gpus = torch.cuda.device_count()
    assert group["world"] == gpus
    assert group["backend"] == "nccl"  # with one GPU there is no group to form, but the choice holds
    assert all(r["device"].startswith("cuda") for r in group["ranks"])
    assert store.read_eval(3)["eval_loss"] < store.read_eval(1)["eval_loss"]
    assert tagged_processes(summary["id"]) == []


def test_three_sites_share_one_machines_gpus(tmp_path: Path, geotrain_home: Path):
    """Three local sites on one GPU machine, one worker each, all on CUDA, one model."""
    sites = "\n".join(f"  - {{name: {s}, provider: local, workers: 1}}" for s in "abc")
    summary, _ = launch(tmp_path, geotrain_home, "gpu-three", sites)
    assert summary["state"] == "succeeded" and summary["rounds_done"] == 3
    store = RunStore(summary["store"])
    for site in "abc":
        [group] = group_events(store, site)
        assert [r["device"][:4] for r in group["ranks"]] == ["cuda"]
    results = store.results(3)
    assert set(results) == set("abc")
    assert {v["hash"] for v in results.values()} == {store.global_manifest(3)["hash"]}
    assert tagged_processes(summary["id"]) == []
