"""What a user reads when stdout is not a terminal: `plan`, `status` and `providers`
print every value whole (no `…`, no value cut into pieces or dropped), and the
end-of-run line of `launch` starts on its own line.

The CLI runs as a subprocess with stdout piped and no COLUMNS, as in
`geotrain plan r.yaml | less` or `geotrain status > status.txt`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import geotrain_cmd, geotrain_home  # noqa: F401

pytestmark = pytest.mark.timeout(120)

WIDE = """\
name: {name}
model: {{preset: tiny}}
train: {{rounds: 10, hours: 2}}
store: {{url: '{store}'}}
sites:
  - name: a-rather-long-site01
    provider: azure
    region: southcentralus
    instance_type: Standard_ND96asr_v4
    candidates:
      - {{provider: gcp, region: northamerica-northeast1, instance_type: a2-highgpu-8g}}
      - {{provider: azure, region: australiasoutheast, instance_type: Standard_ND96amsr_A100_v4}}
  - {{name: another-long-site-02, provider: local}}
"""
RUN_NAME = "a-run-name-that-is-long-enough-to-matter"  # 40 characters, the most a recipe allows


def piped(*args: str, home: Path) -> subprocess.CompletedProcess:
    """The CLI with stdout a pipe and no terminal width anywhere in its environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(GEOTRAIN_HOME=str(home), NO_GCE_CHECK="true", AWS_EC2_METADATA_DISABLED="true")
    p = subprocess.run(geotrain_cmd(*args), capture_output=True, text=True, timeout=100, env=env,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert "…" not in p.stdout, p.stdout
    return p


def line_with(text: str, first: str) -> str:
    """The one output line that holds `first`."""
    lines = [line for line in text.splitlines() if first in line]
    assert len(lines) == 1, text
    return lines[0]


def test_plan_prints_whole_values_to_a_pipe(tmp_path: Path, geotrain_home: Path):
    recipe = tmp_path / "wide.yaml"
    recipe.write_text(WIDE.format(name=RUN_NAME, store="s3://bucket/runs"))
    text = piped("plan", str(recipe), home=geotrain_home).stdout
    first = line_with(text, "a-rather-long-site01")
    for value in ("azure", "southcentralus", "Standard_ND96asr_v4", "8x A100", "27.20", "yes ◀"):
        assert value in first, first
    second = line_with(text, "northamerica-northeast1")
    for value in ("gcp", "a2-highgpu-8g", "no a2-highgpu-8g not offered on-demand in northamerica-northeast1"):
        assert value in second, second
    third = line_with(text, "australiasoutheast")
    assert "Standard_ND96amsr_A100_v4" in third and "is not in the azure catalog" in third
    assert "another-long-site-02" in text
    run = line_with(text, "run: $")
    assert "model ≈" in run and "M params" in run  # the summary is one line, too


def test_status_prints_whole_values_to_a_pipe(tmp_path: Path, geotrain_home: Path):
    from geotrain.runs import create_run
    from geotrain.recipe import load

    recipe = tmp_path / "wide.yaml"
    recipe.write_text(WIDE.format(name=RUN_NAME, store=f"file://{tmp_path / 'runs'}"))
    run_id = create_run(load(recipe), str(recipe), home=geotrain_home)
    assert len(run_id) > 60

    runs = piped("status", home=geotrain_home).stdout
    row = line_with(runs, run_id)
    assert "a-rather-long-site01,another-long-site-02" in row and "0/10" in row, runs
    one = piped("status", run_id, home=geotrain_home).stdout
    assert run_id in line_with(one, run_id)
    for site, provider in (("a-rather-long-site01", "azure"), ("another-long-site-02", "local")):
        assert provider in line_with(one, site), one


def test_providers_prints_whole_values_to_a_pipe(geotrain_home: Path):
    rows = json.loads(piped("providers", "--json", home=geotrain_home).stdout)
    text = piped("providers", home=geotrain_home).stdout
    assert any(len(r["detail"]) > 60 for r in rows)  # long enough that a narrow table would cut it
    for r in rows:
        line = line_with(text, f" {r['name']} ")
        assert r["detail"] in line, text
        caps = ", ".join(k for k, v in r.get("capabilities", {}).items() if v) or "-"
        assert caps in line, text


# -- the end-of-run line --------------------------------------------------------------------

def fake_status(run_id: str) -> dict:
    site = {"name": "a", "provider": "local", "state": "done", "round": 2, "step": 20, "loss": 2.5,
            "tokens_per_s": 1000.0, "bytes_sent": 2048, "placements_tried": []}
    return {"id": run_id, "state": "succeeded", "rounds_done": 2, "rounds_total": 2, "eval_loss": 2.25,
            "started_at": "2025-01-01T00:00:00+00:00", "finished_at": "2025-01-01T00:01:00+00:00",
            "spend_usd": 0.0, "sites": [site], "store": f"file:///tmp/runs/{run_id}", "error": None}


class FakeController:
    """Stands in for a whole run: one tick of the live view, then success."""

    def __init__(self, run_id: str, on_tick=None):
        self.run_id, self.on_tick = run_id, on_tick

    def run(self, resume: bool = False) -> str:
        if self.on_tick:
            self.on_tick(fake_status(self.run_id))
        return "succeeded"


def test_the_end_of_run_line_starts_on_its_own_line(monkeypatch, capsys):
    import typer

    from geotrain import controller, runs
    from geotrain.cli.launch import drive

    monkeypatch.setattr(controller, "Controller", FakeController)
    monkeypatch.setattr(runs, "status", fake_status)
    with pytest.raises(typer.Exit) as e:
        drive("run-eol", detach=False, as_json=False)
    assert e.value.exit_code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    finished = [line for line in lines if "finished: eval loss 2.2500" in line]
    assert len(finished) == 1 and finished[0].startswith("✓ finished"), out
    assert lines[-1] == finished[0] and out.endswith("\n")
    assert any(line.strip().startswith("a ") and "local" in line for line in lines[:-1]), out  # the view came first
