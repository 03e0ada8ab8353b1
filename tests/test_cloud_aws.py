"""AWS runs end to end from the CLI, against moto: never a real cloud.

Every command is a real `geotrain` subprocess, as a user would type it. EC2, IAM, STS
and the run store's S3 go through the fault proxy of tests/fakes/aws_faults.py, which
judges every call under infra/aws/geotrain-user-policy.json as AWS would
(`enforce_operator_policy`): the operator holds that policy and nothing more, and no
call may be refused (fixtures and helpers: tests/cloud_helpers.py). No VM ever boots here, so every
site stays `starting` until `down`; the assertions read what moto holds (by tag) and
what went on the wire: recipes/aws.yaml launched and torn down, failover across
candidates on capacity errors, a controller killed mid-provision then `down` and
`down --orphans`, and a site that never boots replaced after `sync.boot_timeout_s`.
The other clouds and several at once: tests/test_cloud_e2e.py.

Run: GEOTRAIN_HOME=$(mktemp -d) .venv/bin/python -m pytest -q tests/test_cloud_aws.py
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.cloud_helpers import (BUCKET, OPEN, PROFILE, ROOT, aws_env, cli, cli_json, iam, run_profiles,  # noqa: F401 - aws_env is a fixture
                                 ec2, enforce_operator_policy, events_from_db, refused, small, tagged,
                                 user_data, wait_started, write_recipe)
from tests.fakes.aws_faults import FaultProxy
from tests.helpers import wait_for


# -- 1 + 5: recipes/aws.yaml: launch -> status -> (never boots, not replaced) -> down ------

@pytest.mark.timeout(240)
def test_aws_recipe_launch_status_down(aws_env, moto_server):
    proxy, env, home = aws_env
    enforce_operator_policy(proxy, env)  # the operator holds only infra/aws's user policy
    t0 = time.monotonic()
    run_id = cli_json(env, "launch", "recipes/aws.yaml", "--detach", timeout=120)["run"]
    launched_s = time.monotonic() - t0
    status = wait_started(env, home, run_id, sites=2)
    started_s = time.monotonic() - t0

    sites = {s["name"]: s for s in status["sites"]}
    assert (sites["east"]["provider"], sites["east"]["region"]) == ("aws", "us-east-1")
    assert (sites["west"]["provider"], sites["west"]["region"]) == ("aws", "us-west-2")
    assert all(s["placements_tried"] == [] for s in sites.values())

    found = tagged(moto_server, run_id, ["us-east-1", "us-west-2"])
    assert sorted(found["instances"]) == ["us-east-1", "us-west-2"]
    for region, insts in found["instances"].items():
        for inst in insts:
            tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
            assert tags["geotrain-run"] == run_id
            assert tags["geotrain-site"] == {"us-east-1": "east", "us-west-2": "west"}[region]
            assert inst["InstanceLifecycle"] == "spot" and inst["InstanceType"] == "g5.12xlarge"
    assert found["instances"]["us-east-1"][0]["Placement"]["AvailabilityZone"] == "us-east-1a"
    runs = proxy.calls("RunInstances")
    assert len(runs) == 2 and all(r["InstanceMarketOptions.MarketType"] == "spot" for r in runs)
    # The recipe's node identity (run_role: a role and profile of each site's own, under
    # /geotrain/, for this run only), and no public address on any node.
    roles = iam(moto_server)
    made = run_profiles(moto_server)
    assert sorted(r["IamInstanceProfile.Arn"] for r in runs) == sorted(p["Arn"] for p in made)
    assert len(made) == 2 and all(p["Roles"][0]["RoleName"] != PROFILE for p in made)
    for prof in made:
        role = prof["Roles"][0]["RoleName"]
        tags = {t["Key"]: t["Value"] for t in roles.list_role_tags(RoleName=role)["Tags"]}
        assert tags["geotrain-run"] == run_id and tags["geotrain-site"] in ("east", "west"), tags
    assert all(r["NetworkInterface.1.AssociatePublicIpAddress"] == "false" for r in runs)
    for call in runs:  # what each node boots with: the run, its site, the aws watcher
        script = user_data(call)
        assert f"export GEOTRAIN_RUN={run_id}\n" in script
        assert "export GEOTRAIN_PROVIDER=aws\n" in script
        assert f"STORE=s3://{BUCKET}/runs/{run_id}\n" in script
    # No port of Ray (none at all) reachable from 0.0.0.0/0: one self-referencing rule.
    for region, groups in found["groups"].items():
        [sg] = groups
        assert [p.get("UserIdGroupPairs", [{}])[0].get("GroupId") for p in sg["IpPermissions"]] \
            == [sg["GroupId"]]
        assert not [r for p in sg["IpPermissions"] for r in p.get("IpRanges", []) + p.get("Ipv6Ranges", [])
                    if r.get("CidrIp", r.get("CidrIpv6")) in OPEN]

    # The sites never boot here: the controller keeps them `starting`, never replaces
    # them (a site that never beat is not stale) and polls only its two regions —
    # over at least four of its ticks, however long those take on this machine.
    proxy.requests.clear()
    wait_for(lambda: len(proxy.calls("DescribeInstances")) >= 4, 120, every=0.25)
    status = cli_json(env, "status", run_id)
    assert status["state"] == "running" and status["controller_pid"]
    assert [s["state"] for s in status["sites"]] == ["starting", "starting"]
    assert not proxy.calls("RunInstances") and not proxy.calls("TerminateInstances")
    assert not [e for e in events_from_db(env, run_id) if e["kind"] in ("site-lost", "site-replaced")]
    assert not proxy.calls("DescribeRegions")  # no sweep of every region per tick

    t1 = time.monotonic()
    down = cli(env, "down", run_id, timeout=120)
    down_s = time.monotonic() - t1
    ids = sorted(i["InstanceId"] for insts in found["instances"].values() for i in insts)
    assert f"terminated {len(ids)} node(s)" in down.stdout
    for i in ids:
        assert i in down.stdout
    after = tagged(moto_server, run_id)  # every region
    assert after == {"instances": {}, "groups": {}}, after
    assert roles.list_roles(PathPrefix="/geotrain/")["Roles"] == []  # the run's roles went with it
    assert run_profiles(moto_server) == []
    final = cli_json(env, "status", run_id)
    assert final["state"] == "stopped" and final["controller_pid"] is None
    assert not refused(proxy), refused(proxy)
    print(f"\naws.yaml: launch returned {launched_s:.1f} s, both sites launched {started_s:.1f} s, "
          f"down {down_s:.1f} s")


# -- 2: failover across candidates on capacity errors ------------------------------------

@pytest.mark.timeout(180)
def test_failover_to_the_candidate_when_every_zone_is_full(aws_env, moto_server, tmp_path):
    proxy, env, home = aws_env
    enforce_operator_policy(proxy, env)
    east1 = [s["SubnetId"] for s in ec2(moto_server, "us-east-1").describe_subnets()["Subnets"]]
    proxy.fail("RunInstances", "NetworkInterface.1.SubnetId", east1, "InsufficientInstanceCapacity")
    base = yaml.safe_load((ROOT / "recipes/aws.yaml").read_text())
    recipe = small(base)
    recipe["sites"] = [{"name": "east", "provider": "aws", "region": "us-east-1",
                        "zones": ["us-east-1a", "us-east-1b"], "instance_type": "g5.xlarge",
                        "spot": True, "aws": {"instance_profile": PROFILE}, "candidates": [
                            {"provider": "aws", "region": "us-east-2", "instance_type": "g5.xlarge",
                             "spot": True}]}]
    path = write_recipe(tmp_path / "failover.yaml", recipe)

    run_id = cli_json(env, "launch", str(path), "--detach")["run"]
    status = wait_started(env, home, run_id, sites=1)
    [site] = status["sites"]
    assert site["region"] == "us-east-2"
    [tried] = site["placements_tried"]
    assert (tried["provider"], tried["region"], tried["zones"]) == ("aws", "us-east-1",
                                                                      ["us-east-1a", "us-east-1b"])
    assert "InsufficientInstanceCapacity" in tried["error"] and "us-east-1a" in tried["error"]
    found = tagged(moto_server, run_id, ["us-east-1", "us-east-2"])
    assert list(found["instances"]) == ["us-east-2"]
    assert list(found["groups"]) == ["us-east-2"]  # the failed placement's group is gone
    cli(env, "down", run_id, timeout=120)
    assert tagged(moto_server, run_id) == {"instances": {}, "groups": {}}
    assert not refused(proxy), refused(proxy)


# -- 3: a controller killed mid-provision, then down / down --orphans ---------------------

def _gone(pid: int) -> bool:
    """The process has exited (no longer there, or a zombie not yet reaped)."""
    try:
        return "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
    except OSError:
        return True


def _launch_and_kill_mid_provision(env: dict, home: Path, proxy: FaultProxy, recipe: Path) -> str:
    """Launch detached, SIGKILL the controller while its RunInstances is held in the
    proxy (held until the controller is gone, however long that takes), and wait
    until that call has landed in moto anyway. Returns the run id."""
    from geotrain.state import StateDB

    proxy.hold("RunInstances")
    try:
        before = len(proxy.calls("RunInstances"))
        run_id = cli_json(env, "launch", str(recipe), "--detach")["run"]
        wait_for(lambda: len(proxy.calls("RunInstances")) > before, 60, every=0.05)
        pid = StateDB(home).run(run_id)["controller_pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _gone(pid), 60, every=0.05)
    finally:
        proxy.release("RunInstances")
    wait_for(lambda: "RunInstances" in proxy.forwarded, 60, every=0.1)
    proxy.forwarded.clear()
    status = cli_json(env, "status", run_id)
    assert status["state"] == "running" and status["controller_pid"] is None  # dead, db not told
    return run_id


@pytest.mark.timeout(240)
def test_killed_mid_provision_then_down_and_orphans(aws_env, moto_server, tmp_path):
    proxy, env, home = aws_env
    enforce_operator_policy(proxy, env)
    recipe = write_recipe(tmp_path / "aws-small.yaml",
                          small(yaml.safe_load((ROOT / "recipes/aws.yaml").read_text())))

    # down RUN: the db row written before the call says where to look; the tag finds it.
    first = _launch_and_kill_mid_provision(env, home, proxy, recipe)
    assert tagged(moto_server, first, ["us-east-1"])["instances"], "the held call never landed"
    out = cli_json(env, "down", first, timeout=120)
    assert out["state"] == "stopped" and len(out["terminated"]) == 1
    assert tagged(moto_server, first) == {"instances": {}, "groups": {}}

    # down --orphans: of a run whose controller died, the node the db never recorded
    # (its RunInstances answer never reached the dead controller) is an orphan.
    second = _launch_and_kill_mid_provision(env, home, proxy, recipe)
    [inst] = tagged(moto_server, second, ["us-east-1"])["instances"]["us-east-1"]
    out = cli_json(env, "down", "--orphans", "--yes", timeout=150)
    swept = [n for n in out["orphans"]["terminated"] if n["provider"] == "aws"]
    assert [(n["run_id"], n["instance_id"]) for n in swept] == [(second, inst["InstanceId"])]
    skipped = {s["provider"] for s in out["orphans"]["skipped"]}
    assert "aws" not in skipped and "local" not in skipped  # gcp/azure: no credentials here
    assert tagged(moto_server, second) == {"instances": {}, "groups": {}}
    from geotrain.state import StateDB
    assert all(r["state"] == "terminated" for r in StateDB(home).nodes(second))
    cli(env, "down", second)  # the run itself is ended by down RUN; nothing left to find
    assert cli_json(env, "status", second)["state"] == "stopped"
    assert not refused(proxy), refused(proxy)


# -- 5: a site that never boots is declared lost after sync.boot_timeout_s ---------------

@pytest.mark.timeout(180)
def test_boot_timeout_replaces_a_site_that_never_beat(aws_env, moto_server, tmp_path):
    proxy, env, home = aws_env
    enforce_operator_policy(proxy, env)
    recipe = small(yaml.safe_load((ROOT / "recipes/aws.yaml").read_text()), boot_timeout_s=4)
    recipe["sites"] = recipe["sites"][:1]
    run_id = cli_json(env, "launch", str(write_recipe(tmp_path / "boot.yaml", recipe)),
                      "--detach")["run"]
    wait_started(env, home, run_id, sites=1)

    def replaced():
        return [e for e in events_from_db(env, run_id) if e["kind"] == "site-replaced"]
    wait_for(replaced, 120, every=0.5)
    lost = [e for e in events_from_db(env, run_id) if e["kind"] == "site-lost"]
    assert lost and "never booted" in lost[0]["message"]
    # The replacement never boots either, so it is replaced in turn every few
    # seconds while this test looks: count calls in order, not nodes at an instant.
    with proxy.lock:
        actions = [r["Action"] for r in proxy.requests
                   if r.get("Action") in ("RunInstances", "TerminateInstances")]
    runs = [i for i, a in enumerate(actions) if a == "RunInstances"]
    assert len(runs) >= 2 and runs[0] == 0, actions  # the first node, then its replacement
    for a, b in zip(runs, runs[1:]):  # the old node went before the new one came
        assert "TerminateInstances" in actions[a + 1:b], actions
    live = tagged(moto_server, run_id, ["us-east-1", "us-east-2"])["instances"]
    assert sum(len(v) for v in live.values()) <= 1  # never two at once (none between the two calls)
    cli(env, "down", run_id, timeout=120)
    assert tagged(moto_server, run_id) == {"instances": {}, "groups": {}}
    assert not refused(proxy), refused(proxy)
