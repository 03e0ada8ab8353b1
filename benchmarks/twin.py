"""recipes/twin.yaml on stand-in clouds that boot what they create, through the CLI.

    python benchmarks/twin.py --out benchmarks/out/twin.json

AWS is moto (EC2 through a fault proxy) with tests/fakes/ec2_boot.py booting each
instance with its own IMDSv2; GCP is tests/fakes/gce_server.py booting each instance
with its own metadata server; Azure is tests/fakes/arm_server.py booting each VM with its
own IMDS; the s3:// run store is moto's S3 behind a proxy that takes only keys an
identity was given (an instance profile's role, or a stand-in STS trusting the GCP
nodes' service account or the Azure VM's managed identity). Every node installs
geotrain from the run store, in a network of its own where this machine allows it
(tests/fakes/netns.py), over a link shaped by --link.

The scenario, one run of the recipe (ended by `geotrain finish` once it is done):
  1. no identity: the recipe without east's instance profile is refused before anything
     is created;
  2. launch, the three sites train;
  3. AWS sends east (spot) an interruption notice through its IMDS while spot capacity
     is gone: east drains, and comes back on its GCP candidate;
  4. `geotrain migrate --site west --to aws:…`: west moves from GCP to AWS mid-run;
  5. finish; then a second, small run whose node role may not use the store: how soon
     its loss is reported; then `down`, and what is left in either cloud.
Writes the JSON the issue asks for; seconds are this machine's (compare, do not assert).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import AWS_AMIS, MOTO_CMD, free_port, wait_for_port  # noqa: E402
from tests.emulators import stop as stop_process  # noqa: E402
from tests.fakes.aws_faults import FaultProxy  # noqa: E402
from tests.fakes.aws_operator import user_policy  # noqa: E402
from tests.fakes.aws_identity import S3IdentityProxy, StsWebIdentity, grant_store  # noqa: E402
from tests.fakes.ec2_boot import Ec2Booter  # noqa: E402
from tests.fakes.gce_boot import BootConfig  # noqa: E402
from tests.fakes.gce_server import FakeGCE  # noqa: E402
from geotrain.site.store_identity import AZURE_AUDIENCE  # noqa: E402
from tests.fakes import netns  # noqa: E402
from tests.fakes.arm_server import FakeArm  # noqa: E402
from tests.fakes.azure_boot import BootConfig as AzureBoot  # noqa: E402
from tests.fakes.node import node_image, tagged_pids  # noqa: E402
from tests.helpers import wait_for  # noqa: E402

BUCKET = "geotrain-twin"
PROFILE = "geotrain-node"
ACCOUNT = "geotrain-node@my-project.iam.gserviceaccount.com"
ROLE_ARN = "arn:aws:iam::123456789012:role/geotrain-node-web"
AZURE_ROLE_ARN = "arn:aws:iam::123456789012:role/geotrain-node-azure"
NODE_NET = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}
PATIENCE_S = 900.0


def wait(what: str, fn, timeout: float = PATIENCE_S, every: float = 0.5):
    try:
        return wait_for(fn, timeout, every)
    except TimeoutError:
        raise TimeoutError(f"{what}: not within {timeout:.0f} s") from None


class Twin:
    """The stand-in clouds and the operator's environment."""

    def __init__(self, work: Path):
        self.work = work
        port = free_port()
        self.moto = subprocess.Popen([*MOTO_CMD, "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=dict(os.environ, MOTO_AMIS_PATH=str(AWS_AMIS)))
        wait_for_port(port, self.moto)
        moto = f"http://127.0.0.1:{port}"
        import boto3

        kw = dict(endpoint_url=moto, region_name="us-east-1", aws_access_key_id="x",
                  aws_secret_access_key="x")
        boto3.client("s3", **kw).create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", **kw)
        for name in (PROFILE,):
            iam.create_role(RoleName=name, AssumeRolePolicyDocument=(
                ROOT / "infra/aws/geotrain-node-trust.json").read_text())
            iam.create_instance_profile(InstanceProfileName=name)
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
        # The roles that may use the store carry the node policy, which the S3 stand-in enforces.
        web = ROLE_ARN.rsplit("/", 1)[-1]
        iam.create_role(RoleName=web, AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRoleWithWebIdentity",
                                                    "Principal": {"Federated": "accounts.google.com"}}]}))
        for name in (PROFILE, web):
            grant_store(iam, name, f"s3://{BUCKET}/runs")
        self.ec2 = boto3.client("ec2", **kw)
        self.ec2_proxy = FaultProxy(moto)
        # The operator's machine holds only infra/aws/geotrain-user-policy.json: every AWS call
        # it makes (EC2, IAM, STS, S3 and the nodes' downloads by its signed URLs) is judged.
        self.ec2_proxy.enforce(user_policy(BUCKET))
        self.s3 = S3IdentityProxy(moto)
        image = node_image(work / "image")
        gce_net = {**NODE_NET, "AWS_ENDPOINT_URL_S3": self.s3.url, "AWS_DEFAULT_REGION": "us-east-1",
                   "NO_PROXY": "127.0.0.1,localhost"}
        self.gce = FakeGCE(boot=BootConfig(image, work / "gce", gce_net))
        self.sts = StsWebIdentity(self.gce.claims_of, {ROLE_ARN: {ACCOUNT}}, s3_proxy=self.s3)
        gce_net["AWS_ENDPOINT_URL_STS"] = self.sts.url
        self.gce.start()
        # Azure: a user-assigned identity whose Entra tokens the role geotrain-node-azure trusts.
        azure_role = AZURE_ROLE_ARN.rsplit("/", 1)[-1]
        iam.create_role(RoleName=azure_role, AssumeRolePolicyDocument="{}")  # the STS applies it
        grant_store(iam, azure_role, f"s3://{BUCKET}/runs")
        self.arm = FakeArm()
        self.uai = (f"/subscriptions/{self.arm.subscription}/resourceGroups/geotrain/providers/"
                    "Microsoft.ManagedIdentity/userAssignedIdentities/geotrain-node")
        principal, _ = FakeArm.user_identity(self.uai)
        self.sts_azure = StsWebIdentity(
            lambda tok: (lambda i: i and {"aud": i["resource"], "sub": i["principal_id"],
                                          "email": i["principal_id"]})(self.arm.token_info(tok)),
            {AZURE_ROLE_ARN: {principal}}, s3_proxy=self.s3, audience=AZURE_AUDIENCE,
            provider="login.microsoftonline.com/T/v2.0")
        self.arm.start()
        self.arm.enable_boot(AzureBoot(image, work / "azure", {
            **NODE_NET, "AWS_ENDPOINT_URL_S3": self.s3.url, "AWS_ENDPOINT_URL_STS": self.sts_azure.url,
            "AWS_DEFAULT_REGION": "us-east-1", "NO_PROXY": "127.0.0.1,localhost"}))
        self.booter = Ec2Booter(moto, image, work / "ec2", NODE_NET, s3_proxy=self.s3,
                                store_roles={PROFILE})
        self.ec2_proxy.answer("GetConsoleOutput", self.booter.console_output)
        self.home = work / "home"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("AWS_", "GOOGLE_", "GCE_", "AZURE_", "GEOTRAIN_"))}
        self.env.update(GEOTRAIN_HOME=str(self.home), AWS_ENDPOINT_URL=self.ec2_proxy.url,
                        AWS_ENDPOINT_URL_S3=self.ec2_proxy.url, AWS_ACCESS_KEY_ID="AKIATWINOPERATOR0001",
                        AWS_SECRET_ACCESS_KEY="twin-operator-secret", AWS_DEFAULT_REGION="us-east-1",
                        AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
                        AWS_EC2_METADATA_DISABLED="true", NO_PROXY="127.0.0.1,localhost",
                        CLOUDSDK_CONFIG=str(work / "gcloud"), PYTHONUNBUFFERED="1",
                        GEOTRAIN_GCE_ENDPOINT=self.gce.url, GCE_METADATA_HOST=self.gce.host,
                        GCE_METADATA_IP=self.gce.host, AZURE_SUBSCRIPTION_ID=self.arm.subscription,
                        GEOTRAIN_ARM_ENDPOINT=self.arm.base_url,
                        GEOTRAIN_ARM_CA_BUNDLE=str(self.arm.ca_path),
                        IDENTITY_ENDPOINT=self.arm.identity_endpoint,
                        IDENTITY_HEADER=self.arm.identity_header)
        os.environ.update(self.env)  # this process reads the run store as the operator does

    def cli(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-m", "geotrain", *args], env=self.env, cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"geotrain {' '.join(args)}: exit {p.returncode}\n{p.stdout[-2000:]}"
                               f"\n{p.stderr[-2000:]}")
        return p

    def status(self, run: str) -> dict:
        return json.loads(self.cli("status", run, "--json").stdout)

    def events(self, run: str) -> list[dict]:
        return [json.loads(line) for line in self.cli("logs", run, "--json").stdout.splitlines()]

    def event(self, run: str, kind: str, since: float = 0.0, **match) -> dict | None:
        return next((e for e in self.events(run) if e["kind"] == kind and e["at"] >= since
                     and all(e.get(k) == v for k, v in match.items())), None)

    def nodes(self) -> list:
        """Every node either cloud booted (live or gone)."""
        with self.gce._lock:
            gce = list(self.gce._booter.history)
        with self.arm._lock:
            azure = list(self.arm._booter.history)
        return list(self.booter.history) + gce + azure

    def live_instances(self) -> int:
        ec2 = sum(1 for r in self.ec2.describe_instances()["Reservations"] for i in r["Instances"]
                  if i["State"]["Name"] not in ("terminated", "shutting-down"))
        return ec2 + len(self.gce.instances) + len(
            self.arm.resources("Microsoft.Compute/virtualMachines"))

    def close(self) -> None:
        self.booter.close()
        self.gce.stop()
        self.arm.stop()
        for closer in (self.sts.close, self.sts_azure.close, self.s3.close, self.ec2_proxy.close):
            closer()
        stop_process(self.moto)


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def rounds_without(store, members: set[str], first: int, last: int) -> int:
    """Rounds in [first, last] whose decision accepted none of `members`."""
    lost = 0
    for r in range(first, last + 1):
        decision = store.members(r)
        if decision is not None and not {e["site"] for e in decision["accepted"]} & members:
            lost += 1
    return lost


def first_round_with(store, members: set[str], after: int) -> int | None:
    r = after + 1
    while (decision := store.members(r)) is not None:
        if {e["site"] for e in decision["accepted"]} & members:
            return r
        r += 1
    return None


def scenario(t: Twin) -> dict:
    from geotrain.site.node_info import fatal_line
    from geotrain.store import RunStore

    base = yaml.safe_load((ROOT / "recipes/twin.yaml").read_text())
    base["store"]["url"] = f"s3://{BUCKET}/runs"
    base["train"]["rounds"] = 100_000  # ended by `geotrain finish` once the scenario is done
    south = next(x for x in base["sites"] if x["provider"] == "azure")
    south["azure"]["identity"] = t.uai  # the stand-in's subscription
    out: dict = {}

    # 1. No identity: refused before anything is created.
    bad = json.loads(json.dumps(base))
    bad["sites"][0].pop("aws")
    p = t.cli("launch", str(write(t.work / "no-identity.yaml", bad)), check=False)
    out["no_identity"] = {"refused_before_create": p.returncode != 0 and not
                          t.ec2_proxy.calls("RunInstances") and not t.gce.instances
                          and not t.arm.resources("Microsoft.Compute/virtualMachines"),
                          "message": p.stderr.strip()}

    # 2. Launch; both sites train.
    t0 = time.time()
    run = json.loads(t.cli("launch", str(write(t.work / "twin.yaml", base)), "--detach",
                           "--json").stdout)["run"]
    wait("the sites training", lambda: t.status(run)["rounds_done"] >= 2)
    store = RunStore(t.status(run)["store"])
    print(f"the sites trained 2 rounds, {time.time() - t0:.0f} s after launch", flush=True)

    # 3. Spot notice on east while AWS has no spot capacity: east returns on GCP.
    [east_node] = [n for n in t.booter.nodes().values()]
    t.ec2_proxy.fail("RunInstances", "InstanceMarketOptions.MarketType", {"spot"},
                     "InsufficientInstanceCapacity")
    at_notice = store.latest_global() or 0
    t_notice = time.time()
    t.booter.notice(east_node.instance_id, "terminate", in_s=120)
    drained = wait("east drained", lambda: t.event(run, "preempting", t_notice, source="east"))
    wait("east back", lambda: t.event(run, "site-rejoined", t_notice, site="east"))
    east_hb = store.heartbeat("east") or {}
    # The round east's drained agent published its partial work in, then the first its
    # replacement contributed to: the rounds between are the ones east sat out.
    partial = first_round_with(store, {"east"}, at_notice) or at_notice
    back = wait("east contributing again", lambda: first_round_with(store, {"east"}, partial))
    east_now = next(s for s in t.status(run)["sites"] if s["name"] == "east")
    out["preemption"] = {"site": "east", "from": "aws", "to": east_now["provider"],
                         "notice_to_drained_s": round(drained["at"] - t_notice, 2),
                         "notice_to_replacement_step_s": round(east_hb["first_step_at"] - t_notice, 2),
                         "rounds_lost": rounds_without(store, {"east"}, partial + 1, back - 1)}
    print(f"preemption: {out['preemption']}", flush=True)

    # 4. Move west from GCP to AWS while the run goes on, once both sites train together.
    both = wait("a round with both sites", lambda: (lambda r: r if r and first_round_with(
        store, {"west"}, r - 1) == r and first_round_with(store, {"east"}, r - 1) == r else None)(
        store.latest_global()))
    before = both
    t_move = time.time()
    t.cli("migrate", run, "--site", "west", "--to", "aws:us-east-1:g5.xlarge", "--json",
          timeout=PATIENCE_S)
    moved = wait("west migrated", lambda: t.event(run, "site-migrated", t_move, site="west"))
    joined = first_round_with(store, {moved["member"]}, before) or before
    west_now = next(s for s in t.status(run)["sites"] if s["name"] == "west")
    out["migration"] = {"site": "west", "from": "gcp", "to": west_now["provider"],
                        "downtime_s": round(moved["downtime_s"], 2),
                        "rounds_lost": rounds_without(store, {"west", moved["member"]},
                                                      before + 1, joined - 1)}
    print(f"migration: {out['migration']}", flush=True)

    # 5. Finish; the run's figures.
    t.cli("finish", run, "--json", timeout=PATIENCE_S)
    final = t.status(run)
    out.update(run=run, state=final["state"], rounds_done=final["rounds_done"],
               rounds_total=final["rounds_total"])
    booted: dict[str, int] = {}
    for node in t.nodes():
        head = node.console_text().splitlines()[:3]
        line = next((x for x in head if x.startswith("geotrain boot: run ")), "")
        if f"run {run} " in line and "verified" in node.console_text():
            site = line.split(" site ")[1].split()[0].split("~")[0]
            booted[site] = booted.get(site, 0) + 1
    out["sites"] = [{"name": s["name"], "provider": s["provider"],
                     "nodes_booted": booted.get(s["name"], 0)} for s in final["sites"]]
    out["losses"] = [{"site": e.get("site"), "reason": e.get("reason"), "at_s": round(e["at"] - t0, 1)}
                     for e in t.events(run) if e["kind"] == "site-lost"]
    out["migration"]["events"] = [f"{round(e['at'] - t0, 1)} {e['kind']}: {e['message']}"
                                  for e in t.events(run) if e["at"] >= t_move - 1
                                  and e["source"] == "controller" and e["at"] <= moved["at"] + 1]

    # 6. A node whose role may not use the store: reported, not a silent hang. Its role is
    # the node role, which is granted the store's runs/ folder only; this run's store is
    # another folder of the bucket (the operator may use the whole bucket, and may pass
    # only the node role: infra/aws/geotrain-user-policy.json).
    small = {"name": "twin-no-access", "model": base["model"], "train": {**base["train"], "rounds": 2},
             "store": {"url": f"s3://{BUCKET}/elsewhere"}, "sync": {"max_replacements": 0},
             "sites": [{"name": "solo", "provider": "aws", "region": "us-east-1",
                        "instance_type": "g5.xlarge", "aws": {"instance_profile": PROFILE}}]}
    known = set(t.booter.booted())
    run2 = json.loads(t.cli("launch", str(write(t.work / "no-access.yaml", small)), "--detach",
                            "--json").stdout)["run"]
    node = wait("the no-access node", lambda: next((n for i, n in t.booter.nodes().items()
                                                     if i not in known), None))
    wait("its fatal line", lambda: fatal_line(node.console_text()), every=0.2)
    printed = time.time()
    lost = wait("its loss reported", lambda: t.event(run2, "site-lost", 0, site="solo"), every=0.2)
    out["no_access"] = {"reported_s": round(max(0.0, lost["at"] - printed), 2),
                        "message": lost["reason"]}

    # 7. Down; what is left.
    for r in (run, run2):
        t.cli("down", r, timeout=PATIENCE_S)
    wait("every node stopped", lambda: not any(tagged_pids(n.instance_id) for n in t.nodes()), 120)
    out["leftovers"] = {"instances": t.live_instances(),
                        "processes": sum(len(tagged_pids(n.instance_id)) for n in t.nodes())}
    enforcer = t.ec2_proxy.enforcer
    out["operator_policy"] = {"judged": len(enforcer.judged) if enforcer else 0,
                              "refused": [f"{d['service']} {d['call']}: {d['why']}"
                                          for d in t.ec2_proxy.denied()]}
    # Each node's own network (tests/fakes/netns.py): what crossed its link to the
    # store and metadata services.
    links = [(n.instance_id, n.link) for n in t.nodes() if n.link is not None]
    out["network"] = {
        "nodes": "isolated" if links else f"host ({netns.available() or 'GEOTRAIN_STANDIN_NETWORK'})",
        "link": os.environ.get("GEOTRAIN_STANDIN_LINK", netns.DEFAULT_LINK),
        "per_node": [{"node": i, "connections": lk.stats.connections, "bytes_out": lk.stats.bytes_out,
                      "bytes_in": lk.stats.bytes_in} for i, lk in links]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "twin.json")
    ap.add_argument("--link", default=netns.DEFAULT_LINK,
                    help="the shape of each node's link to the services it reaches, e.g. "
                    "'delay_ms=25,rate_mbit=100' (GEOTRAIN_STANDIN_LINK)")
    a = ap.parse_args()
    os.environ["GEOTRAIN_STANDIN_LINK"] = a.link
    netns.Link.parse(a.link)  # a typo is an error now, not at the first boot
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gt-twin-") as tmp:
        twin = Twin(Path(tmp))
        try:
            result = scenario(twin)
        finally:
            twin.close()
    keys = ("run", "state", "rounds_done", "rounds_total", "sites", "preemption", "migration",
            "no_identity", "no_access", "leftovers", "operator_policy", "losses", "network")
    result = {k: result[k] for k in keys}
    result["measured"] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "wall_s": round(time.time() - started, 1),
                          "command": f"python benchmarks/twin.py --link {a.link} --out {a.out}"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["state"] == "succeeded" and not any(result["leftovers"].values()) \
        and not result["operator_policy"]["refused"] else 1


if __name__ == "__main__":
    sys.exit(main())
