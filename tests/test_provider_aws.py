"""The AWS provider on the wire: real boto3 against a real moto server, through
a fault-injecting proxy (tests/fakes/aws_faults.py) that answers chosen
RunInstances calls with EC2's own capacity errors.

Run: GEOTRAIN_HOME=$(mktemp -d) .venv/bin/python -m pytest -q tests/test_provider_aws.py
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import boto3
import pytest

from geotrain.errors import CapacityError, ProviderError
from geotrain.recipe import AwsOptions
from providers import SitePlan, aws
from tests.conftest import free_port
from tests.fakes.aws_faults import FaultProxy

ROOT = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
ACCESS_KEY = "AKIAGEOTRAINTESTKEY1"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYGEOTRAINKEY"
STORE = "s3://geotrain-runs/team's exp 1"  # a quote and a space: must arrive shell-quoted
NEWEST_DLAMI = "ami-0d1a0000000000002"      # see tests/fakes/aws_amis.json
SUBNET = "NetworkInterface.1.SubnetId"      # the subnet goes on the node's one interface


@pytest.fixture
def proxy(moto_server, monkeypatch):
    """A fresh moto state behind a fault proxy; boto3 pointed at the proxy."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST"),
                           timeout=10).close()
    px = FaultProxy(moto_server)
    for key in ("AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", px.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/geotrain-aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/geotrain-aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(aws, "WAIT_DELAY_S", 0.2)
    try:
        yield px
    finally:
        px.close()


def client(moto_server, service="ec2", region=REGION):
    """A client straight to moto (not through the proxy), for assertions."""
    return boto3.client(service, endpoint_url=moto_server, region_name=region)


def plan(**kw) -> SitePlan:
    args = dict(run_id="run-aws1", site="east", provider="aws", store_url=STORE, region=REGION,
                zones=("us-east-1a", "us-east-1b"), nodes=2, instance_type="g5.xlarge", spot=True)
    return SitePlan(**{**args, **kw})


def subnet_of(ec2, zone: str) -> str:
    return ec2.describe_subnets(Filters=[{"Name": "availability-zone", "Values": [zone]},
                                         {"Name": "default-for-az", "Values": ["true"]}])["Subnets"][0]["SubnetId"]


def instances(ec2, **filters) -> list[dict]:
    f = [{"Name": k, "Values": v} for k, v in filters.items()]
    return [i for r in ec2.describe_instances(Filters=f)["Reservations"] for i in r["Instances"]]


def live(ec2) -> list[dict]:
    return [i for i in instances(ec2) if i["State"]["Name"] != "terminated"]


def geotrain_groups(ec2) -> list[dict]:
    return [g for g in ec2.describe_security_groups()["SecurityGroups"]
            if g["GroupName"].startswith("geotrain-")]


def user_data(ec2, instance_id: str) -> str:
    attr = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(attr["UserData"]["Value"]).decode()


def node_profile(moto_server) -> str:
    """The node role and instance profile built from infra/aws's documents
    (moto's IAM validates their grammar)."""
    iam = client(moto_server, "iam")
    docs = ROOT / "infra" / "aws"
    sub = {"ACCOUNT_ID": "123456789012", "RUN_BUCKET": "geotrain-runs", "RUN_PREFIX": "exp1"}

    def load(name):
        text = (docs / name).read_text()
        for k, v in sub.items():
            text = text.replace(k, v)
        json.loads(text)
        return text

    iam.create_policy(PolicyName="geotrain-user", PolicyDocument=load("geotrain-user-policy.json"))
    iam.create_policy(PolicyName="geotrain-node-boundary", PolicyDocument=load("geotrain-node-boundary.json"))
    iam.create_role(RoleName="geotrain-node", AssumeRolePolicyDocument=load("geotrain-node-trust.json"))
    iam.put_role_policy(RoleName="geotrain-node", PolicyName="geotrain-store",
                        PolicyDocument=load("geotrain-node-policy.json"))
    iam.create_instance_profile(InstanceProfileName="geotrain-node")
    iam.add_role_to_instance_profile(InstanceProfileName="geotrain-node", RoleName="geotrain-node")
    return "geotrain-node"


def test_spot_launch_two_nodes(proxy, moto_server):
    profile = node_profile(moto_server)
    nodes = aws.launch(plan(provider_options=AwsOptions(instance_profile=profile)))
    ec2 = client(moto_server)

    assert len(nodes) == 2 and {n.site for n in nodes} == {"east"}
    assert all(n.provider == "aws" and n.region == REGION and n.private_ip for n in nodes)
    sent = proxy.calls("RunInstances")
    assert len(sent) == 2
    for req in sent:  # what went over the wire
        assert req["InstanceType"] == "g5.xlarge"
        assert req["InstanceMarketOptions.MarketType"] == "spot"
        assert req["InstanceMarketOptions.SpotOptions.SpotInstanceType"] == "one-time"
        assert req["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"] == "terminate"
        assert req["MetadataOptions.HttpTokens"] == "required"
        assert req["IamInstanceProfile.Name"] == profile
        assert req["ImageId"] == NEWEST_DLAMI  # newest x86_64 DLAMI, not the newer arm64 one
        # One interface, no public address; subnet and group on it, not beside it.
        assert req["NetworkInterface.1.AssociatePublicIpAddress"] == "false"
        assert req["NetworkInterface.1.SecurityGroupId.1"].startswith("sg-")
        assert "SubnetId" not in req and not any(k.startswith("SecurityGroupId") for k in req)
        assert req["BlockDeviceMapping.1.Ebs.VolumeSize"] == "100"

    tokens = set()
    by_id = {i["InstanceId"]: i for i in instances(ec2)}
    for node in nodes:
        inst = by_id[node.instance_id]
        assert inst["InstanceType"] == "g5.xlarge"
        assert inst["InstanceLifecycle"] == "spot"
        assert inst["MetadataOptions"]["HttpTokens"] == "required"
        assert inst["MetadataOptions"]["HttpEndpoint"] == "enabled"
        assert inst["IamInstanceProfile"]["Arn"].endswith(f"instance-profile/{profile}")
        assert inst["Placement"]["AvailabilityZone"] == "us-east-1a"
        assert "PublicIpAddress" not in inst  # the default subnet would have given one
        tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
        index = tags["geotrain-node"]
        assert tags["geotrain-run"] == "run-aws1" and tags["geotrain-site"] == "east"
        script = user_data(ec2, node.instance_id)
        assert f"export GEOTRAIN_RUN={shlex.quote('run-aws1')}" in script
        assert f"STORE={shlex.quote(STORE)}" in script
        assert f"export GEOTRAIN_NODE_INDEX={index}" in script and "export GEOTRAIN_NODES=2" in script
        token = re.search(r"export RAY_AUTH_TOKEN=([0-9a-f]{64})\n", script).group(1)
        tokens.add(token)
        assert token not in json.dumps(inst["Tags"])
        volumes = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id",
                                                 "Values": [node.instance_id]}])["Volumes"]
        assert volumes and all({"Key": "geotrain-run", "Value": "run-aws1"} in v["Tags"] for v in volumes)
    assert len(tokens) == 1  # one token per site, shared by its nodes
    assert sorted(tags["geotrain-node"] for tags in (
        {t["Key"]: t["Value"] for t in by_id[n.instance_id]["Tags"]} for n in nodes)) == ["0", "1"]
    aws.terminate(nodes)


def test_on_demand_launch_sends_no_market_options(proxy, moto_server):
    nodes = aws.launch(plan(spot=False, nodes=1, zones=()))
    req = proxy.calls("RunInstances")[0]
    assert not any(k.startswith("InstanceMarketOptions") for k in req)
    assert "IamInstanceProfile.Name" not in req
    inst = instances(client(moto_server), **{"instance-id": [nodes[0].instance_id]})[0]
    assert "InstanceLifecycle" not in inst
    aws.terminate(nodes)


def test_zone_failover_after_capacity_error(proxy, moto_server):
    ec2 = client(moto_server)
    first, second = subnet_of(ec2, "us-east-1a"), subnet_of(ec2, "us-east-1b")
    # Node 0 gets in, node 1 hits the wall: node 0 must go, the site moves whole.
    proxy.fail("RunInstances", SUBNET, {first}, "InsufficientInstanceCapacity", let_through=1)
    nodes = aws.launch(plan())
    assert [r[SUBNET] for r in proxy.calls("RunInstances")] == [first, first, second, second]
    zones = {i["InstanceId"]: i["Placement"]["AvailabilityZone"] for i in live(ec2)}
    assert zones == {n.instance_id: "us-east-1b" for n in nodes}
    assert [i["State"]["Name"] for i in instances(ec2, **{"subnet-id": [first]})] == ["terminated"]
    aws.terminate(nodes)


def test_all_zones_full_raises_capacity_error_and_leaves_nothing(proxy, moto_server):
    ec2 = client(moto_server)
    subnets = {subnet_of(ec2, z) for z in ("us-east-1a", "us-east-1b")}
    proxy.fail("RunInstances", SUBNET, subnets, "InsufficientInstanceCapacity", let_through=1)
    with pytest.raises(CapacityError) as err:
        aws.launch(plan(zones=("us-east-1a", "us-east-1b")))
    assert err.value.tried == ["aws:us-east-1/us-east-1a (InsufficientInstanceCapacity)",
                               "aws:us-east-1/us-east-1b (InsufficientInstanceCapacity)"]
    assert "us-east-1b" in str(err.value)
    assert len(proxy.calls("RunInstances")) == 3  # 1a: ok + full; 1b: full
    assert live(ec2) == [] and geotrain_groups(ec2) == []


@pytest.mark.parametrize("code", [
    "InsufficientInstanceCapacity", "InstanceLimitExceeded", "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow", "Unsupported", "InsufficientCapacity", "VcpuLimitExceeded"])
def test_every_capacity_code_maps_to_capacity_error(proxy, moto_server, code):
    ec2 = client(moto_server)
    proxy.fail("RunInstances", "Action", {"RunInstances"}, code, status=400)
    with pytest.raises(CapacityError) as err:
        aws.launch(plan(nodes=1, zones=("us-east-1c",)))
    assert err.value.tried == [f"aws:us-east-1/us-east-1c ({code})"]
    assert live(ec2) == [] and geotrain_groups(ec2) == []


def test_other_errors_are_provider_errors_and_clean_up(proxy, moto_server):
    ec2 = client(moto_server)
    proxy.fail("RunInstances", "Action", {"RunInstances"}, "UnauthorizedOperation", status=403,
               let_through=1)
    with pytest.raises(ProviderError) as err:
        aws.launch(plan())
    assert not isinstance(err.value, CapacityError)
    assert "UnauthorizedOperation" in str(err.value)
    assert len(proxy.calls("RunInstances")) == 2  # no failover on a non-capacity error
    assert live(ec2) == [] and geotrain_groups(ec2) == []


def test_security_group_admits_only_the_site_itself(proxy, moto_server):
    nodes = aws.launch(plan())
    ec2 = client(moto_server)
    (group,) = geotrain_groups(ec2)
    assert group["GroupName"] == "geotrain-run-aws1-east"
    assert {"Key": "geotrain-site", "Value": "east"} in group["Tags"]
    assert {"Key": "geotrain-run", "Value": "run-aws1"} in group["Tags"]
    (rule,) = group["IpPermissions"]
    assert rule["IpProtocol"] == "-1"
    assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [group["GroupId"]]
    text = json.dumps(group["IpPermissions"])
    assert "0.0.0.0/0" not in text and "::/0" not in text
    assert rule.get("IpRanges", []) == [] and rule.get("Ipv6Ranges", []) == []
    for inst in live(ec2):  # the group is on the node's one interface
        [eni] = inst["NetworkInterfaces"]
        assert [g["GroupId"] for g in eni["Groups"]] == [group["GroupId"]]
    aws.open_ports(plan())  # idempotent: same group, same single rule
    (again,) = geotrain_groups(ec2)
    assert again["GroupId"] == group["GroupId"] and len(again["IpPermissions"]) == 1
    aws.terminate(nodes)


def test_query_finds_nodes_by_tags_only(proxy, moto_server):
    mine = aws.launch(plan())
    theirs = aws.launch(plan(run_id="run-other", nodes=1))
    west = aws.launch(plan(site="west", region="us-west-2", zones=(), nodes=1, spot=False))
    found = aws.query("run-aws1", regions=[REGION, "us-west-2"])
    assert {n.instance_id for n in found} == {n.instance_id for n in mine + west}
    assert {(n.site, n.region) for n in found} == {("east", REGION), ("west", "us-west-2")}
    assert all(n.state in ("pending", "running") and n.private_ip for n in found)
    assert {n.instance_id for n in aws.query("run-aws1", "east", regions=[REGION])} == \
        {n.instance_id for n in mine}
    # No regions given: every enabled region is searched (moto has ~30).
    assert {n.instance_id for n in aws.query("run-aws1", "west")} == {west[0].instance_id}
    aws.terminate(mine + theirs + west)
    assert aws.query("run-aws1", regions=[REGION, "us-west-2"]) == []


def test_nodes_carry_the_owner_tag_and_down_orphans_sweeps_only_this_owners(proxy, moto_server,
                                                                            tmp_path, monkeypatch):
    import providers
    from geotrain.cleanup import down_orphans
    from geotrain.state import owner_id

    home = tmp_path / "home"
    me = owner_id(home)
    monkeypatch.setattr(aws, "enabled_regions", lambda: [REGION])  # not a sweep of ~30 regions
    monkeypatch.setattr(providers, "PROVIDERS", ("aws",))
    [mine] = aws.launch(plan(run_id="run-gone", nodes=1, owner=me))
    [teammate] = aws.launch(plan(run_id="run-team", nodes=1, owner="0123456789abcdef"))
    [untagged] = aws.launch(plan(run_id="run-old", nodes=1))
    ec2 = client(moto_server)
    [inst] = instances(ec2, **{"instance-id": [mine.instance_id]})
    assert {t["Key"]: t["Value"] for t in inst["Tags"]}["geotrain-owner"] == me
    [group] = [g for g in geotrain_groups(ec2) if g["GroupName"] == aws.group_name("run-gone", "east")]
    assert {t["Key"]: t["Value"] for t in group["Tags"]}["geotrain-owner"] == me
    assert {n.instance_id: n.owner for n in aws.query_all()} == {
        mine.instance_id: me, teammate.instance_id: "0123456789abcdef", untagged.instance_id: None}

    dry = down_orphans(home, dry_run=True)
    assert [n["instance_id"] for n in dry["found"]] == [mine.instance_id] and dry["others"] == 2
    assert dry["terminated"] == [] and not proxy.calls("TerminateInstances") and len(live(ec2)) == 3
    asked: list[list[str]] = []
    declined = down_orphans(home, confirm=lambda nodes: asked.append([n.instance_id for n in nodes]))
    assert declined["declined"] and asked == [[mine.instance_id]] and len(live(ec2)) == 3
    done = down_orphans(home)
    assert [n["instance_id"] for n in done["terminated"]] == [mine.instance_id]
    assert {i["InstanceId"] for i in live(ec2)} == {teammate.instance_id, untagged.instance_id}
    aws.terminate([teammate, untagged])


def test_terminate_leaves_nothing_and_is_idempotent(proxy, moto_server):
    nodes = aws.launch(plan())
    ec2 = client(moto_server)
    gone = aws.terminate(nodes)
    assert {n.state for n in gone} == {"terminated"}
    assert live(ec2) == [] and geotrain_groups(ec2) == []
    assert {i["State"]["Name"] for i in instances(ec2)} == {"terminated"}
    assert aws.terminate(nodes) == gone  # again: nothing to do, no error
    assert proxy.calls("TerminateInstances") and len(proxy.calls("TerminateInstances")) == 1


def test_terminate_retries_a_group_still_in_use(proxy, moto_server):
    nodes = aws.launch(plan(nodes=1))
    # A just-terminated instance's network interface holds the group a while.
    proxy.fail("DeleteSecurityGroup", "Action", {"DeleteSecurityGroup"}, "DependencyViolation",
               status=400, times=2)
    aws.terminate(nodes)
    assert len(proxy.calls("DeleteSecurityGroup")) == 3
    assert geotrain_groups(client(moto_server)) == []


def test_image_lookup(proxy, moto_server):
    ec2 = boto3.client("ec2", region_name=REGION)  # through the proxy, as the provider
    assert aws.find_image(ec2) == NEWEST_DLAMI
    assert aws.find_image(ec2, "al2023-ami-2023.*-x86_64") == "ami-0a1a0000000000001"
    proxy.reset()
    nodes = aws.launch(plan(nodes=1, provider_options=AwsOptions(image="ami-0a1a0000000000001")))
    assert proxy.calls("RunInstances")[0]["ImageId"] == "ami-0a1a0000000000001"
    # The recipe's image skips the lookup by name; only its root device is asked for.
    assert [c["ImageId.1"] for c in proxy.calls("DescribeImages")] == ["ami-0a1a0000000000001"]
    assert not any(k.startswith("Filter") for c in proxy.calls("DescribeImages") for k in c)
    aws.terminate(nodes)
    with pytest.raises(ProviderError, match="region us-east-1 has no AMI named like 'no-such-image-\\*'"):
        aws.launch(plan(options=(("image_name", "no-such-image-*"),)))
    assert live(client(moto_server)) == [] and geotrain_groups(client(moto_server)) == []


@pytest.mark.timeout(60)
def test_recipe_options_reach_the_wire(proxy, moto_server):
    """Subnets in zone order, the profile by ARN, the image, the disk and a public IP, from
    the recipe's `aws:` options."""
    ec2 = client(moto_server)
    node_profile(moto_server)
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    sub_b = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.2.0/24", AvailabilityZone="us-east-1b")
    sub_a = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24", AvailabilityZone="us-east-1a")
    b, a = sub_b["Subnet"]["SubnetId"], sub_a["Subnet"]["SubnetId"]
    arn = "arn:aws:iam::123456789012:instance-profile/geotrain-node"
    opts = AwsOptions(instance_profile=arn, subnets=[b, a], image="ami-0a1a0000000000001",
                      disk_gb=250, public_ip=True)
    proxy.fail("RunInstances", SUBNET, {a}, "InsufficientInstanceCapacity")  # 1a is full
    nodes = aws.launch(plan(nodes=1, provider_options=opts))
    calls = proxy.calls("RunInstances")
    assert [c[SUBNET] for c in calls] == [a, b]  # the plan's zone order, 1a then 1b
    req = calls[-1]
    assert req["IamInstanceProfile.Arn"] == arn and "IamInstanceProfile.Name" not in req
    assert req["ImageId"] == "ami-0a1a0000000000001"
    assert req["BlockDeviceMapping.1.Ebs.VolumeSize"] == "250"
    assert req["BlockDeviceMapping.1.Ebs.DeleteOnTermination"] == "true"
    assert req["NetworkInterface.1.AssociatePublicIpAddress"] == "true"
    [inst] = live(ec2)
    assert inst["SubnetId"] == b and inst["VpcId"] == vpc and inst.get("PublicIpAddress")
    [group] = geotrain_groups(ec2)
    assert group["VpcId"] == vpc
    aws.terminate(nodes)
    assert live(ec2) == [] and geotrain_groups(ec2) == []


@pytest.mark.timeout(60)
def test_an_image_missing_from_the_region_names_the_option(proxy, moto_server):
    with pytest.raises(ProviderError, match="AMI ami-0fffffffffffffff0 does not exist in "
                                            "us-east-1; set the placement's `aws.image`"):
        aws.launch(plan(provider_options=AwsOptions(image="ami-0fffffffffffffff0")))
    ec2 = client(moto_server)
    assert live(ec2) == [] and geotrain_groups(ec2) == []


@pytest.mark.timeout(60)
def test_a_region_without_the_deep_learning_ami_says_which_and_what_to_do(proxy, moto_server):
    """The fix names what a recipe can change (the site's region, a candidate), never an
    option no recipe can set."""
    ec2 = client(moto_server, region="eu-north-1")
    dlamis = ec2.describe_images(Owners=["amazon"], Filters=[
        {"Name": "name", "Values": [aws.DEFAULT_IMAGE_NAME]}])["Images"]
    assert dlamis
    for image in dlamis:
        ec2.deregister_image(ImageId=image["ImageId"])
    with pytest.raises(ProviderError) as e:
        aws.launch(plan(region="eu-north-1", zones=()))
    message = str(e.value)
    assert "region eu-north-1 has no Deep Learning AMI" in message
    assert "`region`" in message and "`candidates`" in message
    assert "option" not in message and "image_name" not in message
    assert live(ec2) == [] and geotrain_groups(ec2) == []
    aws.find_image(client(moto_server))  # another region still has it


def test_check_with_credentials(proxy):
    result = aws.check()
    assert result.ok, result.detail
    assert "123456789012" in result.detail and proxy.url in result.detail
    assert "from env" in result.detail
    assert ACCESS_KEY not in result.detail and SECRET_KEY not in result.detail
    assert proxy.calls("GetCallerIdentity")


def test_check_without_credentials(proxy, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    result = aws.check()
    assert not result.ok and "no AWS credentials" in result.detail and proxy.url in result.detail
    assert proxy.requests == []  # nothing was sent


def test_check_unreachable_endpoint_never_raises(proxy, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    result = aws.check()
    assert not result.ok and dead in result.detail
    assert SECRET_KEY not in result.detail and ACCESS_KEY not in result.detail


def test_import_does_not_load_boto3():
    code = "import sys, providers.aws; assert 'boto3' not in sys.modules and 'botocore' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_capabilities():
    caps = aws.capabilities()
    assert caps.spot and caps.multi_node and caps.preemption_notice and caps.gpus
