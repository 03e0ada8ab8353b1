"""Cloud runs end to end from the CLI, against the local stand-ins: never a real cloud.

Every command is a real `geotrain` subprocess, as a user would type it:
`launch RECIPE --detach --json`, `status RUN --json`, `down RUN`, `down --orphans`,
`check --json`. AWS is moto server (EC2 through the fault proxy of
tests/fakes/aws_faults.py, S3 straight to moto for the run store); GCP is the fake
Compute Engine + metadata server of tests/fakes/gce_server.py; Azure the fake TLS ARM
server + managed-identity endpoint of tests/fakes/arm_server.py. No VM ever boots
here, so every site stays `starting` until `down`; the assertions read what the
providers hold (by tag) and what went on the wire.

Run: GEOTRAIN_HOME=$(mktemp -d) .venv/bin/python -m pytest -q tests/test_cloud_e2e.py
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
import yaml

from tests.fakes.aws_faults import FaultProxy
from tests.helpers import geotrain_cmd, wait_for

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "my-geotrain-bucket"  # the bucket recipes/aws.yaml and multicloud.yaml name
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYGEOTRAINE2E"
ACCESS_KEY = "AKIAGEOTRAINE2EKEY01"
OPEN = ("0.0.0.0/0", "::/0")
PROFILE = "geotrain-node"  # the instance profile recipes/aws.yaml and multicloud.yaml name


# -- fixtures ---------------------------------------------------------------------------

@pytest.fixture
def aws_env(moto_server, tmp_path):
    """A fresh moto behind a fault proxy; (proxy, env for the CLI, home)."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST"),
                           timeout=10).close()
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                 aws_access_key_id="x", aws_secret_access_key="x").create_bucket(Bucket=BUCKET)
    # The node identity the recipes name, set up as infra/aws/README.md says.
    iam = boto3.client("iam", endpoint_url=moto_server, region_name="us-east-1",
                       aws_access_key_id="x", aws_secret_access_key="x")
    iam.create_role(RoleName=PROFILE, AssumeRolePolicyDocument=(
        ROOT / "infra/aws/geotrain-node-trust.json").read_text())
    iam.create_instance_profile(InstanceProfileName=PROFILE)
    iam.add_role_to_instance_profile(InstanceProfileName=PROFILE, RoleName=PROFILE)
    proxy = FaultProxy(moto_server)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "GOOGLE_", "GCE_", "AZURE_", "GEOTRAIN_", "IDENTITY_",
                                "MSI_"))}
    env.update(GEOTRAIN_HOME=str(home), AWS_ENDPOINT_URL=proxy.url, AWS_ENDPOINT_URL_S3=moto_server,
               AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
               AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE="/nonexistent/aws-config",
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials",
               AWS_EC2_METADATA_DISABLED="true", NO_PROXY="127.0.0.1,localhost",
               NO_GCE_CHECK="true", CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), PYTHONUNBUFFERED="1")
    try:
        yield proxy, env, home
    finally:
        proxy.close()


@pytest.fixture
def gce(tmp_path):
    from tests.fakes.gce_server import FakeGCE

    fake = FakeGCE()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def arm():
    from tests.fakes.arm_server import FakeArm

    fake = FakeArm().start()
    try:
        yield fake
    finally:
        fake.stop()


def gcp_env(fake) -> dict:
    return {"GEOTRAIN_GCE_ENDPOINT": fake.url, "GCE_METADATA_HOST": fake.host,
            "GCE_METADATA_IP": fake.host}


def azure_env(fake) -> dict:
    return {"AZURE_SUBSCRIPTION_ID": fake.subscription, "GEOTRAIN_ARM_ENDPOINT": fake.base_url,
            "GEOTRAIN_ARM_CA_BUNDLE": str(fake.ca_path), "IDENTITY_ENDPOINT": fake.identity_endpoint,
            "IDENTITY_HEADER": fake.identity_header}


# -- helpers ----------------------------------------------------------------------------

def cli(env: dict, *args: str, timeout: float = 90, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(geotrain_cmd(*args), env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"geotrain {' '.join(args)} exited {p.returncode}\n"
                             f"stdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-3000:]}")
    return p


def cli_json(env: dict, *args: str, timeout: float = 90):
    return json.loads(cli(env, *args, "--json", timeout=timeout).stdout)


def controller_log(home: Path, run_id: str) -> str:
    path = home / "logs" / run_id / "controller.log"
    return path.read_text()[-4000:] if path.exists() else "(no controller log)"


def wait_started(env: dict, home: Path, run_id: str, sites: int, timeout: float = 90) -> dict:
    """`status RUN --json` once every site is launched (state starting, a placement)."""
    def ready():
        s = cli_json(env, "status", run_id)
        if s["state"] != "running":
            raise AssertionError(f"run {s['state']}: {s['error']}\n{controller_log(home, run_id)}")
        launched = [x for x in s["sites"] if x["state"] == "starting"]
        return s if len(launched) == sites and s["controller_pid"] else None
    try:
        return wait_for(ready, timeout, every=0.5)
    except TimeoutError:
        raise AssertionError(f"sites not started\n{controller_log(home, run_id)}") from None


def wait_succeeded(env: dict, home: Path, run_id: str, nodes_said, patience_s: float = 600) -> dict:
    """`status RUN --json` once the run has succeeded; an AssertionError with the
    controller's log and what the nodes printed (`nodes_said()`) if it ends otherwise
    or does not end within `patience_s` (a hang detector, not a speed bound)."""
    def finished():
        s = cli_json(env, "status", run_id)
        if s["state"] in ("failed", "stopped"):
            raise AssertionError(f"run {s['state']}: {s['error']}\n{controller_log(home, run_id)}"
                                 f"\n{nodes_said()}")
        return s if s["state"] == "succeeded" else None
    try:
        return wait_for(finished, patience_s, every=1.0)
    except TimeoutError:
        raise AssertionError(f"run did not finish\n{controller_log(home, run_id)}\n"
                             f"{nodes_said()}") from None


def ec2(moto: str, region: str):
    return boto3.client("ec2", endpoint_url=moto, region_name=region,
                        aws_access_key_id="x", aws_secret_access_key="x")


def regions(moto: str) -> list[str]:
    return sorted(r["RegionName"] for r in ec2(moto, "us-east-1").describe_regions()["Regions"])


def tagged(moto: str, run_id: str, where: list[str] | None = None) -> dict[str, list[dict]]:
    """{region: [live instance]} and {region: [security group]} tagged with the run."""
    def one(region):
        c = ec2(moto, region)
        insts = [i for r in c.describe_instances(Filters=[
            {"Name": "tag:geotrain-run", "Values": [run_id]}])["Reservations"]
            for i in r["Instances"] if i["State"]["Name"] != "terminated"]
        sgs = c.describe_security_groups(Filters=[
            {"Name": "tag:geotrain-run", "Values": [run_id]}])["SecurityGroups"]
        return region, insts, sgs
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(one, where or regions(moto)))
    return {"instances": {r: i for r, i, _ in found if i}, "groups": {r: g for r, _, g in found if g}}


def user_data(call: dict) -> str:
    return base64.b64decode(call["UserData"]).decode()


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def small(recipe: dict, **sync) -> dict:
    """The recipe with a tiny model (round 0 is written to the store at launch)."""
    return {**recipe, "model": {"preset": "tiny"}, "sync": {**recipe.get("sync", {}), **sync}}


def _events_from_db(env: dict, run_id: str) -> list[dict]:
    from geotrain.state import StateDB

    return StateDB(Path(env["GEOTRAIN_HOME"])).events(run_id)


# -- 1 + 5: recipes/aws.yaml: launch -> status -> (never boots, not replaced) -> down ------

@pytest.mark.timeout(240)
def test_aws_recipe_launch_status_down(aws_env, moto_server):
    proxy, env, home = aws_env
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
    # The recipe's node identity, and no public address on any node.
    assert all(r["IamInstanceProfile.Name"] == PROFILE for r in runs)
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
    assert not [e for e in _events_from_db(env, run_id) if e["kind"] in ("site-lost", "site-replaced")]
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
    final = cli_json(env, "status", run_id)
    assert final["state"] == "stopped" and final["controller_pid"] is None
    print(f"\naws.yaml: launch returned {launched_s:.1f} s, both sites launched {started_s:.1f} s, "
          f"down {down_s:.1f} s")


# -- 2: failover across candidates on capacity errors ------------------------------------

@pytest.mark.timeout(180)
def test_failover_to_the_candidate_when_every_zone_is_full(aws_env, moto_server, tmp_path):
    proxy, env, home = aws_env
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


# -- 5: a site that never boots is declared lost after sync.boot_timeout_s ---------------

@pytest.mark.timeout(180)
def test_boot_timeout_replaces_a_site_that_never_beat(aws_env, moto_server, tmp_path):
    proxy, env, home = aws_env
    recipe = small(yaml.safe_load((ROOT / "recipes/aws.yaml").read_text()), boot_timeout_s=4)
    recipe["sites"] = recipe["sites"][:1]
    run_id = cli_json(env, "launch", str(write_recipe(tmp_path / "boot.yaml", recipe)),
                      "--detach")["run"]
    wait_started(env, home, run_id, sites=1)

    def replaced():
        return [e for e in _events_from_db(env, run_id) if e["kind"] == "site-replaced"]
    wait_for(replaced, 120, every=0.5)
    lost = [e for e in _events_from_db(env, run_id) if e["kind"] == "site-lost"]
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


# -- 4 + 6: recipes/multicloud.yaml across moto, the fake GCE and the fake ARM at once -----

@pytest.mark.timeout(300)
def test_multicloud_recipe_launch_status_down(aws_env, moto_server, gce, arm, tmp_path):
    proxy, env, home = aws_env
    env.update(**gcp_env(gce), **azure_env(arm))
    env.pop("NO_GCE_CHECK")  # the GCE credentials find the fake metadata server
    # The shipped recipe, sites, store and all; only the model is made tiny: its `large`
    # preset would write a ~1.2 GB round-0 model into moto at launch.
    recipe = small(yaml.safe_load((ROOT / "recipes/multicloud.yaml").read_text()))
    path = write_recipe(tmp_path / "multicloud.yaml", recipe)
    t0 = time.monotonic()
    run_id = cli_json(env, "launch", str(path), "--detach", timeout=120)["run"]
    status = wait_started(env, home, run_id, sites=3, timeout=150)
    started_s = time.monotonic() - t0
    sites = {s["name"]: s for s in status["sites"]}
    assert {n: (s["provider"], s["region"]) for n, s in sites.items()} == {
        "aws": ("aws", "us-east-1"), "gcp": ("gcp", "us-central1"), "azure": ("azure", "eastus")}

    # AWS: a spot p4d (the catalog's cheapest 8 x A100) tagged with the run.
    [inst] = tagged(moto_server, run_id, ["us-east-1", "us-west-2"])["instances"]["us-east-1"]
    assert inst["InstanceLifecycle"] == "spot" and inst["InstanceType"] == "p4d.24xlarge"
    [aws_call] = proxy.calls("RunInstances")
    # GCP: a spot instance labelled with the run, behind a tag-to-tag firewall only.
    [(zone, name)] = [k for k, i in gce.instances.items()
                      if i["labels"]["geotrain-run"] == run_id.lower()]
    assert zone == "us-central1-a" and gce.instances[(zone, name)]["scheduling"]["provisioningModel"] == "SPOT"
    [fw] = gce.firewalls.values()
    assert "sourceRanges" not in fw or not set(fw["sourceRanges"]) & set(OPEN)
    [gce_body] = gce.bodies("POST", f"/zones/{zone}/instances")
    # Azure: a spot VM in the run's resource group, tagged with the run.
    [vm] = arm.resources("Microsoft.Compute/virtualMachines")
    from geotrain.state import owner_id
    owner = owner_id(home)  # every node carries the launching home's owner id (down --orphans)
    assert vm["tags"] == {"geotrain-run": run_id, "geotrain-site": "azure", "geotrain-owner": owner}
    assert gce.instances[(zone, name)]["labels"]["geotrain-owner"] == owner
    assert {t["Key"]: t["Value"] for t in inst["Tags"]}["geotrain-owner"] == owner
    assert vm["properties"]["priority"] == "Spot"
    [vm_body] = arm.bodies("PUT", "Microsoft.Compute/virtualMachines")
    # Each node runs as the identity the recipe names, with no public address.
    assert aws_call["IamInstanceProfile.Name"] == PROFILE
    assert aws_call["NetworkInterface.1.AssociatePublicIpAddress"] == "false"
    assert [a["email"] for a in gce_body["serviceAccounts"]] == [
        "geotrain-node@my-project.iam.gserviceaccount.com"]
    assert "accessConfigs" not in gce_body["networkInterfaces"][0]
    assert vm_body["identity"] == {"type": "SystemAssigned"}
    assert not arm.resources("Microsoft.Network/publicIPAddresses")

    # Each node boots with GEOTRAIN_PROVIDER set to its own cloud (the agent's
    # preemption watcher reads that cloud's metadata service).
    scripts = {"aws": user_data(aws_call),
               "gcp": {i["key"]: i["value"] for i in gce_body["metadata"]["items"]}["startup-script"],
               "azure": base64.b64decode(vm_body["properties"]["osProfile"]["customData"]).decode()}
    for provider, script in scripts.items():
        assert f"export GEOTRAIN_PROVIDER={provider}\n" in script
        assert f"export GEOTRAIN_SITE={provider}\n" in script  # the sites are named after them
        assert f"STORE=s3://{BUCKET}/runs/{run_id}\n" in script

    # Never booting: still starting, nothing replaced, over a few of the controller's
    # ticks (each asks EC2 about the aws node), however long those take.
    ticks = len(proxy.calls("DescribeInstances"))
    wait_for(lambda: len(proxy.calls("DescribeInstances")) >= ticks + 3, 120, every=0.25)
    status = cli_json(env, "status", run_id)
    assert [s["state"] for s in status["sites"]] == ["starting"] * 3
    assert not [e for e in _events_from_db(env, run_id) if e["kind"] in ("site-lost", "failed")]

    t1 = time.monotonic()
    out = cli_json(env, "down", run_id, timeout=150)
    down_s = time.monotonic() - t1
    assert out["state"] == "stopped" and len(out["terminated"]) == 3  # by the controller's teardown
    assert inst["InstanceId"] in out["terminated"] and name in out["terminated"]
    assert tagged(moto_server, run_id) == {"instances": {}, "groups": {}}
    assert not gce.instances and not gce.firewalls
    assert [r for r in arm.resources() if (r.get("tags") or {}).get("geotrain-run") == run_id
            or run_id in r.get("name", "")] == []
    print(f"\nmulticloud: three sites launched {started_s:.1f} s, down {down_s:.1f} s")


# -- 7: geotrain check with all three stand-ins ----------------------------------------------

@pytest.mark.timeout(120)
def test_check_shows_each_providers_endpoint_and_no_secret(aws_env, gce, arm):
    proxy, env, home = aws_env
    env.update(**gcp_env(gce), **azure_env(arm))
    env.pop("NO_GCE_CHECK")  # the GCE credentials find the fake metadata server
    p = cli(env, "check", "--json")
    rows = {r["provider"]: r for r in json.loads(p.stdout)}
    assert all(rows[n]["ok"] for n in ("local", "aws", "gcp", "azure")), rows
    assert rows["aws"]["settings"]["AWS_ENDPOINT_URL"] == proxy.url
    assert f"endpoint {proxy.url} (AWS_ENDPOINT_URL)" in rows["aws"]["detail"]
    assert rows["gcp"]["settings"] == {"GEOTRAIN_GCE_ENDPOINT": gce.url, "GCE_METADATA_HOST": gce.host}
    assert f"{gce.url} (GEOTRAIN_GCE_ENDPOINT)" in rows["gcp"]["detail"]
    assert "project geotrain-test" in rows["gcp"]["detail"]
    assert rows["azure"]["settings"] == {"GEOTRAIN_ARM_ENDPOINT": arm.base_url,
                                         "GEOTRAIN_ARM_CA_BUNDLE": str(arm.ca_path),
                                         "AZURE_SUBSCRIPTION_ID": arm.subscription}
    for shown in (arm.base_url, str(arm.ca_path), arm.subscription):
        assert shown in rows["azure"]["detail"]
    table = cli(env, "check").stdout
    secrets = (SECRET_KEY, gce.token, arm.token, arm.identity_header)
    for text in (p.stdout, p.stderr, table):
        for secret in secrets:
            assert secret not in text
    for shown in ("AWS_ENDPOINT_URL", "GEOTRAIN_GCE_ENDPOINT", "GEOTRAIN_ARM_ENDPOINT", "GEOTRAIN_ARM_CA_BUNDLE"):
        assert shown in table

    # Unreachable endpoints: every provider answers no, with its endpoint, and nothing raises.
    dead = "http://127.0.0.1:9"
    env.update(AWS_ENDPOINT_URL=dead, GEOTRAIN_GCE_ENDPOINT=dead, GEOTRAIN_ARM_ENDPOINT="https://127.0.0.1:9",
               IDENTITY_ENDPOINT=f"{dead}/msi/token")
    rows = {r["provider"]: r for r in cli_json(env, "check", timeout=120)}
    assert not rows["aws"]["ok"] and dead in rows["aws"]["detail"]
    assert not rows["azure"]["ok"] and "https://127.0.0.1:9" in rows["azure"]["detail"]
    assert SECRET_KEY not in json.dumps(rows)


# -- 6: every provider's boot script names its provider for the preemption watcher --------

@pytest.mark.parametrize("provider,watcher", [("aws", "AwsWatcher"), ("gcp", "GceWatcher"),
                                              ("azure", "AzureWatcher")])
def test_boot_script_exports_the_provider_the_agent_watches(provider, watcher):
    import shlex

    from geotrain import bootstrap
    from geotrain.site.preemption import DEFAULT_ENDPOINTS, watcher_for
    from providers import SitePlan

    plan = SitePlan(run_id="r-1", site="s", provider=provider, store_url="s3://b/runs/r-1",
                    region="x", nodes=2)
    script = bootstrap.render(plan, 1, "t" * 64)
    exports = dict(re.findall(r"^export (\w+)=(.*)$", script, re.M))
    assert shlex.split(exports["GEOTRAIN_PROVIDER"]) == [provider]
    w = watcher_for(shlex.split(exports["GEOTRAIN_PROVIDER"])[0])
    assert type(w).__name__ == watcher and w.endpoint == DEFAULT_ENDPOINTS[provider]
