"""The controller's paths of consequence, driven tick by tick without a site:
the replacement limit, the drain wait, resume's refusals and adoption, and
`geotrain logs`. Every way a migration can fail, and a migration between
providers: tests/test_controller_migrate.py.

Providers are faked (`Cloud`: which nodes each one holds, every terminate
call; tests/controller_fakes.py); sites are played by writing what their agents
would write in the run store. No test waits for a timeout to pass: the time a
limit is measured from is set in the past instead.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from pathlib import Path

import pytest

from geotrain.controller import DRAIN_WAIT_S, Controller
from geotrain.errors import GeotrainError, RunNotFound
from geotrain.runs import prepare_resume, record_controller
from providers import Node
from tests.controller_fakes import (Cloud, Faked, cli, cloud, ctl, launched, live_pid,  # noqa: F401 - fixtures
                                    one_line_error, run_id)
from tests.helpers import as_member, geotrain_cmd, geotrain_home, wait_for  # noqa: F401

pytestmark = pytest.mark.timeout(120)


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


def test_a_site_that_says_it_is_done_while_it_is_judged_lost_is_kept(launched: Faked):
    # The tick read a's records while it was syncing its last round, with its liveness
    # stale (its last beats were lost to store errors); before the verdict, its agent
    # wrote its done heartbeat. Replacing it now would throw the finished site away.
    ctl = launched
    stale = time.time() - 100
    as_member(ctl, "a").beat("a", {"state": "syncing", "round": 3})
    as_member(ctl, "a").alive("a", "running", pid=1)
    hb, alive = ctl.store.heartbeat("a"), dict(ctl.store.liveness()["a"], at=stale)
    ctl.launched_at["a"] = stale
    as_member(ctl, "a").beat("a", {"state": "done", "round": 3})
    ctl._supervise("a", hb, alive)
    assert [x[0] for x in ctl.launches] == ["a", "b"] and ctl.cloud.terminated == []
    assert ctl.events("site-lost") == [] and ctl.store.heartbeat("a")["state"] == "done"
    assert [e["site"] for e in ctl.events("site-finished-late")] == ["a"]
    # Without a done heartbeat, the same stale records do replace it.
    as_member(ctl, "b").beat("b", {"state": "syncing", "round": 3})
    as_member(ctl, "b").alive("b", "running", pid=1)
    ctl.launched_at["b"] = stale
    ctl._supervise("b", ctl.store.heartbeat("b"), dict(ctl.store.liveness()["b"], at=stale))
    assert [x[0] for x in ctl.launches] == ["a", "b", "b"]
    assert [e["reason"][:20] for e in ctl.events("site-lost")] == ["no liveness beat for"]


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


def test_a_stop_signal_that_lands_while_a_console_is_read_still_stops_the_run(
        ctl: Faked, monkeypatch: pytest.MonkeyPatch):
    """`down` sends SIGTERM whenever it comes. Reading a booting node's console is a call
    whose failure the controller tolerates; a signal landing inside it once passed for that
    failure, the controller went on watching, and replaced the sites `down` then terminated
    (a node left running after `down`, seen in CI)."""
    import dataclasses
    import os
    import signal

    import geotrain.controller as controller_mod
    import providers

    real = providers.capabilities_of
    monkeypatch.setattr(providers, "capabilities_of",
                        lambda name: dataclasses.replace(real(name), console=True))
    get, signalled = providers.get, []

    def get_with_console(name):
        class WithConsole(get(name)):
            @staticmethod
            def console(node):
                if not signalled:
                    signalled.append(node.site)
                    os.kill(os.getpid(), signal.SIGTERM)  # as `geotrain down` does, right now
                return ""
        return WithConsole

    monkeypatch.setattr(providers, "get", get_with_console)
    monkeypatch.setattr(controller_mod, "CONSOLE_POLL_S", 0.0)
    ticks = []

    def on_tick(status: dict) -> None:  # sites never beat: a run that goes on never ends
        if signalled:
            ticks.append(status)
            assert len(ticks) < 50, "the controller went on after SIGTERM"
    ctl.on_tick = on_tick
    assert ctl.run() == "stopped"
    assert signalled == ["a"] and [e["kind"] for e in ctl.events()][-2:] == ["stopped", "teardown"]
    assert ctl.cloud.held == [] and len(ctl.launches) == 2  # both torn down, nothing relaunched


def test_down_says_when_the_controller_has_not_stopped_within_its_wait(
        run_id, geotrain_home, monkeypatch: pytest.MonkeyPatch):
    """A controller stuck in a provider call past DOWN_WAIT_S is not taken for stopped."""
    import sys

    import geotrain.runs as runs_mod
    from geotrain.runs import record_controller

    stuck = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                              "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); "
                              "time.sleep(120)"], stdout=subprocess.PIPE)
    try:
        assert stuck.stdout.readline().strip() == b"1"  # its handler is set
        db = Controller(run_id, geotrain_home).db
        record_controller(db, run_id, stuck.pid, state="running")
        monkeypatch.setattr(runs_mod, "DOWN_WAIT_S", 0.5)
        out = runs_mod.down(run_id, geotrain_home)
        assert out["controller_running"] == stuck.pid and out["state"] == "stopped"
        stuck.kill()
        stuck.wait(timeout=10)
        assert runs_mod.down(run_id, geotrain_home)["controller_running"] is None
    finally:
        stuck.kill()
        stuck.wait(timeout=10)


# -- resume ---------------------------------------------------------------------------


def test_resume_refuses_an_unknown_a_succeeded_and_a_controlled_run(run_id, geotrain_home, live_pid):
    db = Controller(run_id, geotrain_home).db
    with pytest.raises(RunNotFound):
        prepare_resume("nope", geotrain_home)
    assert "no run 'nope'" in one_line_error(cli("resume", "nope"))

    record_controller(db, run_id, live_pid, state="running")  # its pid and start time
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
