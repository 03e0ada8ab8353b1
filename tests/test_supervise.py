"""The controller's judgement of a site, without starting one: what it writes
in the store (liveness, heartbeats) decides lost, booting or fine."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.fake_controller import Ticked, tiny_run
from tests.helpers import as_member, geotrain_home  # noqa: F401

pytestmark = pytest.mark.timeout(60)


class Supervised(Ticked):
    """A controller whose provider calls are recorded, not made."""

    def __init__(self, run_id: str, home: Path):
        super().__init__(run_id, home)
        self.node_up = {n: True for n in self.sites}
        self.launches: list[str] = []

    def _site_alive(self, name: str) -> bool:
        return self.node_up[name]

    def _providers_of(self, name: str) -> list[str]:
        return []

    def _launch(self, name: str) -> None:
        self.launches.append(name)
        self.nodes[name] = []
        self.launched_at[name] = time.time()


@pytest.fixture
def ctl(geotrain_home: Path, tmp_path: Path) -> Supervised:
    c = Supervised(tiny_run(geotrain_home, tmp_path, "sup", liveness_timeout_s=1, boot_timeout_s=30),
                   geotrain_home)
    c.launched_at = {"a": time.time() - 10, "b": time.time() - 10}
    return c


def test_a_silent_site_is_lost_and_replaced_once(ctl: Supervised):
    as_member(ctl, "a").alive("a", "running", pid=1)
    as_member(ctl, "a").beat("a", {"state": "training", "first_step_at": time.time()})
    ctl.tick()
    assert ctl.launches == []  # fresh beat: fine
    time.sleep(1.3)
    ctl.tick()
    assert ctl.launches == ["a"]
    # The old agent's last record is now marked as replaced: the replacement is
    # booting, not silent, until boot_timeout_s — however long it takes to beat.
    assert ctl.store.liveness()["a"]["state"] == "replaced"
    time.sleep(1.3)
    ctl.tick()
    ctl.tick()
    assert ctl.launches == ["a"]
    ctl.launched_at["a"] = time.time() - 31  # past boot_timeout_s
    ctl.tick()
    assert ctl.launches == ["a", "a"]
    lost = [e for e in ctl.store.events([]) if e["kind"] == "site-lost"]
    assert "never booted" in lost[-1]["message"]


def test_a_site_launched_again_after_resume_is_booting_not_silent(ctl: Supervised):
    """`resume` after everything died launches every site again while the store still
    holds the dead incarnation's last liveness record, 'running' and old: that record
    says nothing about the agent just launched, which is booting until it beats."""
    as_member(ctl, "a").alive("a", "running", pid=1)
    as_member(ctl, "a").beat("a", {"state": "training", "first_step_at": time.time()})
    time.sleep(1.3)  # the old record is now older than liveness_timeout_s
    ctl.launched_at["a"] = time.time()  # launched again by the resumed controller
    time.sleep(1.3)  # ... and past liveness_timeout_s since that launch, still no beat
    ctl.tick()
    assert ctl.launches == []
    as_member(ctl, "a").alive("a", "starting", pid=2)  # the new agent's first beat
    ctl.tick()
    assert ctl.launches == []
    time.sleep(1.3)  # and now it falls silent: lost, as any site
    ctl.tick()
    assert ctl.launches == ["a"]


def test_a_preempted_sites_record_is_not_read_as_its_replacements(ctl: Supervised):
    as_member(ctl, "a").alive("a", "preempting", pid=1)
    as_member(ctl, "a").beat("a", {"state": "preempting", "first_step_at": time.time() - 5})
    ctl.tick()  # declared lost, draining while its node is up
    assert ctl.launches == [] and "a" in ctl.draining
    ctl.node_up["a"] = False  # it drained and left
    ctl.tick()
    assert ctl.launches == ["a"] and "a" not in ctl.draining
    ctl.node_up["a"] = True  # the replacement's node, its agent not beating yet
    for _ in range(3):
        ctl.tick()
    assert ctl.launches == ["a"]
    assert [e["kind"] for e in ctl.store.events([])].count("site-lost") == 1
    # The replacement trains: rejoined, once.
    as_member(ctl, "a").alive("a", "running", pid=2)
    as_member(ctl, "a").beat("a", {"state": "training", "first_step_at": time.time()})
    ctl.tick()
    ctl.tick()
    kinds = [e["kind"] for e in ctl.store.events([])]
    assert kinds.count("site-rejoined") == 1 and kinds.count("site-replaced") == 1


def test_a_failed_site_is_lost_and_replaced_not_the_run_failed(ctl: Supervised):
    """Its own failure (a SyncError, a crash in its trainer) makes a site lost,
    like a silent one: replaced once its agent has left, the others go on."""
    as_member(ctl, "a").alive("a", "running", pid=1)
    as_member(ctl, "a").beat("a", {"state": "failed", "error": "SyncError: round 2: no decision"})
    ctl.tick()  # declared lost at once; its agent is still writing its last records
    [lost] = [e for e in ctl.store.events([]) if e["kind"] == "site-lost"]
    assert lost["site"] == "a" and lost["reason"] == "failed: SyncError: round 2: no decision"
    assert ctl.launches == [] and "a" in ctl.failing
    as_member(ctl, "a").alive("a", "failed", pid=1)  # the agent's last write: it has left
    ctl.tick()
    assert ctl.launches == ["a"] and "a" not in ctl.failing
    assert ctl.store.liveness()["a"]["state"] == "replaced"
    assert ctl.store.heartbeat("a")["state"] == "replaced"
    ctl.tick("b")  # the other site is not touched
    assert ctl.launches == ["a"]


def test_a_failed_site_whose_node_is_gone_is_replaced_at_once(ctl: Supervised):
    as_member(ctl, "a").alive("a", "running", pid=1)
    as_member(ctl, "a").beat("a", {"state": "failed", "error": "boom"})
    ctl.node_up["a"] = False
    ctl.tick()
    assert ctl.launches == ["a"]
    kinds = [e["kind"] for e in ctl.store.events([])]
    assert kinds.count("site-lost") == 1 and kinds.count("site-replaced") == 1


def test_the_replacement_is_not_judged_by_the_old_failed_heartbeat(ctl: Supervised):
    as_member(ctl, "a").alive("a", "failed", pid=1)
    as_member(ctl, "a").beat("a", {"state": "failed", "error": "merger thread crashed", "first_step_at": time.time() - 5})
    ctl.tick()
    assert ctl.launches == ["a"]
    for _ in range(3):  # the replacement boots: nothing of the old agent is read as its own
        ctl.tick()
    assert ctl.launches == ["a"]
    as_member(ctl, "a").beat("a", {"state": "starting", "pid": 2})
    as_member(ctl, "a").alive("a", "starting", pid=2)
    ctl.tick()
    as_member(ctl, "a").alive("a", "running", pid=2)
    as_member(ctl, "a").beat("a", {"state": "training", "first_step_at": time.time()})
    ctl.tick()
    ctl.tick()
    kinds = [e["kind"] for e in ctl.store.events([])]
    assert ctl.launches == ["a"]
    assert (kinds.count("site-lost"), kinds.count("site-replaced"), kinds.count("site-rejoined")) == (1, 1, 1)
    # The new agent fails in its turn: lost again, with its own error.
    as_member(ctl, "a").beat("a", {"state": "failed", "error": "second error"})
    as_member(ctl, "a").alive("a", "failed", pid=2)
    ctl.tick()
    assert ctl.launches == ["a", "a"]
    lost = [e["reason"] for e in ctl.store.events([]) if e["kind"] == "site-lost"]
    assert lost == ["failed: merger thread crashed", "failed: second error"]


def test_a_failed_agent_that_does_not_leave_is_replaced_after_the_wait(ctl: Supervised):
    from geotrain.controller import DRAIN_WAIT_S

    as_member(ctl, "a").alive("a", "running", pid=1)
    as_member(ctl, "a").beat("a", {"state": "failed", "error": "stuck"})
    ctl.tick()
    ctl.tick()
    assert ctl.launches == []
    ctl.failing["a"] = (time.time() - DRAIN_WAIT_S - 1, ctl.failing["a"][1])
    ctl.tick()
    assert ctl.launches == ["a"]


def test_a_failure_reported_only_in_liveness_takes_its_reason_from_the_sites_events(ctl: Supervised):
    ctl.store.event("a", "failed", "RuntimeError: size mismatch")
    as_member(ctl, "a").beat("a", {"state": "training", "first_step_at": time.time()})  # a worker's late beat
    as_member(ctl, "a").alive("a", "failed", pid=1)
    ctl.tick()
    assert ctl.launches == ["a"]
    [lost] = [e for e in ctl.store.events([]) if e["kind"] == "site-lost"]
    assert lost["reason"] == "failed: RuntimeError: size mismatch"
