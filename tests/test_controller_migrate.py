"""Migrations driven by the controller tick by tick, without a site: every way a
migration can fail (an unknown site or one already moving, a new member that fails or
never joins, an old member that does not leave, a store move too late or whose copy
fails, a malformed target) and a site moved from one provider to another.

Providers are faked (`Cloud`, tests/controller_fakes.py); sites are played by writing
what their agents would write in the run store; a limit's start time is set in the
past instead of waited for. The controller's other paths: tests/test_controller_paths.py.
"""

from __future__ import annotations

import json
import time

import pytest

import geotrain.migrate as migrate_mod
from geotrain.controller import Controller
from geotrain.errors import StoreError
from geotrain.migrate import DRAIN_TIMEOUT_S, JOIN_TIMEOUT_S, request_site_migration, request_store_migration
from geotrain.runs import record_controller
from tests.controller_fakes import (Faked, cli, cloud, ctl, launched, live_pid,  # noqa: F401 - fixtures
                                    one_line_error, run_id)
from tests.helpers import as_member, geotrain_home  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def accept(ctl: Faked, r: int, *members: str) -> None:
    """Round r decided as a site's RoundExchange decides it (signed by b): `members` accepted."""
    as_member(ctl, "b").decide_members(r, {"accepted": [{"site": m, "round": r, "sha256": "0" * 64, "tokens": 64.0,
                                               "norm": 1.0} for m in members],
                                 "rejected": [], "decided_by": "b", "decided_at": time.time()})


def copied(ctl: Faked) -> None:
    """The store move asked for is started, its copy has ended, and the controller has seen it."""
    ctl._poll_requests()
    assert [e["kind"] for e in ctl.events()][-1] == "migrate-store-started"
    ctl.store_move["thread"].join(60)
    assert not ctl.store_move["thread"].is_alive()
    ctl._advance_store_migration()


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
    record_controller(Controller(run_id, geotrain_home).db, run_id, live_pid, state="running")
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
