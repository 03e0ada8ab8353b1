"""The controller's paths of consequence, driven tick by tick without a site:
the replacement limit, the drain wait, resume's refusals and adoption, every
way a migration can fail, a migration between providers, and `geotrain logs`.

Providers are faked (`Cloud`: which nodes each one holds, every terminate
call); sites are played by writing what their agents would write in the run
store. No test waits for a timeout to pass: the time a limit is measured from
is set in the past instead.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from pathlib import Path

import pytest

import geotrain.controller as controller_mod
import geotrain.migrate as migrate_mod
import providers
from geotrain.controller import DRAIN_WAIT_S, Controller
from geotrain.runs import prepare_resume
from geotrain.errors import GeotrainError, RunNotFound, StoreError
from geotrain.migrate import DRAIN_TIMEOUT_S, JOIN_TIMEOUT_S, request_site_migration, request_store_migration
from geotrain.recipe import Placement
from providers import Node
from tests.fake_controller import Ticked, tiny_run
from tests.helpers import as_member, geotrain_cmd, geotrain_home, wait_for  # noqa: F401

pytestmark = pytest.mark.timeout(120)


class Cloud:
    """Every provider at once, faked: the nodes each holds, each terminate call."""

    def __init__(self):
        self.held: list[Node] = []
        self.terminated: list[tuple[str, str, str]] = []  # (provider, member, instance id)

    def get(self, name: str):
        if name not in providers.PROVIDERS:
            raise ValueError(f"unknown provider {name!r}")
        cloud = self

        class Provider:
            @staticmethod
            def query(run_id, site=None, regions=None):
                return [n for n in cloud.held if n.provider == name and n.run_id == run_id
                        and (site is None or n.site == site)]

            @staticmethod
            def terminate(nodes):
                for n in nodes:
                    cloud.terminated.append((name, n.site, n.instance_id))
                gone = {n.instance_id for n in nodes}
                cloud.held = [n for n in cloud.held if n.instance_id not in gone]
                return nodes
        return Provider

    def holds(self, member: str) -> list[str]:
        return [n.instance_id for n in self.held if n.site == member]


class Faked(Ticked):
    """A controller whose launches are recorded and answered by `Cloud`."""

    def __init__(self, run_id: str, home: Path, cloud: Cloud):
        super().__init__(run_id, home)
        self.cloud = cloud
        self.launches: list[tuple[str, str, str, str | None]] = []  # (site, member, provider, region)
        self.dead_on_launch: set[str] = set()  # sites whose node is gone as soon as launched

    def _launch_spec(self, name, spec):
        self.launches.append((name, spec.name, spec.provider, spec.region))
        row = self.db.add_node(self.run_id, spec.name, spec.provider, spec.region)
        node = Node(self.run_id, spec.name, spec.provider, f"{spec.provider}-{row}", "running",
                    pid=100000 + row, region=spec.region)
        self.db.update_node(row, instance_id=node.instance_id, state="running")
        if name not in self.dead_on_launch:
            self.cloud.held.append(node)
        return [node], Placement(provider=spec.provider, region=spec.region,
                                 instance_type=spec.instance_type, spot=spec.spot)

    def step(self) -> None:
        """What one tick of `watch` does for migrations."""
        self._poll_requests()
        self._advance_migrations()
        self._advance_store_migration()

    def events(self, kind: str | None = None) -> list[dict]:
        return [e for e in self.store.events([]) if kind is None or e["kind"] == kind]

    def node_rows(self, member: str) -> list[str]:
        return [r["state"] for r in self.db.nodes(self.run_id) if r["site"] == member]


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Cloud:
    c = Cloud()
    monkeypatch.setattr(providers, "get", c.get)
    monkeypatch.setattr(controller_mod, "POLL_S", 0.01)
    return c


@pytest.fixture
def run_id(geotrain_home: Path, tmp_path: Path) -> str:
    return tiny_run(geotrain_home, tmp_path, "paths", liveness_timeout_s=60, boot_timeout_s=600)


@pytest.fixture
def ctl(run_id: str, geotrain_home: Path, cloud: Cloud) -> Faked:
    return Faked(run_id, geotrain_home, cloud)


@pytest.fixture
def launched(ctl: Faked) -> Faked:
    """Both sites launched, their nodes up."""
    ctl.provision()
    assert [x[:2] for x in ctl.launches] == [("a", "a"), ("b", "b")]
    return ctl


@pytest.fixture
def live_pid():
    """A real process that is not this one, to stand for a live controller."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=10)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(geotrain_cmd(*args), capture_output=True, text=True, timeout=timeout)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    """A user's mistake: exit 1, one line on stderr, no traceback."""
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def accept(ctl: Faked, r: int, *members: str) -> None:
    """Round r decided as a site's RoundExchange decides it: `members` accepted."""
    ctl.store.decide_members(r, {"accepted": [{"site": m, "round": r, "sha256": "0" * 64, "tokens": 64.0,
                                               "norm": 1.0} for m in members],
                                 "rejected": [], "decided_by": "b", "decided_at": time.time()})


def copied(ctl: Faked) -> None:
    """The store move asked for is started, its copy has ended, and the controller has seen it."""
    ctl._poll_requests()
    assert [e["kind"] for e in ctl.events()][-1] == "migrate-store-started"
    ctl.store_move["thread"].join(60)
    assert not ctl.store_move["thread"].is_alive()
    ctl._advance_store_migration()


# -- supervision ----------------------------------------------------------------------


def limit_replacements(ctl: Faked, n: int) -> None:
    """As `sync: {max_replacements: n}` in the recipe would."""
    ctl.recipe = ctl.recipe.model_copy(update={"sync": ctl.recipe.sync.model_copy(
        update={"max_replacements": n})})


def test_a_site_lost_past_the_replacement_limit_fails_the_run(ctl: Faked):
    limit_replacements(ctl, 2)
    ctl.dead_on_launch.add("a")  # every incarnation of a is gone at once; b boots slowly
    assert ctl.run() == "failed"
    assert [x[0] for x in ctl.launches] == ["a", "b", "a", "a"]  # launch + 2 replacements
    why = "site a was lost 3 times; giving up (node gone)"
    run = ctl.db.run(ctl.run_id)
    assert run["state"] == "failed" and run["error"] == why and run["finished_at"]
    assert [(e["site"], e["reason"]) for e in ctl.events("site-lost")] == [("a", "node gone")] * 3
    assert len(ctl.events("site-replaced")) == 2
    failed = ctl.events("failed")
    assert len(failed) == 1 and failed[0]["message"] == f"run failed: {why}"
    assert ctl.cloud.holds("b") == [] and ctl.node_rows("b") == ["terminated"]  # torn down


class Failing(Faked):
    """Each of the first `fails[site]` agents of a site fails at once, as its agent
    reports it: a failed heartbeat with the error, then its last liveness write."""

    def __init__(self, run_id: str, home: Path, cloud: Cloud, fails: dict[str, int]):
        super().__init__(run_id, home, cloud)
        self.fails = fails

    def _launch_spec(self, name, spec):
        out = super()._launch_spec(name, spec)
        if self.fails.get(name, 0) > 0:
            self.fails[name] -= 1
            as_member(self, spec.name).beat(spec.name, {"state": "failed", "error": "SyncError: CUDA out of memory"})
            as_member(self, spec.name).alive(spec.name, "failed", pid=1)
        return out


def test_a_failed_site_is_replaced_and_the_run_goes_on(run_id, geotrain_home, cloud: Cloud):
    ctl = Failing(run_id, geotrain_home, cloud, {"a": 1})

    def sites_train_to_the_end(status: dict) -> None:  # once a is replaced, both finish
        if len(ctl.launches) == 3 and not ctl.store.is_committed(3):
            files, manifest = ctl.store.read_global(0)
            ctl.store.commit_global(3, files, manifest)
            for member in ("a", "b"):
                as_member(ctl, member).beat(member, {"state": "done", "round": 3, "first_step_at": time.time()})
    ctl.on_tick = sites_train_to_the_end
    assert ctl.run() == "succeeded"
    assert [x[0] for x in ctl.launches] == ["a", "b", "a"]
    assert [(e["site"], e["reason"]) for e in ctl.events("site-lost")] == \
        [("a", "failed: SyncError: CUDA out of memory")]
    assert [e["site"] for e in ctl.events("site-replaced")] == ["a"]
    assert [e["site"] for e in ctl.events("site-rejoined")] == ["a"]
    assert ctl.events("failed") == [] and ctl.db.run(ctl.run_id)["error"] is None


def test_a_site_that_keeps_failing_fails_the_run_once_its_replacements_are_used(
        run_id, geotrain_home, cloud: Cloud):
    ctl = Failing(run_id, geotrain_home, cloud, {"a": 99})
    limit_replacements(ctl, 2)
    assert ctl.run() == "failed"
    assert [x[0] for x in ctl.launches] == ["a", "b", "a", "a"]  # launch + 2 replacements
    why = "site a was lost 3 times; giving up (failed: SyncError: CUDA out of memory)"
    run = ctl.db.run(ctl.run_id)
    assert run["state"] == "failed" and run["error"] == why
    assert [e["reason"] for e in ctl.events("site-lost")] == ["failed: SyncError: CUDA out of memory"] * 3
    assert len(ctl.events("site-replaced")) == 2
    assert [e["message"] for e in ctl.events("failed")] == [f"run failed: {why}"]
    assert ctl.cloud.held == []  # torn down


def test_no_replacements_allowed_fails_the_run_at_the_first_loss(run_id, geotrain_home, cloud: Cloud):
    ctl = Failing(run_id, geotrain_home, cloud, {"a": 99})
    limit_replacements(ctl, 0)
    assert ctl.run() == "failed"
    assert [x[0] for x in ctl.launches] == ["a", "b"]
    assert ctl.db.run(ctl.run_id)["error"] == \
        "site a was lost 1 times; giving up (failed: SyncError: CUDA out of memory)"


def test_a_preempted_site_that_does_not_drain_is_replaced_once_the_wait_is_over(launched: Faked):
    ctl = launched
    old = ctl.cloud.holds("a")
    as_member(ctl, "a").alive("a", "preempting", pid=1)
    ctl.tick()
    ctl.tick()  # its node is still up, within DRAIN_WAIT_S: it may still be publishing
    assert len(ctl.launches) == 2 and "a" in ctl.draining and ctl.cloud.terminated == []
    ctl.draining["a"] = time.time() - DRAIN_WAIT_S - 1
    ctl.tick()
    assert [x[0] for x in ctl.launches] == ["a", "b", "a"] and "a" not in ctl.draining
    assert ctl.cloud.terminated == [("local", "a", old[0])]
    assert ctl.store.liveness()["a"]["state"] == "replaced"
    for _ in range(3):  # the replacement boots: nothing more
        ctl.tick()
    assert len(ctl.launches) == 3
    assert [e["reason"] for e in ctl.events("site-lost")] == ["preempted"]
    assert [e["site"] for e in ctl.events("site-replaced")] == ["a"]


# -- resume ---------------------------------------------------------------------------


def test_resume_refuses_an_unknown_a_succeeded_and_a_controlled_run(run_id, geotrain_home, live_pid):
    db = Controller(run_id, geotrain_home).db
    with pytest.raises(RunNotFound):
        prepare_resume("nope", geotrain_home)
    assert "no run 'nope'" in one_line_error(cli("resume", "nope"))

    db.update_run(run_id, state="running", controller_pid=live_pid)
    with pytest.raises(GeotrainError, match=f"still controlled by pid {live_pid}"):
        prepare_resume(run_id, geotrain_home)
    assert f"run {run_id} is still controlled by pid {live_pid}" in one_line_error(cli("resume", run_id))

    db.update_run(run_id, state="succeeded", controller_pid=None, finished_at=time.time())
    with pytest.raises(GeotrainError, match="already succeeded"):
        prepare_resume(run_id, geotrain_home)
    assert f"run {run_id} already succeeded; nothing to resume" in one_line_error(cli("resume", run_id))
    assert db.run(run_id)["state"] == "succeeded"  # refused: nothing changed

    db.update_run(run_id, state="running", controller_pid=999999999)  # its controller died
    assert prepare_resume(run_id[:12], geotrain_home) == run_id


def test_resume_keeps_a_done_site_and_adopts_a_live_one(ctl: Faked):
    as_member(ctl, "a").beat("a", {"state": "done", "round": 3})
    as_member(ctl, "b").alive("b", "running", pid=2)
    ctl.cloud.held.append(Node(ctl.run_id, "b", "local", "b-left-running", "running", pid=2))
    ctl.provision(adopt=True)
    assert ctl.launches == [] and ctl.nodes["a"] == []
    assert [n.instance_id for n in ctl.nodes["b"]] == ["b-left-running"]
    assert [e["site"] for e in ctl.events("site-adopted")] == ["b"]
    assert ctl.events("site-launched") == [] and ctl.cloud.terminated == []
    ctl.tick("a")  # a done site is never judged lost
    assert ctl.launches == [] and ctl.events("site-lost") == []


# -- migrate: every way it can fail -----------------------------------------------------


def test_migrating_an_unknown_site_or_one_already_moving_fails_and_changes_nothing(launched: Faked):
    ctl = launched
    request_site_migration(ctl.db, ctl.run_id, "zz", "local")
    ctl.step()
    [e] = ctl.events("migrate-failed")
    assert e["site"] == "zz" and e["error"] == "no site 'zz' in this run; sites: a, b"
    assert ctl.migrating == {} and len(ctl.launches) == 2

    request_site_migration(ctl.db, ctl.run_id, "a", "local")
    ctl.step()
    assert ctl.migrating["a"]["new"] == "a~1" and ctl.launches[-1][:2] == ("a", "a~1")
    request_site_migration(ctl.db, ctl.run_id, "a", "local")
    ctl.step()
    second = ctl.events("migrate-failed")[1:]
    assert [(e["site"], e["error"]) for e in second] == [("a", "site a is already being migrated")]
    assert len(ctl.launches) == 3 and len(ctl.events("migrate-started")) == 1


@pytest.mark.parametrize("how", ["new member failed", "join timeout"])
def test_an_aborted_migration_terminates_the_new_member_and_the_old_goes_on(launched: Faked, how):
    ctl = launched
    old = ctl.cloud.holds("a")
    request_site_migration(ctl.db, ctl.run_id, "a", "local")
    ctl.step()
    new = ctl.cloud.holds("a~1")
    ctl.step()  # neither failed nor late: still joining
    assert ctl.migrating["a"]["phase"] == "joining" and ctl.events("migrate-failed") == []
    if how == "new member failed":
        as_member(ctl, "a~1").beat("a~1", {"state": "failed", "error": "CUDA out of memory"})
        why = "the new member failed"
    else:
        ctl.migrating["a"]["t0"] = time.time() - JOIN_TIMEOUT_S - 1
        why = f"it did not join a round within {JOIN_TIMEOUT_S:g} s"
    ctl.step()
    [e] = ctl.events("migrate-failed")
    assert (e["site"], e["error"]) == ("a", why) and "a goes on" in e["message"]
    assert ctl.migrating == {} and ctl.member["a"] == "a"
    assert ctl.cloud.terminated == [("local", "a~1", new[0])]
    assert ctl.cloud.holds("a") == old and ctl.node_rows("a") == ["running"]
    assert ctl.node_rows("a~1") == ["terminated"]
    assert ctl.store.commands("a") == []  # the old member was never told to stop
    assert ctl.events("site-migrated") == []


def test_an_old_member_that_does_not_leave_is_terminated_after_the_drain_timeout(launched: Faked):
    ctl = launched
    old = ctl.cloud.holds("a")
    request_site_migration(ctl.db, ctl.run_id, "a", "local")
    ctl.step()
    accept(ctl, 1, "b", "a~1")
    ctl.step()
    [joined] = ctl.events("migrate-joined")
    assert joined["round"] == 1 and ctl.migrating["a"]["phase"] == "draining"
    assert [c.command for c in ctl.store.commands("a")] == ["stop"]
    ctl.step()  # still leaving, within DRAIN_TIMEOUT_S
    assert ctl.cloud.terminated == [] and "a" in ctl.migrating
    ctl.migrating["a"]["drain_at"] = time.time() - DRAIN_TIMEOUT_S - 1
    ctl.step()
    assert ctl.cloud.terminated == [("local", "a", old[0])] and ctl.migrating == {}
    assert ctl.member["a"] == "a~1" and ctl.node_rows("a") == ["terminated"]
    assert [e["member"] for e in ctl.events("site-migrated")] == ["a~1"]


def test_a_store_move_near_the_last_round_is_refused(launched: Faked, tmp_path):
    ctl = launched
    accept(ctl, 1, "a", "b")
    accept(ctl, 2, "a", "b")  # decided up to 2: a move could start at round 4 of 3
    request_store_migration(ctl.db, ctl.run_id, f"file://{tmp_path / 'elsewhere'}")
    copied(ctl)
    [e] = ctl.events("migrate-failed")
    assert e["error"] == "too late" and e["message"] == "too close to the end of the run to move the store"
    assert ctl.store_move is None and ctl.store.switch_request() is None
    assert ctl.db.run(ctl.run_id)["store"] == ctl.store.url and "elsewhere" not in ctl.store.url


def test_a_failed_store_copy_leaves_the_run_on_its_store(launched: Faked, tmp_path, monkeypatch):
    ctl = launched

    def broken(src, dst, **kw):
        raise StoreError("store: write refused by the backend")
    monkeypatch.setattr("geotrain.store_copy.copy_run", broken)
    to = f"file://{tmp_path / 'elsewhere'}"
    request_store_migration(ctl.db, ctl.run_id, to)
    copied(ctl)
    [e] = ctl.events("migrate-failed")
    assert e["store"] == to and e["error"] == "store: write refused by the backend"
    assert "the run goes on in the old store" in e["message"]
    assert ctl.store_move is None and ctl.store.switch_request() is None
    assert ctl.db.run(ctl.run_id)["store"] == ctl.store.url and "elsewhere" not in ctl.store.url
    assert ctl.events("store-migrated") == []


def test_migrate_refuses_a_malformed_target_or_store_url(run_id, geotrain_home, live_pid):
    Controller(run_id, geotrain_home).db.update_run(run_id, state="running", controller_pid=live_pid)
    line = one_line_error(cli("migrate", run_id, "--site", "a", "--to", "mars:olympus"))
    assert "--to 'mars:olympus': expected PROVIDER[:REGION[:INSTANCE]]" in line
    line = one_line_error(cli("migrate", run_id, "--store", "ftp://somewhere/runs"))
    assert "unsupported URL scheme 'ftp'" in line and "file://, s3://, gs://, az://" in line
    assert Controller(run_id, geotrain_home).db.take_requests(run_id) == []  # nothing was asked


# -- migrate between providers ----------------------------------------------------------


def test_a_site_migrates_from_local_to_aws(launched: Faked, geotrain_home, monkeypatch):
    ctl = launched
    monkeypatch.setattr(migrate_mod, "DRAIN_TIMEOUT_S", 0.0)  # the old member is not waited for
    old = ctl.cloud.holds("a")
    request_site_migration(ctl.db, ctl.run_id, "a", "aws:us-west-2:g5.xlarge")
    ctl.step()
    assert ctl.launches[-1] == ("a", "a~1", "aws", "us-west-2")
    [started] = ctl.events("migrate-started")
    assert started["member"] == "a~1" and started["to"]["provider"] == "aws"
    new = ctl.cloud.holds("a~1")
    as_member(ctl, "a~1").beat("a~1", {"state": "training", "first_step_at": time.time()})
    accept(ctl, 1, "a", "b")  # a round without the new member does not count
    ctl.step()
    assert ctl.migrating["a"]["phase"] == "joining"
    accept(ctl, 2, "a~1", "b")
    ctl.step()
    assert ctl.migrating["a"]["joined"] == 2 and ctl.cloud.terminated == []
    ctl.step()
    assert ctl.cloud.terminated == [("local", "a", old[0])]  # through the old provider
    assert ctl.cloud.holds("a~1") == new and new[0].startswith("aws-")
    row = {s["name"]: s for s in ctl.db.sites(ctl.run_id)}["a"]
    assert (row["provider"], row["region"], row["member"]) == ("aws", "us-west-2", "a~1")
    assert json.loads(row["placement"])["instance_type"] == "g5.xlarge"
    [e] = ctl.events("site-migrated")
    assert e["site"] == "a" and e["member"] == "a~1" and "aws/us-west-2" in e["message"]
    assert e["join_s"] >= 0 and e["seconds"] >= e["join_s"] and e["downtime_s"] == 0.0
    assert e["overlap_s"] >= 0  # the new member trained before the old one was told to stop
    assert ctl._site_alive("a") and ctl.node_rows("a") == ["terminated"]
    # A controller started now (resume) knows the site by its new member and placement.
    again = Faked(ctl.run_id, geotrain_home, ctl.cloud)
    assert again.member["a"] == "a~1" and again._spec("a").provider == "aws"
    assert again._spec("a").name == "a~1" and again._providers_of("a") == ["aws"]


# -- logs -----------------------------------------------------------------------------


def test_logs_json_prints_every_event_as_a_record(ctl: Faked):
    ctl.event("site-launched", "site a launched", site="a")
    ctl.store.event("a", "round", "round 1 done", round=1)
    ctl.store.event("b", "round", "round 1 done", round=1)
    p = cli("logs", ctl.run_id, "--json")
    assert p.returncode == 0, p.stderr
    records = [json.loads(line) for line in p.stdout.splitlines()]
    assert records == ctl.store.events(["a", "b"])
    assert [(r["source"], r["kind"]) for r in records] == [
        ("controller", "created"), ("controller", "site-launched"), ("a", "round"), ("b", "round")]
    p = cli("logs", ctl.run_id, "--json", "--site", "a")
    assert [json.loads(line)["source"] for line in p.stdout.splitlines()] == ["a"]


def test_logs_follow_prints_events_as_they_come_and_stops_with_the_run(ctl: Faked):
    proc = subprocess.Popen(geotrain_cmd("logs", ctl.run_id, "--follow"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    seen: list[str] = []

    def printed(text: str) -> bool:
        while not lines.empty():
            seen.append(lines.get())
        return any(text in x for x in seen)
    try:
        wait_for(lambda: printed("created"), 60)
        ctl.store.event("a", "round", "round 1 done by a")
        wait_for(lambda: printed("round 1 done by a"), 60)
        assert proc.poll() is None  # the run goes on: so does logs
        ctl.event("finished", "run finished: 3 rounds")  # as Controller.run ends a run
        ctl.db.update_run(ctl.run_id, state="succeeded", finished_at=time.time())
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        wait_for(lambda: printed("run finished: 3 rounds"), 10)
        assert [x.split()[2] for x in seen] == ["created", "round", "finished"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_logs_follow_prints_what_was_written_before_the_run_ended(ctl: Faked, monkeypatch, capsys):
    """The controller writes its last events, then the run's final state: whenever
    `logs --follow` sees the state, it has not missed an event written before it."""
    from geotrain.cli.logs import logs
    from geotrain.state import StateDB

    real, calls = StateDB.run, []

    def run(db, run_id):
        calls.append(run_id)
        if len(calls) == 2:  # the run ends between two of logs' reads of the db
            ctl.event("finished", "run finished: 3 rounds")
            ctl.db.update_run(ctl.run_id, state="succeeded", finished_at=time.time())
        return real(db, run_id)
    monkeypatch.setattr(StateDB, "run", run)
    logs(ctl.run_id, follow=True, as_json=True)
    kinds = [json.loads(line)["kind"] for line in capsys.readouterr().out.splitlines()]
    assert kinds == ["created", "finished"]
