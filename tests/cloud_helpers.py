"""The CLI against the local stand-in clouds, shared by the end-to-end tests
(tests/test_cloud_e2e.py, tests/test_cloud_aws.py, tests/test_boot_aws.py,
tests/test_boot_twin.py): fixtures that start a fresh moto behind a fault proxy
(`aws_env`), the fake Compute Engine (`gce`) and the fake ARM server (`arm`), the
environment that points the CLI at each, and helpers that run `geotrain` as a user
would and read what each cloud holds.

A test module uses a fixture by importing it (`from tests.cloud_helpers import aws_env`).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
import yaml

from tests.fakes.aws_faults import FaultProxy
from tests.fakes.aws_identity import grant_store
from tests.fakes.aws_operator import user_policy
from tests.helpers import bundle_cache, geotrain_cmd, wait_for

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "my-geotrain-bucket"  # the bucket recipes/aws.yaml and multicloud.yaml name
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYGEOTRAINE2E"
ACCESS_KEY = "AKIAGEOTRAINE2EKEY01"
OPEN = ("0.0.0.0/0", "::/0")
PROFILE = "geotrain-node"  # the instance profile recipes/aws.yaml and multicloud.yaml name
STORE_URL = f"s3://{BUCKET}/runs"  # the run store of the tests' AWS recipes


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
    # Its only policy: infra/aws/geotrain-node-policy.json for STORE_URL (what the
    # stand-in S3, tests/fakes/aws_identity.py, enforces for the role's keys).
    grant_store(iam, PROFILE, STORE_URL)
    proxy = FaultProxy(moto_server)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "GOOGLE_", "GCE_", "AZURE_", "GEOTRAIN_", "IDENTITY_",
                                "MSI_"))}
    env.update(bundle_cache())
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


def enforce_operator_policy(proxy: FaultProxy, env: dict) -> None:
    """From now on the stand-in judges every call the operator's machine makes (the CLI
    and its controller: EC2, IAM, STS and S3, which then goes through the proxy too) under
    infra/aws/geotrain-user-policy.json as infra/aws/README.md makes it for BUCKET, as AWS
    would (tests/fakes/aws_operator.py); `proxy.denied()` lists what it refused."""
    proxy.enforce(user_policy(BUCKET))
    env["AWS_ENDPOINT_URL_S3"] = proxy.url


def refused(proxy: FaultProxy) -> list[str]:
    """What the operator policy refused, one line each (for an assertion message); it must
    have judged something, so a test whose enforcement was lost cannot pass as clean."""
    assert proxy.enforcer is not None and proxy.enforcer.judged, "the operator policy judged nothing"
    return [f"{d['service']} {d['call']}: {d['why']}" for d in proxy.denied()]


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


def iam(moto: str):
    return boto3.client("iam", endpoint_url=moto, region_name="us-east-1",
                        aws_access_key_id="x", aws_secret_access_key="x")


def run_profiles(moto: str) -> list[dict]:
    """The instance profiles launch made for sites with `aws.run_role` (path /geotrain/;
    moto ignores list_instance_profiles' PathPrefix, so filtered here)."""
    return [p for p in iam(moto).list_instance_profiles()["InstanceProfiles"] if p["Path"] == "/geotrain/"]


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


def events_from_db(env: dict, run_id: str) -> list[dict]:
    """The run's events as the state db holds them."""
    from geotrain.state import StateDB

    return StateDB(Path(env["GEOTRAIN_HOME"])).events(run_id)


def define_node_store_role(fake, path: Path = ROOT / "infra/azure/geotrain-node-store-role.json") -> str:
    """Make the custom role of infra/azure/geotrain-node-store-role.json in the ARM stand-in's
    subscription, as `az role definition create --role-definition @FILE` does (the operator's
    one-time step of infra/azure/README.md): PUT roleDefinitions/<new GUID>. Returns its id."""
    import ssl
    import uuid

    doc = json.loads(path.read_text().replace("SUBSCRIPTION_ID", fake.subscription))
    rid = f"/subscriptions/{fake.subscription}/providers/Microsoft.Authorization/roleDefinitions/{uuid.uuid4()}"
    body = {"properties": {"roleName": doc["Name"], "description": doc["Description"], "type": "CustomRole",
                           "permissions": [{"actions": doc["Actions"], "notActions": doc["NotActions"],
                                            "dataActions": doc["DataActions"],
                                            "notDataActions": doc["NotDataActions"]}],
                           "assignableScopes": doc["AssignableScopes"]}}
    req = urllib.request.Request(f"{fake.base_url}{rid}?api-version=2022-04-01", method="PUT",
                                 data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {fake.token}",
                                          "Content-Type": "application/json"})
    ctx = ssl.create_default_context(cafile=str(fake.ca_path))
    with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
        assert r.status in (200, 201), r.status
    return rid
