"""The CLI as a user meets it: clear one-line errors, JSON shapes, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import geotrain_cmd, geotrain_home  # noqa: F401

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(geotrain_cmd(*args), capture_output=True, text=True, timeout=50,
                          env=dict(os.environ, GEOTRAIN_HOME=str(home), COLUMNS="200"))


def test_bad_recipe_is_one_clear_line(tmp_path: Path, geotrain_home: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  inner_stepz: 5\nsites: [{name: a}]\n")
    for command in ("validate", "launch"):
        p = run(command, str(bad), home=geotrain_home)
        assert p.returncode == 1
        assert "Traceback" not in p.stderr + p.stdout
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1, p.stderr
        assert f"{bad}:3: train.inner_stepz: unknown field 'inner_stepz'" in lines[0]
        assert "did you mean 'inner_steps'" in lines[0]
    assert not (geotrain_home / "runs").exists()  # nothing was created


def test_bad_recipe_as_json(tmp_path: Path, geotrain_home: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {preset: huge}\nsites: [{name: a}]\n")
    p = run("validate", str(bad), "--json", home=geotrain_home)
    assert p.returncode == 1
    err = json.loads(p.stdout)["error"]
    assert err["line"] == 2 and err["field"] == "model.preset" and "'tiny'" in err["message"]


def test_validate_prints_the_resolved_recipe(geotrain_home: Path):
    p = run("validate", str(ROOT / "recipes/local.yaml"), "--json", home=geotrain_home)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert [s["name"] for s in r["sites"]] == ["a", "b", "c"]
    assert r["sync"]["outer_lr"] == 0.7 and r["store"]["url"] is None


def test_schema_is_json_schema(geotrain_home: Path):
    p = run("schema", home=geotrain_home)
    s = json.loads(p.stdout)
    assert s["type"] == "object" and "sites" in s["properties"] and "sites" in s["required"]


def test_status_of_unknown_run(geotrain_home: Path):
    p = run("status", "nope", home=geotrain_home)
    assert p.returncode == 1 and "no run 'nope'" in p.stderr and "Traceback" not in p.stderr
    p = run("status", "--json", home=geotrain_home)
    assert p.returncode == 0 and json.loads(p.stdout) == []


def test_providers_lists_local_as_usable(geotrain_home: Path):
    p = run("providers", "--json", home=geotrain_home)
    rows = {r["name"]: r for r in json.loads(p.stdout)}
    assert rows["local"]["available"] is True
    assert set(rows) == {"local", "aws", "gcp", "azure"}


def test_data_that_matches_nothing_fails_before_anything_starts(tmp_path: Path, geotrain_home: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ndata: {source: files, paths: ['corpus/*.txt']}\nsites: [{name: a}]\n")
    p = run("launch", str(recipe), home=geotrain_home)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"{recipe}: data.paths: data pattern '{tmp_path}/corpus/*.txt' matches no files" in p.stderr
    assert json.loads(run("status", "--json", home=geotrain_home).stdout) == []
