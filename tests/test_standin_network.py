"""A stand-in node's own network (tests/fakes/netns.py): it reaches the services its boot
data names, through a shaped link, and nothing else on this machine; nothing reaches it.

Skipped, with the reason, where this machine cannot make network namespaces (the
stand-in nodes then share its network, as they did before)."""

from __future__ import annotations

import json
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fakes import netns
from tests.fakes.node import BootedNode, node_image, tagged_pids
from tests.helpers import wait_for

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(netns.available() is not None,
                                 reason=f"no network namespaces here: {netns.available()}")]

PROBE = """
import json, os, socket, sys, time
def reach(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            t0 = time.monotonic(); s.sendall(b"ping\\n"); reply = s.makefile().readline().strip()
            return {"ok": True, "reply": reply, "rtt_s": time.monotonic() - t0}
    except OSError as e:
        return {"ok": False, "error": type(e).__name__}
out = {p: reach(int(p)) for p in sys.argv[1:]}
with open(os.environ["GEOTRAIN_NODE_ROOT"] + "/probe.json", "w") as f:
    json.dump(out, f)
"""


class Echo(socketserver.ThreadingTCPServer):
    """A service on this machine: answers each line with `name:line`."""

    daemon_threads, allow_reuse_address = True, True

    def __init__(self, name: str):
        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                for line in self.rfile:
                    self.wfile.write(f"{name}:{line.decode().strip()}\n".encode())
        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self):
        self.shutdown()
        self.server_close()


@pytest.fixture
def services():
    given, other = Echo("store"), Echo("operator")
    yield given, other
    given.close()
    other.close()


def boot(tmp_path: Path, name: str, given: list[int], probe: list[int]) -> tuple[BootedNode, dict]:
    """Boot a node whose environment names `given` and which tries to reach `probe`."""
    (tmp_path / "probe.py").write_text(PROBE)
    args = " ".join(str(p) for p in probe)
    script = f"python3 {tmp_path / 'probe.py'} {args}\n"
    env = {"STORE_ENDPOINT": ",".join(f"http://127.0.0.1:{p}" for p in given)}
    node = BootedNode(name, script, tmp_path / name, node_image(tmp_path / "image"), env=env)
    node.start()
    wait_for(lambda: not node.running(), 60, every=0.1)
    return node, json.loads((tmp_path / name / "probe.json").read_text())


def test_a_node_reaches_the_services_it_was_given_and_nothing_else(tmp_path, services):
    given, other = services
    node, seen = boot(tmp_path, "i-net", [given.port], [given.port, other.port])
    try:
        assert node.network == "isolated"
        assert seen[str(given.port)] == {"ok": True, "reply": "store:ping",
                                         "rtt_s": seen[str(given.port)]["rtt_s"]}
        # The operator's service listens on this machine, but not in the node's network.
        assert seen[str(other.port)] == {"ok": False, "error": "ConnectionRefusedError"}
        assert node.link.stats.connections == 1 and node.link.stats.bytes_out == len(b"ping\n")
    finally:
        node.stop()
    assert tagged_pids("i-net") == []
    # Stopped: the relay's listeners are gone with the namespace's last process.
    assert node.link.fd == -1


def test_one_nodes_ports_are_not_reachable_from_another_node(tmp_path):
    """Two nodes that bind the same port each get their own; one never reaches the other's."""
    (tmp_path / "listen.py").write_text(
        "import socket, time\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 23456)); s.listen(1)\n"
        "time.sleep(60)\n")
    server = BootedNode("i-a", f"exec python3 {tmp_path / 'listen.py'}\n", tmp_path / "a",
                        node_image(tmp_path / "image")).start()
    try:
        wait_for(lambda: server.running() and len(tagged_pids("i-a")) >= 1, 30, every=0.1)
        time.sleep(1.0)  # let it bind
        client, seen = boot(tmp_path, "i-b", [], [23456])
        client.stop()
        assert seen["23456"] == {"ok": False, "error": "ConnectionRefusedError"}
        with pytest.raises(OSError):  # nor from this machine's own network
            socket.create_connection(("127.0.0.1", 23456), timeout=2).close()
    finally:
        server.stop()
    assert tagged_pids("i-a") == []


def test_the_link_delays_each_way(tmp_path, services, monkeypatch):
    """GEOTRAIN_STANDIN_LINK shapes the link: a round trip takes at least twice its delay."""
    given, _ = services
    monkeypatch.setenv("GEOTRAIN_STANDIN_LINK", "delay_ms=150")
    node, seen = boot(tmp_path, "i-slow", [given.port], [given.port])
    node.stop()
    assert seen[str(given.port)]["ok"] and seen[str(given.port)]["rtt_s"] >= 0.3


def test_the_link_limits_the_rate_of_all_the_nodes_connections_together(services):
    """At 8 Mbit/s (1 MB/s), two connections at once each sending 1 MB and getting it
    back share the link: 2 MB each way take at least 2 s each way; the bytes arrive whole."""
    import subprocess

    given, _ = services
    ns = netns.Namespace([given.port], netns.Link(rate_bps=1e6))
    try:
        script = ("import socket,threading,time\n"
                  "sizes=[]\n"
                  "def one():\n"
                  f"    s=socket.create_connection(('127.0.0.1',{given.port}))\n"
                  "    s.sendall(b'x'*(1024*1024)+b'\\n'); sizes.append(len(s.makefile('rb').readline()))\n"
                  "t0=time.monotonic(); ts=[threading.Thread(target=one) for _ in range(2)]\n"
                  "[t.start() for t in ts]; [t.join() for t in ts]\n"
                  "print(sizes[0], sizes[1], round(time.monotonic()-t0,3))\n")
        argv, fds = ns.command([sys.executable, "-c", script])
        out = subprocess.run(argv, pass_fds=fds, capture_output=True, text=True, timeout=60)
        a, b, took = out.stdout.split()
        assert int(a) == int(b) == len("store:") + 1024 * 1024 + 1, out.stderr
        assert float(took) >= 2 * 2 * 1024 * 1024 / 1e6 * 0.95  # 2 MiB up, then 2 MiB down
        assert ns.stats.connections == 2 and ns.stats.bytes_out == 2 * (1024 * 1024 + 1)
    finally:
        ns.close()


def test_the_link_and_mode_are_read_from_the_environment(monkeypatch):
    assert netns.Link.parse("delay_ms=25,rate_mbit=100") == netns.Link(0.025, 12.5e6)
    with pytest.raises(ValueError, match="unknown key 'loss'"):
        netns.Link.parse("loss=1")
    monkeypatch.setenv("GEOTRAIN_STANDIN_NETWORK", "host")
    assert netns.use_isolated() is False
    monkeypatch.setenv("GEOTRAIN_STANDIN_NETWORK", "bridged")
    with pytest.raises(ValueError, match="valid: auto, isolated, host"):
        netns.mode()
    assert netns.ports_named("X=http://127.0.0.1:9000/b", "localhost:80 127.0.0.1:12") == [12, 80, 9000]


# -- private networks: the nodes of one cloud network reach each other -------------------

SERVE = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7000)); s.listen(8); print("listening", flush=True)
while True:
    c, peer = s.accept(); c.sendall(f"hello {peer[0]}\\n".encode()); c.close()
"""
CONNECT = """
import errno, socket, sys, time
for attempt in range(120):  # refused: the server is not listening yet
    try:
        with socket.create_connection((sys.argv[1], 7000), timeout=5) as s:
            print(s.makefile().readline().strip())
        break
    except ConnectionRefusedError:
        time.sleep(0.25)
    except OSError as e:
        print(errno.errorcode.get(e.errno, type(e).__name__))
        break
"""


def in_namespace(ns: netns.Namespace, code: str, *args: str, **kw):
    import subprocess

    argv, fds = ns.command([sys.executable, "-c", code, *args])
    return subprocess.Popen(argv, pass_fds=fds, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **kw)


def host_links() -> list[str]:
    import subprocess

    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split(":")[1].strip() for line in out.splitlines())


def test_nodes_of_one_private_network_reach_each_other_and_no_other():
    """Two networks with the same address range: a node reaches a node of its own network
    at its private address; a node of the other network does not, though the address is
    in its own range. Nothing is added to this machine's interfaces, and once closed no
    namespace of theirs is left."""
    links, before = host_links(), netns.live_namespaces()
    networks = netns.Networks()
    spaces, procs = [], []
    try:
        head = netns.Namespace([], nic=networks.nic("vpc-a", "10.0.1.5", 16))
        peer = netns.Namespace([], nic=networks.nic("vpc-a", "10.0.2.9", 16))
        stranger = netns.Namespace([], nic=networks.nic("vpc-b", "10.0.1.6", 16))
        spaces += [head, peer, stranger]
        assert len(networks) == 2 and host_links() == links
        server = in_namespace(head, SERVE, "10.0.1.5")
        procs.append(server)
        assert server.stdout.readline().strip() == "listening"
        said = {}
        for name, ns in (("peer", peer), ("stranger", stranger)):
            p = in_namespace(ns, CONNECT, "10.0.1.5")
            procs.append(p)
            said[name] = p.communicate(timeout=30)[0].strip()
        assert said["peer"] == "hello 10.0.2.9", said
        # No answer to its ARP: EHOSTUNREACH, or the timeout before it.
        assert said["stranger"] in ("EHOSTUNREACH", "TimeoutError"), said
        mine = netns.live_namespaces() - before
        assert len(mine) >= 5, mine  # three nodes' and two switches'
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
        for ns in spaces:
            ns.close()
        networks.close()
    assert host_links() == links
    assert not (netns.live_namespaces() & mine), "a namespace outlived its network"


def test_ec2_instances_of_one_security_group_share_a_network_and_their_imds_says_their_address(
        tmp_path, moto_server):
    """The AWS stand-in (tests/fakes/ec2_boot.py): an instance's IMDS answers the private
    address EC2 gave it, which is its node's address; instances of a group that admits
    its own members (a geotrain site's, providers/aws/network.py) reach each other there;
    an instance of another such group in the same VPC does not."""
    import urllib.request

    import boto3

    from geotrain.site.node_info import private_ip
    from tests.fakes.ec2_boot import Ec2Booter

    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST"),
                           timeout=10).close()
    ec2 = boto3.client("ec2", endpoint_url=moto_server, region_name="us-east-1",
                       aws_access_key_id="x", aws_secret_access_key="x")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]
    subnet = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])["Subnets"][0]
    groups = {}
    for name in ("site-a", "site-b"):
        gid = ec2.create_security_group(GroupName=name, Description=name, VpcId=vpc["VpcId"])["GroupId"]
        ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[
            {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": gid}]}])
        groups[name] = gid
    (tmp_path / "serve.py").write_text(SERVE)
    (tmp_path / "connect.py").write_text(CONNECT)
    addr = "$(ip -o -4 addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)"

    def launch(group: str, script: str) -> dict:
        return ec2.run_instances(ImageId="ami-0d1a0000000000002", InstanceType="t3.large",
                                 MinCount=1, MaxCount=1, UserData=f"#!/bin/bash\n{script}\n",
                                 NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": subnet["SubnetId"],
                                                     "Groups": [groups[group]]}])["Instances"][0]

    booter = Ec2Booter(moto_server, node_image(tmp_path / "image"), tmp_path / "nodes")
    try:
        head = launch("site-a", f"exec python3 {tmp_path / 'serve.py'} {addr}")
        ip = head["PrivateIpAddress"]
        peer = launch("site-a", f"python3 {tmp_path / 'connect.py'} {ip} > $GEOTRAIN_NODE_ROOT/said")
        stranger = launch("site-b", f"python3 {tmp_path / 'connect.py'} {ip} > $GEOTRAIN_NODE_ROOT/said")
        nodes = booter.wait_booted(3, timeout=60)
        said = {}
        for inst in (peer, stranger):
            out = nodes[inst["InstanceId"]].root / "said"
            wait_for(lambda: out.exists() and out.read_text().strip(), 60, every=0.2)
            said[inst["InstanceId"]] = out.read_text().strip()
        assert said[peer["InstanceId"]] == f"hello {peer['PrivateIpAddress']}", said
        assert said[stranger["InstanceId"]] in ("EHOSTUNREACH", "TimeoutError"), said
        assert len(booter.networks) == 2
        for inst in (head, peer, stranger):
            node = nodes[inst["InstanceId"]]
            assert node.private_ip == inst["PrivateIpAddress"] != "127.0.0.1"
            environ = {"GEOTRAIN_PROVIDER": "aws",
                       "GEOTRAIN_METADATA_ENDPOINT": booter.imds(inst["InstanceId"]).url}
            assert private_ip(environ, attempts=1) == inst["PrivateIpAddress"]
    finally:
        ids = booter.booted()
        booter.close()
    assert ids and not [p for iid in ids for p in tagged_pids(iid)]
