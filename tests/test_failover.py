"""Failover along a site's placements, with a test-double provider that has no room in
some places: the order, the node rows written before each call, the record of what was
tried (state db, status, the error), and the controller's provision using it."""

from __future__ import annotations

import json
import os
import subprocess
import types

import pytest

import providers
from geotrain.controller import Controller
from geotrain.runs import create_run, status
from geotrain.errors import CapacityError, ProviderError
from geotrain.placement import launch_site
from geotrain.recipe import loads
from geotrain.state import StateDB
from tests.helpers import geotrain_cmd, geotrain_home  # noqa: F401

pytestmark = pytest.mark.timeout(60)


class FakeCloud:
    """A provider module double: no capacity in `full` (region or region/zone), a hard
    error in `broken`; checks that the caller recorded a node row before each launch."""

    def __init__(self, name: str, db: StateDB, full: set[str] = frozenset(), broken: set[str] = frozenset()):
        self.name, self.db, self.full, self.broken = name, db, set(full), set(broken)
        self.calls: list[providers.SitePlan] = []
        self.live: dict[str, providers.Node] = {}

    def module(self) -> types.ModuleType:
        m = types.ModuleType(f"providers.{self.name}")
        m.launch, m.query, m.terminate = self.launch, self.query, self.terminate
        m.check = lambda: providers.CredentialCheck(self.name, True, "fake")
        m.capabilities = lambda: providers.Capabilities(True, True, False, True)
        return m

    def launch(self, plan: providers.SitePlan) -> list[providers.Node]:
        self.calls.append(plan)
        rows = [r for r in self.db.nodes(plan.run_id) if r["state"] == "requested"]
        assert [(r["site"], r["provider"], r["region"]) for r in rows] == [(plan.site, self.name, plan.region)]
        if plan.region in self.broken:
            raise ProviderError(f"{self.name}: credentials expired")
        if plan.region in self.full or any(f"{plan.region}/{z}" in self.full for z in plan.zones):
            raise CapacityError(f"InsufficientInstanceCapacity for {plan.instance_type} in {plan.region}")
        nodes = [providers.Node(plan.run_id, plan.site, self.name, f"i-{len(self.calls)}-{i}", "running",
                                region=plan.region) for i in range(plan.nodes)]
        self.live.update({n.instance_id: n for n in nodes})
        return nodes

    def query(self, run_id: str, site: str | None = None,
              regions: list[str] | None = None) -> list[providers.Node]:
        return [n for n in self.live.values() if n.run_id == run_id and site in (None, n.site)]

    def terminate(self, nodes: list[providers.Node]) -> list[providers.Node]:
        for n in nodes:
            self.live.pop(n.instance_id, None)
        return nodes


@pytest.fixture
def clouds(geotrain_home, monkeypatch):
    """Fake aws and gcp, registered through a monkeypatched providers.get."""
    db = StateDB(geotrain_home)
    fakes = {"aws": FakeCloud("aws", db), "gcp": FakeCloud("gcp", db)}
    real = providers.get
    monkeypatch.setattr(providers, "get", lambda name: fakes[name].module() if name in fakes else real(name))
    return db, fakes


SITE = """\
name: x
store: {url: 's3://bucket/runs'}
sites:
  - name: east
    provider: aws
    region: us-east-1
    instance_type: g5.12xlarge
    spot: true
    nodes: 2
    workers: 4
    candidates:
      - {provider: aws, region: us-east-2, zones: [us-east-2a, us-east-2b], instance_type: g5.12xlarge, spot: true}
      - {provider: gcp, region: us-central1, instance_type: g2-standard-48}
      - {provider: aws, region: us-west-2, instance_type: g5.12xlarge}
"""


def add_run(db: StateDB, recipe, run_id: str = "run-1") -> str:
    db.add_run(run_id, recipe.name, "r.yaml", recipe.to_dict(), "s3://bucket/runs/run-1",
               1, [{"name": s.name, "provider": s.provider, "region": s.region} for s in recipe.sites])
    return run_id


def test_fails_over_in_order_and_records_what_was_tried(clouds):
    db, fakes = clouds
    fakes["aws"].full = {"us-east-1", "us-east-2/us-east-2b"}
    fakes["gcp"].full = {"us-central1"}
    recipe = loads(SITE)
    run = add_run(db, recipe)
    nodes, placement, tried = launch_site(db, run, recipe.sites[0], store_url="s3://b/r")

    assert [(p.provider, p.region) for p in fakes["aws"].calls + fakes["gcp"].calls] == [
        ("aws", "us-east-1"), ("aws", "us-east-2"), ("aws", "us-west-2"), ("gcp", "us-central1")]
    assert (placement.provider, placement.region, placement.spot) == ("aws", "us-west-2", False)
    last = fakes["aws"].calls[-1]
    assert (last.nodes, last.workers, last.instance_type, last.store_url) == (2, 4, "g5.12xlarge", "s3://b/r")
    assert [n.instance_id for n in nodes] == ["i-3-0", "i-3-1"]
    assert [(a.provider, a.region, a.zones, a.spot) for a in tried] == [
        ("aws", "us-east-1", (), True), ("aws", "us-east-2", ("us-east-2a", "us-east-2b"), True),
        ("gcp", "us-central1", (), False)]
    assert "InsufficientInstanceCapacity" in tried[0].error

    rows = db.nodes(run)
    assert [(r["provider"], r["region"], r["state"], r["instance_id"]) for r in rows] == [
        ("aws", "us-east-1", "terminated", None), ("aws", "us-east-2", "terminated", None),
        ("gcp", "us-central1", "terminated", None), ("aws", "us-west-2", "running", "i-3-0"),
        ("aws", "us-west-2", "running", "i-3-1")]
    [site] = db.sites(run)
    assert (site["provider"], site["region"]) == ("aws", "us-west-2")
    assert site["usd_per_hour"] == pytest.approx(2 * 5.672) and site["launched_at"]
    assert [t["region"] for t in json.loads(site["placements_tried"])] == ["us-east-1", "us-east-2", "us-central1"]
    assert json.loads(site["placement"])["instance_type"] == "g5.12xlarge"


def test_all_full_is_a_capacity_error_listing_every_attempt(clouds):
    db, fakes = clouds
    fakes["aws"].full = {"us-east-1", "us-east-2", "us-west-2"}
    fakes["gcp"].full = {"us-central1"}
    recipe = loads(SITE)
    run = add_run(db, recipe)
    with pytest.raises(CapacityError) as info:
        launch_site(db, run, recipe.sites[0], store_url="s3://b/r")
    e = info.value
    assert len(e.tried) == 4 and e.tried[0].startswith("aws/us-east-1 g5.12xlarge spot: Insufficient")
    assert e.tried[1].startswith("aws/us-east-2[us-east-2a,us-east-2b] g5.12xlarge spot:")
    assert "site 'east': none of its 4 placement(s)" in str(e) and "gcp/us-central1 g2-standard-48" in str(e)
    assert len(json.loads(db.sites(run)[0]["placements_tried"])) == 4
    assert {r["state"] for r in db.nodes(run)} == {"terminated"}


def test_other_provider_errors_stop_at_once(clouds):
    db, fakes = clouds
    fakes["aws"].full = {"us-east-1"}
    fakes["aws"].broken = {"us-east-2"}
    recipe = loads(SITE)
    run = add_run(db, recipe)
    with pytest.raises(ProviderError, match="credentials expired"):
        launch_site(db, run, recipe.sites[0], store_url="s3://b/r")
    assert len(fakes["aws"].calls) == 2 and not fakes["gcp"].calls
    assert [t["error"] for t in json.loads(db.sites(run)[0]["placements_tried"])][-1] == "aws: credentials expired"


def test_gpu_requirement_launches_the_catalog_choice(clouds):
    db, fakes = clouds
    recipe = loads("name: x\nsites: [{name: a, provider: gcp, gpu: 'L4:4', spot: true}]\n")
    run = add_run(db, recipe)
    _, placement, tried = launch_site(db, run, recipe.sites[0], store_url="s3://b/r")
    assert (placement.instance_type, placement.region, tried) == ("g2-standard-48", "us-central1", [])
    assert fakes["gcp"].calls[0].instance_type == "g2-standard-48"


@pytest.mark.timeout(90)
def test_controller_provision_fails_over_and_status_shows_it(clouds, tmp_path, geotrain_home):
    db, fakes = clouds
    fakes["aws"].full = {"us-east-1"}
    recipe = loads(SITE.replace("s3://bucket/runs", str(tmp_path / "runs")))
    run = create_run(recipe, "r.yaml")
    c = Controller(run)
    c.provision()
    assert c.nodes["east"][0].region == "us-east-2"
    s = status(run)
    [site] = s["sites"]
    assert (site["provider"], site["region"]) == ("aws", "us-east-2")
    assert [t["region"] for t in site["placements_tried"]] == ["us-east-1"]
    env = dict(os.environ, GEOTRAIN_HOME=str(geotrain_home), COLUMNS="200")
    text = subprocess.run(geotrain_cmd("status", run), capture_output=True, text=True, env=env, check=True).stdout
    assert "east: tried aws/us-east-1 g5.12xlarge spot: InsufficientInstanceCapacity" in text
    j = json.loads(subprocess.run(geotrain_cmd("status", run, "--json"), capture_output=True, text=True,
                                  env=env, check=True).stdout)
    assert j["sites"][0]["placements_tried"][0]["region"] == "us-east-1"
    assert any("launched on aws/us-east-2[us-east-2a,us-east-2b]" in e["message"] for e in db.events(run))


@pytest.mark.timeout(90)
def test_a_run_with_no_capacity_anywhere_fails_with_what_was_tried(clouds, tmp_path):
    db, fakes = clouds
    fakes["aws"].full = {"us-east-1", "us-east-2", "us-west-2"}
    fakes["gcp"].full = {"us-central1"}
    recipe = loads(SITE.replace("s3://bucket/runs", str(tmp_path / "runs")))
    run = create_run(recipe, "r.yaml")
    assert Controller(run).run() == "failed"
    s = status(run)
    assert s["state"] == "failed" and "none of its 4 placement(s)" in s["error"]
    assert "tried: aws/us-east-1 g5.12xlarge spot" in s["error"]
    assert len(s["sites"][0]["placements_tried"]) == 4
    assert {r["state"] for r in db.nodes(run)} == {"terminated"}


def test_an_old_state_db_gains_the_new_columns(tmp_path):
    import sqlite3

    home = tmp_path / "old"
    home.mkdir()
    with sqlite3.connect(home / "state.db") as c:  # the first release's tables
        c.executescript("CREATE TABLE runs (id TEXT PRIMARY KEY, name TEXT, state TEXT);"
                        "CREATE TABLE sites (run_id TEXT, name TEXT, provider TEXT, region TEXT,"
                        " state TEXT, PRIMARY KEY (run_id, name));"
                        "INSERT INTO sites VALUES ('r', 'a', 'local', NULL, 'done');")
    StateDB(home)
    StateDB(home)  # twice: idempotent
    with sqlite3.connect(home / "state.db") as c:
        cols = {r[1] for r in c.execute("PRAGMA table_info(sites)")}
        assert {"placements_tried", "placement", "usd_per_hour", "launched_at"} <= cols
        assert "spend_usd" in {r[1] for r in c.execute("PRAGMA table_info(runs)")}
        assert c.execute("SELECT name, placements_tried FROM sites").fetchall() == [("a", None)]
