"""An AWS site of two nodes that really boot: `geotrain launch` → two EC2 instances (moto)
→ each runs its user data, installs geotrain from the run store → node 0 starts the
site's Ray head on its private address and publishes it, node 1 joins it there → one
training group across both nodes trains to the end → `geotrain down`.

The stand-in cloud (tests/fakes/ec2_boot.py) gives each node the private address EC2
assigned its instance, on a private network of the instances whose security group
admits its own members (a site's group, providers/aws/network.py), in a network
namespace of its own (tests/fakes/netns.py); its IMDS answers that address. So the Ray
cluster forms only if the provider code puts both nodes in one such group and node 0
publishes an address node 1 can reach; and an instance of another group cannot reach
the head. Skipped, saying why, where this machine cannot make network namespaces.

Run: .venv/bin/python -m pytest -q tests/test_boot_multinode.py
"""

from __future__ import annotations

import ipaddress
import json
import re

import boto3
import pytest

from tests.cloud_helpers import BUCKET, PROFILE, STORE_URL, aws_env, cli, cli_json, controller_log, \
    write_recipe  # noqa: F401 - aws_env is a fixture
from tests.fakes import netns
from tests.fakes.aws_identity import S3IdentityProxy
from tests.fakes.ec2_boot import Ec2Booter
from tests.fakes.node import BootedNode, node_image, tagged_pids
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(netns.available() is not None,
                                 reason=f"no network namespaces here: {netns.available()}")]
PATIENCE_S = 600  # a hang detector, not a speed bound
OPEN_ENDED = 100_000  # rounds of a run that lasts until `geotrain finish` (tests/test_chaos.py)
# No GLOO_SOCKET_IFNAME: the agent names the interface of the node's private address.
NODE_NET = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
CONNECT = """
import errno, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
try:
    socket.create_connection((host, int(port)), timeout=10).close()
    print("connected")
except OSError as e:
    print(errno.errorcode.get(e.errno, type(e).__name__))
"""


def recipe() -> dict:
    return {"name": "boot-multinode",
            "model": {"preset": "tiny", "n_layer": 1, "d_model": 32, "n_head": 2},
            "train": {"rounds": OPEN_ENDED, "inner_steps": 3, "batch_size": 2, "seq_len": 32,
                      "warmup_steps": 1, "eval_batches": 1},
            "store": {"url": STORE_URL},  # the one aws_env's node policy names
            "sync": {"boot_timeout_s": 1800, "max_replacements": 0},
            "sites": [{"name": "east", "provider": "aws", "region": "us-east-1",
                       "instance_type": "t3.large", "nodes": 2, "workers": 1,
                       "aws": {"instance_profile": PROFILE}}]}


@pytest.fixture
def cloud(aws_env, moto_server, tmp_path):
    """(env for the CLI, home, booter): EC2 that boots, S3 behind identity."""
    proxy, env, home = aws_env
    s3 = S3IdentityProxy(moto_server)
    booter = Ec2Booter(moto_server, node_image(tmp_path / "image"), tmp_path / "nodes",
                       NODE_NET, s3_proxy=s3, store_roles={PROFILE})
    proxy.answer("GetConsoleOutput", booter.console_output)  # moto keeps no console
    try:
        yield env, home, booter
    finally:
        booter.close()
        s3.close()


def events(env: dict, run_id: str) -> list[dict]:
    return [json.loads(line) for line in cli(env, "logs", run_id, "--json").stdout.splitlines()]


def console(booter: Ec2Booter) -> str:
    return "\n".join(f"--- {iid}\n{n.console_text()[-3000:]}" for iid, n in booter.nodes().items())


def node_index(node: BootedNode) -> int:
    return int(re.search(r"^export GEOTRAIN_NODE_INDEX=(\d+)$", node.script.read_text(), re.M)[1])


def test_a_two_node_site_forms_its_ray_cluster_on_the_private_network_and_trains(
        cloud, moto_server, tmp_path):
    env, home, booter = cloud
    path = write_recipe(tmp_path / "multinode.yaml", recipe())
    run_id = cli_json(env, "launch", str(path), "--detach", timeout=180)["run"]
    nodes = booter.wait_booted(2, timeout=PATIENCE_S)
    by_index = {node_index(n): n for n in nodes.values()}
    assert sorted(by_index) == [0, 1], by_index
    head, member = by_index[0], by_index[1]

    def training():
        s = cli_json(env, "status", run_id)
        assert s["state"] == "running", (s, controller_log(home, run_id), console(booter))
        return s["rounds_done"] >= 1
    wait_for(training, PATIENCE_S, every=1.0)

    # Node 0 published its private address: the one EC2 gave its instance, not loopback.
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                      aws_access_key_id="x", aws_secret_access_key="x")
    record = json.loads(s3.get_object(Bucket=BUCKET, Key=f"runs/{run_id}/sites/east/head.json")
                        ["Body"].read())["body"]
    ec2 = boto3.client("ec2", endpoint_url=moto_server, region_name="us-east-1",
                       aws_access_key_id="x", aws_secret_access_key="x")
    [inst] = ec2.describe_instances(InstanceIds=[head.instance_id])["Reservations"][0]["Instances"]
    assert record["address"] == f"{inst['PrivateIpAddress']}:6379" == f"{head.private_ip}:6379"
    assert record["state"] == "up"
    ip = ipaddress.ip_address(head.private_ip)
    assert ip.is_private and not ip.is_loopback, ip
    # Both in the site's security group, which the provider made, so on one private network.
    assert [g["GroupName"] for g in inst["NetworkInterfaces"][0]["Groups"]] == [f"geotrain-{run_id}-east"]
    assert head.nic.network is member.nic.network

    # One group across both nodes, each rank on its node's private address.
    [group] = [e for e in events(env, run_id) if e["kind"] == "group"]
    assert group["world"] == 2 and group["nodes"] == 2, group
    assert sorted(r["node_ip"] for r in group["ranks"]) == sorted([head.private_ip, member.private_ip])
    [ray] = [e for e in events(env, run_id) if e["kind"] == "ray"]
    assert ray["nodes"] == 2, ray

    # An instance of the same VPC but another security group cannot reach the head.
    vpc = inst["VpcId"]
    gid = ec2.create_security_group(GroupName="other-site", Description="another site",
                                    VpcId=vpc)["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": gid}]}])
    (tmp_path / "connect.py").write_text(CONNECT)
    [stranger] = ec2.run_instances(
        ImageId=inst["ImageId"], InstanceType="t3.large", MinCount=1, MaxCount=1,
        UserData=f"#!/bin/bash\npython3 {tmp_path / 'connect.py'} {record['address']} "
                 "> $GEOTRAIN_NODE_ROOT/said\n",
        NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": inst["SubnetId"], "Groups": [gid]}],
    )["Instances"]
    said = booter.wait_booted(3, timeout=PATIENCE_S)[stranger["InstanceId"]].root / "said"
    wait_for(lambda: said.exists() and said.read_text().strip(), PATIENCE_S, every=0.5)
    assert said.read_text().strip() in ("EHOSTUNREACH", "TimeoutError"), said.read_text()
    ec2.terminate_instances(InstanceIds=[stranger["InstanceId"]])
    booter.wait_stopped(stranger["InstanceId"], timeout=120)

    out = cli(env, "finish", run_id, "--json", timeout=PATIENCE_S)
    assert json.loads(out.stdout)["state"] == "succeeded", out.stdout
    done = [e for e in events(env, run_id) if e["kind"] == "done"]
    assert done and done[0]["ranks_done"] == 2, done
    # Node 1 left once the site was over, having joined the head at its private address.
    log = "\n".join(p.read_text(errors="replace") for p in member.root.rglob("*.log"))
    assert f"node 1 joined the site's Ray head at {record['address']}" in log, log[-3000:]

    cli(env, "down", run_id, timeout=120)
    for node in (head, member):
        booter.wait_stopped(node.instance_id, timeout=120)
        assert tagged_pids(node.instance_id) == []
    switches = booter.networks.inodes()
    assert len(switches) == 2  # the site's network, and the stranger's
    booter.close()  # what the fixture does: the cloud's networks go with it
    ours = {n.link.inode for n in booter.history} | switches
    # A process is untagged (its memory released) a moment before it leaves its namespace.
    try:
        wait_for(lambda: not netns.live_namespaces() & ours, 120, every=0.5)
    except TimeoutError:
        raise AssertionError(f"namespaces outlived their nodes and networks: "
                             f"{netns.live_namespaces() & ours}") from None
