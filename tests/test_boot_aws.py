"""An AWS site whose nodes really boot: `geotrain launch` → EC2 (moto) → the node runs its
user data → installs geotrain from the run store → trains → `geotrain down`.

The stand-in cloud (tests/fakes/ec2_boot.py) boots every instance moto creates as a
process tree (tests/fakes/node.py) with that instance's IMDSv2; the node reaches the
S3 store only through a proxy that accepts the credentials its instance profile's role
was given, only for roles allowed to use the store, and only for what the role's IAM
policy allows: infra/aws/geotrain-node-policy.json for the run store's prefix, no delete
(tests/fakes/iam_eval.py). A run that succeeds with no request refused proves the nodes
need nothing more. Nothing of the test process
reaches a node: no credential, no geotrain (the node image has geotrain's dependencies,
not geotrain), so a node trains only if its boot fetched, verified and installed the
wheel the operator built.

Run: .venv/bin/python -m pytest -q tests/test_boot_aws.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import boto3
import pytest

from geotrain.site.node_info import fatal_line
from tests.cloud_helpers import BUCKET, PROFILE, STORE_URL, aws_env, cli, cli_json, controller_log, \
    enforce_operator_policy, refused, tagged, write_recipe  # noqa: F401 - aws_env is a fixture
from tests.fakes.aws_identity import S3IdentityProxy
from tests.fakes import netns
from tests.fakes.ec2_boot import Ec2Booter
from tests.fakes.node import node_image, tagged_pids
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
PATIENCE_S = 600  # a hang detector, not a speed bound
OPEN_ENDED = 100_000  # rounds of a run that lasts until `geotrain finish` (tests/test_chaos.py)
ROLE = PROFILE  # the profile aws_env creates, whose role may use the store here
# The stand-in network: Ray on loopback (the node's "private address" is 127.0.0.1).
NODE_NET = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}


def recipe(profile: str) -> dict:
    return {"name": "boot-aws", "model": {"preset": "tiny", "n_layer": 1, "d_model": 32, "n_head": 2},
            "train": {"rounds": 2, "inner_steps": 3, "batch_size": 2, "seq_len": 32,
                      "warmup_steps": 1, "eval_batches": 1},
            "store": {"url": STORE_URL},  # the one aws_env's node policy names
            "sync": {"boot_timeout_s": 1800, "max_replacements": 0},
            "sites": [{"name": "east", "provider": "aws", "region": "us-east-1",
                       "instance_type": "t3.large", "aws": {"instance_profile": profile}}]}


def make_profile(moto: str, name: str) -> None:
    iam = boto3.client("iam", endpoint_url=moto, region_name="us-east-1",
                       aws_access_key_id="x", aws_secret_access_key="x")
    iam.create_role(RoleName=name, AssumeRolePolicyDocument=(Path(__file__).parent.parent /
                    "infra" / "aws" / "geotrain-node-trust.json").read_text())
    iam.create_instance_profile(InstanceProfileName=name)
    iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)


@pytest.fixture
def cloud(aws_env, moto_server, tmp_path):
    """(env for the CLI, home, booter, store proxy): EC2 that boots, S3 behind identity."""
    proxy, env, home = aws_env
    s3 = S3IdentityProxy(moto_server)
    booter = Ec2Booter(moto_server, node_image(tmp_path / "image"), tmp_path / "nodes",
                       NODE_NET, s3_proxy=s3,
                       # the standing profile and the roles launch makes (aws.run_role); the
                       # proxy still judges every request by the role's own policies
                       store_roles=lambda role: role == ROLE or role.startswith("geotrain-"))
    proxy.answer("GetConsoleOutput", booter.console_output)  # moto keeps no console
    try:
        yield env, home, booter, s3
    finally:
        booter.close()
        s3.close()


def events(env: dict, run_id: str) -> list[dict]:
    """Every event of the run, controller and sites, as `geotrain logs --json` prints them."""
    return [json.loads(line) for line in cli(env, "logs", run_id, "--json").stdout.splitlines()]


def console(booter: Ec2Booter) -> str:
    return "\n".join(f"--- {iid}\n{n.console_text()[-3000:]}" for iid, n in booter.nodes().items())


def test_a_node_whose_role_cannot_use_the_store_is_reported_not_silent(cloud, moto_server, tmp_path):
    """The instance profile exists but its role has no access to the store: the node
    says so on its console, the controller reads it there and the site is lost with
    that reason — long before boot_timeout_s (1800 s here)."""
    env, home, booter, _ = cloud
    make_profile(moto_server, "no-store-role")
    path = write_recipe(tmp_path / "boot.yaml", recipe("no-store-role"))
    run_id = cli_json(env, "launch", str(path), "--detach", timeout=180)["run"]
    [node] = booter.wait_booted(1, timeout=120).values()
    wait_for(lambda: fatal_line(node.console_text()), PATIENCE_S, every=0.5)
    printed = time.monotonic()
    assert "cannot use the run store" in fatal_line(node.console_text())

    def lost():
        found = [e for e in events(env, run_id) if e["kind"] == "site-lost"]
        return found[0] if found else None
    event = wait_for(lost, PATIENCE_S, every=0.5)
    reported_s = time.monotonic() - printed
    assert event["reason"].startswith("node failed to boot: cannot use the run store "
                                      f"s3://{BUCKET}/runs/{run_id}"), event
    assert "access denied" in event["reason"], event
    # The site's state says why too (what `geotrain status` shows).
    [site] = wait_for(lambda: (lambda s: s["sites"] if s["sites"][0]["lost"] else None)(
        cli_json(env, "status", run_id)), PATIENCE_S, every=0.5)
    assert site["lost"]["reason"] == event["reason"], site
    # max_replacements 0: the run fails, saying why.
    s = wait_for(lambda: (lambda s: s if s["state"] == "failed" else None)(cli_json(env, "status", run_id)),
                 PATIENCE_S, every=1.0)
    assert "cannot use the run store" in s["error"]
    cli(env, "down", run_id, timeout=120)
    booter.wait_stopped(node.instance_id, timeout=120)
    assert tagged_pids(node.instance_id) == []
    print(f"\nno-access: reported {reported_s:.1f} s after the node printed it")


def test_a_node_boots_trains_and_on_a_spot_notice_its_replacement_boots(cloud, aws_env, moto_server, tmp_path):
    """A node boots as the role launch made for its site (aws.run_role: its run's store
    folder only), installs geotrain from the store and trains; then the spot interruption
    notice comes where AWS puts it, the instance's IMDS: the node's agent drains
    (publishes its partial round), the controller replaces the site with a new instance
    that boots, installs the same bytes and trains on, as the same role. Once the run
    is over the role is gone. (One run for all: each boot costs a minute of CI.
    A node with a standing profile boots in tests/test_boot_twin.py.) All along, the
    operator's machine holds nothing but infra/aws/geotrain-user-policy.json: every call
    it makes (EC2, IAM, STS, S3, and the nodes' downloads by its signed URLs) is judged
    under it, and none is refused."""
    env, home, booter, s3 = cloud
    proxy = aws_env[0]
    enforce_operator_policy(proxy, env)
    iam = boto3.client("iam", endpoint_url=moto_server, region_name="us-east-1",
                       aws_access_key_id="x", aws_secret_access_key="x")
    spec = recipe(ROLE)
    spec["sites"][0]["aws"] = {"run_role": True}
    spec["train"]["rounds"] = OPEN_ENDED  # ended by `geotrain finish` once the replacement trains
    spec["sync"]["max_replacements"] = 3
    spec["sites"][0]["spot"] = True
    path = write_recipe(tmp_path / "boot.yaml", spec)
    run_id = cli_json(env, "launch", str(path), "--detach", timeout=180)["run"]
    [first] = booter.wait_booted(1, timeout=120).values()

    def training():
        s = cli_json(env, "status", run_id)
        assert s["state"] == "running", (s, controller_log(home, run_id), console(booter))
        return s["rounds_done"] >= 1
    wait_for(training, PATIENCE_S, every=1.0)
    text = first.console_text()
    assert "geotrain-0.1.0-py3-none-any.whl verified" in text and "requirements.txt verified" in text
    assert fatal_line(text) is None, text
    # The node runs the geotrain its boot installed, from its own venv.
    starting = [e for e in events(env, run_id) if e.get("kind") == "starting"]
    assert starting, events(env, run_id)
    assert str(starting[0]["geotrain"]).startswith(str(Path(first.root) / "opt" / "geotrain")), starting
    role_keys = {booter.imds(first.instance_id).credentials["AccessKeyId"]}  # while it lives
    [made] = iam.list_roles(PathPrefix="/geotrain/")["Roles"]
    assert booter.imds(first.instance_id).role == made["RoleName"] != ROLE
    booter.notice(first.instance_id, "terminate", in_s=120)

    def event(kind):
        return next((e for e in events(env, run_id) if e["kind"] == kind), None)
    preempting = wait_for(lambda: event("preempting"), PATIENCE_S, every=1.0)
    assert preempting["notice"] == "preempt" and preempting["provider"] == "aws", preempting
    lost = wait_for(lambda: event("site-lost"), PATIENCE_S, every=1.0)
    assert lost["reason"] == "preempted", lost
    booter.wait_stopped(first.instance_id, timeout=PATIENCE_S)  # terminated by the controller
    assert tagged_pids(first.instance_id) == []
    nodes = booter.wait_booted(2, timeout=PATIENCE_S)
    [second] = [n for iid, n in nodes.items() if iid != first.instance_id]
    wait_for(lambda: event("site-rejoined"), PATIENCE_S, every=1.0)
    role_keys.add(booter.imds(second.instance_id).credentials["AccessKeyId"])
    assert booter.imds(second.instance_id).role == made["RoleName"]
    # The replacement installed the very bytes the first node did.
    verified = [line for line in first.console_text().splitlines() if " verified " in line]
    assert verified and verified == [line for line in second.console_text().splitlines()
                                     if " verified " in line]
    out = cli(env, "finish", run_id, "--json", timeout=PATIENCE_S)
    assert json.loads(out.stdout)["state"] == "succeeded", out.stdout
    assert cli_json(env, "status", run_id)["eval_loss"] is not None
    # Store requests carried the nodes' role credentials, and only those (the proxy
    # refuses every other key): a node never sees the operator's. And the node
    # policy sufficed: nothing a node asked for was refused or unjudgeable.
    assert {r["key_id"] for r in s3.requests if r["status"] < 400} == role_keys
    assert not s3.denied() and not s3.errors, (s3.denied()[:5], s3.errors[:5])
    # Each node had a network of its own where this machine allows it
    # (tests/fakes/netns.py): all it sent the store crossed its link.
    if netns.available() is None:
        assert first.network == second.network == "isolated"
        assert first.link.stats.bytes_out > 0 and second.link.stats.bytes_out > 0
    # The run ended: its instances are gone, and so is each node's whole process tree.
    assert tagged(moto_server, run_id, ["us-east-1"])["instances"] == {}
    booter.wait_stopped(second.instance_id, timeout=120)
    assert tagged_pids(second.instance_id) == []
    cli(env, "down", run_id, timeout=120)
    # The role and its profile went with the site's last node.
    assert iam.list_roles(PathPrefix="/geotrain/")["Roles"] == []
    assert [p for p in iam.list_instance_profiles()["InstanceProfiles"] if p["Path"] == "/geotrain/"] == []
    # The operator's policy sufficed for all of it, signed downloads included.
    assert not refused(proxy), refused(proxy)
    judged = {a for j in proxy.enforcer.judged for a, _, _ in j["checks"]}
    assert {"iam:CreateRole", "iam:PassRole", "ec2:RunInstances", "ec2:TerminateInstances",
            "iam:DeleteRole", "s3:PutObject", "s3:GetObject"} <= judged, judged
