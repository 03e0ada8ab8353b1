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
    assert r["sync"]["outer_lr"] == 1.0 and r["sync"]["outer_momentum"] == 0
    assert r["store"]["url"] is None


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


# -- check, down --orphans, down after a killed controller, the budget stop ---------------

def test_check_reports_each_provider_and_never_raises(geotrain_home: Path, monkeypatch):
    import types

    from typer.testing import CliRunner

    import providers
    from geotrain.cli import app

    p = run("check", "--json", home=geotrain_home)
    assert p.returncode == 0, p.stderr
    rows = {r["provider"]: r for r in json.loads(p.stdout)}
    assert list(rows) == ["local", "aws", "gcp", "azure"] and rows["local"]["ok"] is True
    for name, r in rows.items():  # every provider is written, and its check() answered
        assert r["implemented"] is True and isinstance(r["ok"], bool), r
        assert r["detail"] and r["detail"] != "not implemented", r
        assert not r["detail"].startswith(("check() raised", "cannot import")), r

    secret = "AKIAABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    broken = types.ModuleType("providers.aws")
    broken.check = lambda: (_ for _ in ()).throw(RuntimeError(f"bad key {secret}"))
    real = providers.get
    monkeypatch.setattr(providers, "get", lambda n: broken if n == "aws" else real(n))
    runner = CliRunner()
    result = runner.invoke(app, ["check", "--json"])
    assert result.exit_code == 0 and secret not in result.output
    aws = {r["provider"]: r for r in json.loads(result.output)}["aws"]
    assert aws["ok"] is False and aws["detail"].startswith("check() raised RuntimeError: bad key [redacted]")
    result = runner.invoke(app, ["check", "--strict"])
    assert result.exit_code == 1 and secret not in result.output and "aws" in result.output

    # A provider module that is not there at all is reported, not raised.
    def missing(n):
        if n == "gcp":
            raise ModuleNotFoundError("No module named 'providers.gcp'", name="providers.gcp")
        return real(n)
    monkeypatch.setattr(providers, "get", missing)
    result = runner.invoke(app, ["check", "--json"])
    assert result.exit_code == 0, result.output
    gcp = {r["provider"]: r for r in json.loads(result.output)}["gcp"]
    assert (gcp["implemented"], gcp["ok"], gcp["detail"]) == (False, False, "not implemented")


RUN_RECIPE = """\
name: {name}
model: {{preset: tiny, n_layer: 2, d_model: 64, n_head: 4}}
train: {{rounds: 500, inner_steps: 10, batch_size: 4, seq_len: 64, warmup_steps: 5}}
{extra}sites:
{sites}"""


def local_recipe(tmp_path: Path, name: str, sites: int, extra: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    lines = "".join(f"  - {{name: {chr(97 + i)}, provider: local}}\n" for i in range(sites))
    path.write_text(RUN_RECIPE.format(name=name, extra=extra, sites=lines))
    return path


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_down_after_the_controller_is_killed_mid_provision_leaves_nothing(tmp_path: Path, geotrain_home: Path):
    import signal

    from geotrain.state import StateDB
    from tests.helpers import tagged_processes, wait_for

    recipe = local_recipe(tmp_path, "killed", sites=2)
    out = run("launch", str(recipe), "--detach", "--json", home=geotrain_home)
    run_id = json.loads(out.stdout)["run"]
    controller = StateDB(geotrain_home).run(run_id)["controller_pid"]
    from geotrain import procs

    def agents() -> list[int]:  # a site's agent, not only its notice endpoint (started first)
        return [p for p in tagged_processes(run_id) if procs.tags(p).get("GEOTRAIN_ROLE") == "agent"]
    try:
        wait_for(agents, timeout=60, every=0.05)
    finally:
        os.kill(controller, signal.SIGKILL)  # mid-provision: as soon as the first site exists
    p = run("down", run_id, "--json", home=geotrain_home)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["state"] == "stopped" and report["terminated"]
    assert tagged_processes(run_id) == []
    assert all(r["state"] == "terminated" for r in StateDB(geotrain_home).nodes(run_id))


def test_down_orphans_asks_first_and_sweeps_only_this_owners_nodes(geotrain_home: Path, monkeypatch):
    """A provider (faked) holds three nodes of runs unknown here: one tagged with this
    home's owner id, one with a teammate's, one with none. Only the first is ever swept,
    and only once the user said yes (or --yes); --dry-run lists it and terminates nothing."""
    import types

    from typer.testing import CliRunner

    import geotrain.cli.down as down_cli
    import providers
    from geotrain.cli import app
    from geotrain.state import owner_id
    from providers import Node

    me = owner_id(geotrain_home)
    assert owner_id(geotrain_home) == me and len(me) == 16  # made once, the same ever after
    assert (geotrain_home / "owner").stat().st_mode & 0o777 == 0o600
    held = [Node("run-gone", "a", "aws", "i-mine", "running", owner=me),
            Node("run-team", "a", "aws", "i-teammate", "running", owner="0123456789abcdef"),
            Node("run-old", "a", "aws", "i-untagged", "running")]
    calls = {"query_all": 0, "terminated": []}

    def query_all():
        calls["query_all"] += 1
        return [n for n in held if n.instance_id not in calls["terminated"]]

    def terminate(nodes):
        calls["terminated"] += [n.instance_id for n in nodes]
        return nodes
    fake = types.ModuleType("providers.aws")
    fake.query_all, fake.terminate = query_all, terminate
    monkeypatch.setattr(providers, "PROVIDERS", ("aws",))
    monkeypatch.setattr(providers, "get", lambda n: fake)
    runner = CliRunner()

    monkeypatch.setattr(down_cli, "interactive", lambda: False)  # no terminal, no --yes: refused
    result = runner.invoke(app, ["down", "--orphans"])
    assert result.exit_code == 1 and "pass --yes" in result.output
    assert len(result.output.strip().splitlines()) == 1 and calls["query_all"] == 0

    result = runner.invoke(app, ["down", "--orphans", "--dry-run", "--json"])  # no terminal needed
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["orphans"]
    assert [n["instance_id"] for n in report["found"]] == ["i-mine"] and report["others"] == 2
    assert report["dry_run"] is True and report["terminated"] == [] and calls["terminated"] == []
    result = runner.invoke(app, ["down", "--orphans", "--dry-run"])
    assert "would terminate 1 orphaned node(s)" in result.output and "i-mine" in result.output
    assert calls["terminated"] == []

    monkeypatch.setattr(down_cli, "interactive", lambda: True)  # asked: no
    result = runner.invoke(app, ["down", "--orphans"], input="n\n")
    assert result.exit_code == 0, result.output
    assert "i-mine" in result.output and "nothing terminated" in result.output
    assert calls["terminated"] == []
    result = runner.invoke(app, ["down", "--orphans"], input="y\n")  # asked: yes
    assert result.exit_code == 0 and "terminated 1 orphaned node(s)" in result.output
    assert calls["terminated"] == ["i-mine"]

    held.append(Node("run-gone", "b", "aws", "i-mine-2", "running", owner=me))
    monkeypatch.setattr(down_cli, "interactive", lambda: False)
    result = runner.invoke(app, ["down", "--orphans", "--yes", "--json"])
    assert result.exit_code == 0, result.output
    assert [n["instance_id"] for n in json.loads(result.output)["orphans"]["terminated"]] == ["i-mine-2"]
    assert calls["terminated"] == ["i-mine", "i-mine-2"]  # the teammate's and the untagged one live


def test_down_orphans_without_a_terminal_or_yes_refuses_in_one_line(geotrain_home: Path):
    p = subprocess.run(geotrain_cmd("down", "--orphans"), capture_output=True, text=True, timeout=50,
                       stdin=subprocess.DEVNULL, env=dict(os.environ, GEOTRAIN_HOME=str(geotrain_home)))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    [line] = p.stderr.strip().splitlines()
    assert line.startswith("error: ") and "pass --yes" in line


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_down_orphans_terminates_runs_that_are_over_and_only_this_homes(tmp_path: Path, geotrain_home: Path,
                                                                        monkeypatch):
    import signal

    from geotrain.state import StateDB
    from providers import local
    from tests.helpers import tagged_processes, wait_for

    recipe = local_recipe(tmp_path, "orphan", sites=1)
    run_id = json.loads(run("launch", str(recipe), "--detach", "--json", home=geotrain_home).stdout)["run"]
    db = StateDB(geotrain_home)
    try:
        # The site's agent itself is up (not only its metadata stand-in, which starts first):
        # what is left once the controller is gone is a running site.
        from geotrain import procs

        wait_for(lambda: any(procs.tags(p).get("GEOTRAIN_ROLE") == "agent"
                             for p in tagged_processes(run_id)), timeout=120, every=0.1)
        # And the controller has recorded it: a node a dead controller never wrote down is
        # an orphan even of a running run (seen in CI: killed between spawn and record).
        wait_for(lambda: any(n["instance_id"] for n in db.nodes(run_id)), timeout=120, every=0.1)
        os.kill(db.run(run_id)["controller_pid"], signal.SIGKILL)
        assert [n.site for n in local.query_all() if n.run_id == run_id] == ["a"]
        monkeypatch.setenv("GEOTRAIN_HOME", str(tmp_path / "another-home"))
        assert [n for n in local.query_all() if n.run_id == run_id] == []  # not that home's
        monkeypatch.setenv("GEOTRAIN_HOME", str(geotrain_home))
        # Running by the db: not an orphan.
        report = json.loads(run("down", "--orphans", "--yes", "--json", home=geotrain_home).stdout)["orphans"]
        assert [n for n in report["terminated"] if n["run_id"] == run_id] == []
        assert tagged_processes(run_id)
        db.update_run(run_id, state="failed")  # the db says it is over: now it is an orphan
        p = run("down", "--orphans", "--yes", home=geotrain_home)
        assert p.returncode == 0, p.stderr
        assert "terminated 1 orphaned node(s)" in p.stdout and run_id in p.stdout
        assert tagged_processes(run_id) == []
        assert all(r["state"] == "terminated" for r in db.nodes(run_id))
    finally:
        for pid in tagged_processes(run_id):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_budget_stops_the_run(tmp_path: Path, geotrain_home: Path):
    from geotrain.store import RunStore
    from tests.helpers import tagged_processes

    # A test catalog gives local sites a price: $3600/h, i.e. $1 a second.
    (geotrain_home / "catalog").mkdir(parents=True)
    (geotrain_home / "catalog/local.json").write_text(json.dumps({
        "provider": "local", "retrieved": "test", "instances": {
            "local": {"gpus": 0, "regions": {"local": {"on_demand": 3600.0}}}}}))
    recipe = local_recipe(tmp_path, "budget", sites=1, extra="budget: {max_usd: 3}\n")
    p = run("plan", str(recipe), "--json", home=geotrain_home)
    assert json.loads(p.stdout)["usd_per_hour"] == 3600.0
    p = subprocess.run(geotrain_cmd("launch", str(recipe), "--json"), capture_output=True, text=True,
                       timeout=150, env=dict(os.environ, GEOTRAIN_HOME=str(geotrain_home)))
    assert p.returncode == 130, p.stderr  # stopped
    s = json.loads(p.stdout)
    assert s["state"] == "stopped" and s["spend_usd"] > 3
    # Stopped at the very tick that crossed $3: one budget event, and no spend
    # recorded after it (however long that tick came after launch on this machine).
    [budget] = [e for e in RunStore(s["store"]).events([]) if e["kind"] == "budget"]
    assert budget["spend_usd"] == pytest.approx(s["spend_usd"], abs=1e-5)
    assert s["rounds_done"] < s["rounds_total"]
    assert s["sites"][0]["usd_per_hour"] == 3600.0
    logs = run("logs", s["id"], home=geotrain_home).stdout
    assert "budget" in logs and "crossed the budget $3.00" in logs
    assert tagged_processes(s["id"]) == []


def test_a_skipped_provider_names_the_setting_to_export_and_hides_keys():
    """`down --orphans` and `check` cut key-like runs out of a provider's error, but
    the name of the setting it asks for is kept: once, 'AZURE_SUBSCRIPTION_ID is not
    set' read '[redacted] is not set'."""
    from geotrain.checks import redact

    said = redact("AZURE_SUBSCRIPTION_ID is not set: export the id of the subscription; "
                  "key AKIAIOSFODNN7EXAMPLE1234 refused")
    assert said.startswith("AZURE_SUBSCRIPTION_ID is not set") and "AKIA" not in said, said
