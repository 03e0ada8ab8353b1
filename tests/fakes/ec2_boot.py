"""An AWS stand-in cloud that boots what it creates.

moto server plays EC2, IAM and S3 but never boots an instance and never checks a
credential. This module adds what a real AWS account does around an instance:

- `Imds` (tests/fakes/ec2_imds.py): the instance metadata service (IMDSv2) of ONE
  instance, on 127.0.0.1:<free port>: session tokens, identity, placement, the
  instance profile's role credentials, spot interruption notices.
- `S3IdentityProxy` (tests/fakes/aws_identity.py): an HTTP proxy in front of moto's
  S3 that forwards only requests signed with an allowed access key id, and for a
  role's key only what the role's IAM policies (in moto's IAM) allow.
- `Ec2Booter` (here): a thread that polls moto's EC2 and boots every pending/running
  instance once, as a `tests.fakes.node.BootedNode` running its user data, with
  its own `Imds`; it stops the node and its Imds when the instance goes.

Where nodes get networks of their own (tests/fakes/netns.py), each node also gets the
private address EC2 gave its instance (`PrivateIpAddress`, in its subnet), which its
IMDS answers as local-ipv4, on a private network shared by the instances of the same
VPC whose security groups admit their own members (a group with a rule from itself for
all traffic, as a site's group, providers/aws/network.py, has): those reach each other,
nothing else reaches them. An instance none of whose groups admits its own members is
on a network of its own. (A simplification: instances share a network only when they
have the same such groups.)

    proxy = S3IdentityProxy(moto_url)
    booter = Ec2Booter(moto_url, node_image(tmp / "image"), tmp / "nodes", {},
                       s3_proxy=proxy, store_roles={"geotrain-node"})
    ... ec2.run_instances(..., UserData=script, IamInstanceProfile={"Name": "geotrain-node"})
    booter.wait_booted(1, timeout=60)
    booter.notice(instance_id)          # spot instance-action at that instance's Imds
    booter.close(); proxy.close()
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import threading
import time
import uuid
from pathlib import Path

from tests.fakes import netns
from tests.fakes.aws_identity import S3IdentityProxy
from tests.fakes.ec2_imds import Imds, iso_time
from tests.fakes.node import BootedNode

log = logging.getLogger("tests.fakes.ec2_boot")

LIVE_STATES = ("pending", "running")


class Ec2Booter:
    """Boots every pending/running instance of moto's EC2 once, ends it when it goes.

    ec2_url     moto server (EC2 and IAM)
    image_bin   a node image's bin dir (tests.fakes.node.node_image)
    workdir     each node's root is workdir/<instance id>
    node_env    extra environment every node gets
    regions     the regions polled
    s3_proxy    an S3IdentityProxy: a node's role credentials are added to its
                allowed keys when the role is in `store_roles` (or `store_roles`,
                a callable, returns True for it), bound to the role, so the proxy
                forwards only what the role's IAM policies allow
    """

    def __init__(self, ec2_url: str, image_bin: Path, workdir: Path, node_env: dict[str, str] | None = None,
                 *, regions: tuple[str, ...] | list[str] = ("us-east-1",),
                 s3_proxy: S3IdentityProxy | None = None, store_roles=(),
                 interval_s: float = 0.3, stop_grace_s: float = 5.0, start: bool = True):
        import boto3  # the test environment's; a node never sees the test's credentials

        self.ec2_url, self.image_bin, self.workdir = ec2_url, Path(image_bin), Path(workdir)
        self.node_env = dict(node_env or {})
        self.regions = tuple(regions)
        self.s3_proxy, self.store_roles = s3_proxy, store_roles
        self.interval_s, self.stop_grace_s = interval_s, stop_grace_s
        self.errors: list[str] = []  # poll-loop errors, logged and retried
        from botocore.config import Config

        kw = dict(endpoint_url=ec2_url, aws_access_key_id="testing", aws_secret_access_key="testing",
                  config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 2}))
        self._ec2 = {r: boto3.client("ec2", region_name=r, **kw) for r in self.regions}
        self._iam = boto3.client("iam", region_name=self.regions[0], **kw)
        self._cond = threading.Condition()
        self._booted: set[str] = set()          # every instance id ever booted
        self._nodes: dict[str, BootedNode] = {}  # live ones
        self.history: list[BootedNode] = []      # every node ever booted, gone ones too
        self._imds: dict[str, Imds] = {}
        self._keys: dict[str, str] = {}          # instance id -> access key id allowed at the proxy
        self._stoppers: list[threading.Thread] = []
        self.networks = netns.Networks()  # the VPCs' private sides, by (region, VPC, groups)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ec2-booter", daemon=True)
        if start:
            self._thread.start()

    # -- public --------------------------------------------------------------------------

    def nodes(self) -> dict[str, BootedNode]:
        with self._cond:
            return dict(self._nodes)

    def imds(self, instance_id: str) -> Imds:
        with self._cond:
            return self._imds[instance_id]

    def booted(self) -> set[str]:
        with self._cond:
            return set(self._booted)

    def notice(self, instance_id: str, action: str = "terminate", in_s: float = 120.0) -> None:
        """A spot interruption notice at that instance's Imds."""
        self.imds(instance_id).notice(action, in_s)

    def console_output(self, params: dict[str, str]) -> bytes:
        """EC2's GetConsoleOutput answer for a booted instance: the last 64 KiB of what its
        node printed, base64-encoded as EC2 sends it (for FaultProxy.answer)."""
        iid = params.get("InstanceId", "")
        with self._cond:
            node = self._nodes.get(iid)
        text = node.console.read_bytes()[-64 * 1024:] if node and node.console.exists() else b""
        output = base64.b64encode(text).decode()
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<GetConsoleOutputResponse '
                f'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>{uuid.uuid4()}'
                f"</requestId><instanceId>{iid}</instanceId><timestamp>{iso_time(time.time())}"
                f"</timestamp><output>{output}</output></GetConsoleOutputResponse>").encode()

    def wait_booted(self, n: int, timeout: float = 60.0) -> dict[str, BootedNode]:
        """Wait until `n` instances have booted in all; the live nodes."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._booted) >= n, timeout):
                raise TimeoutError(f"{len(self._booted)} of {n} instances booted within {timeout} s "
                                   f"(poll errors: {self.errors[-3:]})")
            return dict(self._nodes)

    def wait_stopped(self, instance_id: str, timeout: float = 60.0) -> None:
        """Wait until the booter has ended that instance's node and Imds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if not self._cond.wait_for(lambda: instance_id not in self._nodes, timeout):
                raise TimeoutError(f"{instance_id} still has a node after {timeout} s")
            threads = list(self._stoppers)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Stop the thread, every node and every Imds."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        with self._cond:
            ids = list(self._nodes)
        for iid in ids:
            self._retire(iid, wait=False)
        with self._cond:
            threads = list(self._stoppers)
        for t in threads:
            t.join(timeout=self.stop_grace_s + 30)
        self.networks.close()

    def __enter__(self) -> Ec2Booter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as e:  # noqa: BLE001 - log, retry; never end the thread
                log.warning("EC2 booter poll failed (retrying): %s: %s", type(e).__name__, e)
                self.errors.append(f"{type(e).__name__}: {e}")
            self._stop.wait(self.interval_s)

    def poll_once(self) -> None:
        seen: dict[str, tuple[str, dict]] = {}
        for region, ec2 in self._ec2.items():
            for page in ec2.get_paginator("describe_instances").paginate():
                for res in page["Reservations"]:
                    for inst in res["Instances"]:
                        seen[inst["InstanceId"]] = (region, inst)
        for iid, (region, inst) in seen.items():
            if self._stop.is_set():
                return
            state = inst["State"]["Name"]
            if state in LIVE_STATES:
                with self._cond:
                    new = iid not in self._booted
                if new:
                    try:
                        self._boot(region, inst)
                    except Exception as e:  # noqa: BLE001 - the next poll tries again
                        log.warning("could not boot %s (retrying): %s: %s", iid, type(e).__name__, e)
                        self.errors.append(f"boot {iid}: {type(e).__name__}: {e}")
            else:
                self._retire(iid)
        with self._cond:
            gone = [iid for iid in self._nodes if iid not in seen]
        for iid in gone:
            self._retire(iid)

    def _role_of(self, inst: dict) -> tuple[str | None, str | None]:
        profile = inst.get("IamInstanceProfile")
        if not profile or not profile.get("Arn"):
            return None, None
        name = profile["Arn"].rsplit("/", 1)[-1]
        roles = self._iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Roles"]
        return (roles[0]["RoleName"] if roles else None), profile["Arn"]

    def _may_use_store(self, role: str) -> bool:
        if callable(self.store_roles):
            return bool(self.store_roles(role))
        return role in self.store_roles

    def _nic(self, region: str, inst: dict) -> netns.Nic | None:
        """The instance's interface on its VPC's private network (see the module's doc);
        None where nodes share this machine's network."""
        address, vpc = inst.get("PrivateIpAddress"), inst.get("VpcId")
        if not (address and vpc) or not netns.use_isolated():
            return None
        ec2 = self._ec2[region]
        cidr = ec2.describe_vpcs(VpcIds=[vpc])["Vpcs"][0]["CidrBlock"]
        primary = [n for n in inst.get("NetworkInterfaces", [])
                   if (n.get("Attachment") or {}).get("DeviceIndex") == 0]
        ids = sorted({g["GroupId"] for g in inst.get("SecurityGroups", []) +
                      (primary[0].get("Groups", []) if primary else [])})
        groups = ec2.describe_security_groups(GroupIds=ids)["SecurityGroups"] if ids else []
        admitting = sorted(g["GroupId"] for g in groups if any(
            p.get("IpProtocol") == "-1" and any(pair.get("GroupId") == g["GroupId"]
                                                for pair in p.get("UserIdGroupPairs", []))
            for p in g.get("IpPermissions", [])))
        key = (region, vpc, tuple(admitting) or inst["InstanceId"])
        return self.networks.nic(key, address, ipaddress.ip_network(cidr).prefixlen)

    def _boot(self, region: str, inst: dict) -> None:
        iid = inst["InstanceId"]
        attr = self._ec2[region].describe_instance_attribute(InstanceId=iid, Attribute="userData")
        raw = (attr.get("UserData") or {}).get("Value")
        script = base64.b64decode(raw).decode("utf-8", "replace") if raw else ""
        role, profile_arn = self._role_of(inst)
        zone = (inst.get("Placement") or {}).get("AvailabilityZone") or f"{region}a"
        imds = Imds(iid, region, zone, role=role, profile_arn=profile_arn)
        key = None
        try:
            if role is not None:
                key = imds.issue_credentials()["AccessKeyId"]
                if self.s3_proxy is not None and self._may_use_store(role):
                    self.s3_proxy.allow(key, role=role)  # for what the role's policies allow
                else:
                    key = None
            env = {**self.node_env,
                   "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"{imds.url}/",
                   "GEOTRAIN_METADATA_ENDPOINT": imds.url,
                   "AWS_DEFAULT_REGION": region,
                   "NO_PROXY": "127.0.0.1,localhost"}
            if self.s3_proxy is not None:
                env["AWS_ENDPOINT_URL_S3"] = self.s3_proxy.url
            node = BootedNode(iid, script, self.workdir / iid, self.image_bin, env=env,
                              nic=self._nic(region, inst))
            imds.private_ip = node.private_ip  # before it boots: what local-ipv4 answers
            with self._cond:
                if self._stop.is_set():
                    raise RuntimeError("booter closing")
                node.start()
                self._booted.add(iid)
                self._nodes[iid], self._imds[iid] = node, imds
                self.history.append(node)
                if key:
                    self._keys[iid] = key
                self._cond.notify_all()
            log.info("booted %s (%s, role %s) at %s", iid, region, role, node.root)
        except BaseException:
            imds.close()
            if key and self.s3_proxy is not None:
                self.s3_proxy.revoke(key)
            raise

    def _retire(self, iid: str, wait: bool = False) -> None:
        """End a node and its Imds (in a thread: a node gets `stop_grace_s` to shut down)."""
        box: dict = {}

        def stop() -> None:
            node, imds, key = box["node"], box["imds"], box["key"]
            try:
                if node is not None:
                    node.stop(grace_s=self.stop_grace_s)
            except Exception as e:  # noqa: BLE001
                log.warning("stopping %s failed: %s", iid, e)
            finally:
                if imds is not None:
                    imds.close()
                if key and self.s3_proxy is not None:
                    self.s3_proxy.revoke(key)

        t = threading.Thread(target=stop, name=f"stop-{iid}", daemon=True)
        with self._cond:
            box["node"] = self._nodes.pop(iid, None)
            box["imds"] = self._imds.pop(iid, None)
            box["key"] = self._keys.pop(iid, None)
            if box["node"] is None and box["imds"] is None:
                return
            self._stoppers = [s for s in self._stoppers if s.is_alive()] + [t]
            t.start()
            self._cond.notify_all()
        log.info("stopping %s", iid)
        if wait:
            t.join()
