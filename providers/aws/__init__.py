"""The AWS provider: a site is N EC2 instances in one availability zone.

`launch` puts every node of a site in one zone of the plan's region (the
default VPC's default subnet for that zone, or the recipe's `aws.subnets`), tries
`plan.zones` in order and moves to the next zone when EC2 says it has no room
(the codes in CAPACITY_CODES), and raises CapacityError naming every zone it
tried when none had room. Each site gets its own security group,
`geotrain-<run>-<site>`, whose only ingress rule admits all traffic from that
same group: Ray is reachable from the site's own nodes and from nothing else
(no 0.0.0.0/0, no SSH). Egress stays open (nodes reach the run store and pip).

Every instance, its volumes, its network interface and the security group
carry the tags `geotrain-run`, `geotrain-site`, `geotrain-owner` (the
operator's owner id, when the plan has one) (and `geotrain-node` on
instance-level resources); `query` and `terminate` find resources by those
tags, never by memory. Instances require IMDSv2 (the preemption watcher reads
the spot `instance-action` notice through it). Each node boots the script from
`geotrain.bootstrap.render` as its user data; the site's Ray token exists only
there.

The recipe's typed options (`SitePlan.provider_options`, providers/aws/options.py
`AwsOptions`): `instance_profile` (name or ARN; the nodes' only credentials, for
the run store; see infra/aws/README.md) or `run_role` (launch makes the site a role
for its run's store folder only, deleted with its last node: providers/aws/iam.py), `subnets` (tried in `zones` order, one
per zone; providers/aws/network.py), `image` (AMI id; skips the lookup below), `disk_gb` (the root
volume, gp3), `public_ip` (off: the node's one network interface gets no public
address; the subnet's NAT gives it outbound access). Internal plan options:
`image_name` / `image_owner` for the lookup (default DEFAULT_IMAGE_NAME, amazon).

The image lookup is the documented one for the AWS Deep Learning AMIs:
`DescribeImages` with owner amazon and a name filter, newest CreationDate wins.

Credentials, region and endpoint come from boto3's normal chain (environment,
shared files, SSO, instance role). Tests point boto3 at a local moto server
with `AWS_ENDPOINT_URL`, which botocore honours for every service; `check()`
shows the endpoint when it is set. boto3 is imported only inside functions,
so `import providers.aws` works without it.

See providers/__init__.py for the contract.
"""

from __future__ import annotations

import os
import secrets
from concurrent.futures import ThreadPoolExecutor

from geotrain import bootstrap
from geotrain.errors import CapacityError, ProviderError
from providers.aws import iam
from providers.aws.network import delete_group, ensure_group, group_name, subnets  # noqa: F401 - group_name: the contract tests use it
from providers.aws.options import AwsOptions
from providers import Capabilities, CredentialCheck, Leftover, Node, SitePlan

TAG_RUN, TAG_SITE, TAG_NODE = "geotrain-run", "geotrain-site", "geotrain-node"
TAG_OWNER = "geotrain-owner"  # the launching GEOTRAIN_HOME's owner id (down --orphans)
# EC2 error codes that mean "no room here": the controller fails over on them.
CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity", "InstanceLimitExceeded", "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow", "Unsupported", "InsufficientCapacity", "VcpuLimitExceeded"})
DEFAULT_IMAGE_NAME = "Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Ubuntu 22.04) *"
DEFAULT_INSTANCE_TYPE = "g5.xlarge"  # one NVIDIA A10G
LIVE_STATES = ("pending", "running", "shutting-down", "stopping", "stopped")
WAIT_DELAY_S = 5.0        # terminate waiter poll interval (tests lower it)
WAIT_MAX_ATTEMPTS = 120


def capabilities() -> Capabilities:
    return Capabilities(spot=True, multi_node=True, preemption_notice=True, gpus=True, console=True,
                        run_resources=True)


# ---------------------------------------------------------------- clients

def _session():
    import boto3
    return boto3.session.Session()


def _client(service: str, region: str | None, session=None, attempts: int = 5):
    """A boto3 client; `attempts=1` for RunInstances, whose capacity errors
    (HTTP 5xx) botocore would otherwise retry in the same zone."""
    from botocore.config import Config
    cfg = Config(retries={"mode": "standard", "total_max_attempts": attempts},
                 connect_timeout=10, read_timeout=60)
    return (session or _session()).client(service, region_name=region, config=cfg)


def _error(e: Exception) -> tuple[str, str]:
    """(code, message) of a botocore ClientError."""
    err = getattr(e, "response", {}).get("Error", {})
    return err.get("Code", type(e).__name__), err.get("Message", str(e))


def _tags(plan: SitePlan, node: int | None = None) -> list[dict]:
    tags = [{"Key": TAG_RUN, "Value": plan.run_id}, {"Key": TAG_SITE, "Value": plan.site}]
    if plan.owner:
        tags.append({"Key": TAG_OWNER, "Value": plan.owner})
    if node is not None:
        tags += [{"Key": TAG_NODE, "Value": str(node)},
                 {"Key": "Name", "Value": f"geotrain-{plan.run_id}-{plan.site}-{node}"}]
    return tags


# ---------------------------------------------------------------- check

def check() -> CredentialCheck:
    try:
        import boto3  # noqa: F401
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return CredentialCheck("aws", False, "boto3 is not installed (pip install boto3)")
    var = next((v for v in ("AWS_ENDPOINT_URL_EC2", "AWS_ENDPOINT_URL") if os.environ.get(v)), None)
    where = f"endpoint {os.environ[var]} ({var})" if var else "endpoint AWS"
    creds = None
    try:
        session = _session()
        creds = session.get_credentials()
        if creds is None:
            return CredentialCheck("aws", False, (
                "no AWS credentials found: set AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                f"~/.aws/credentials, SSO or an instance role ({where})"))
        region = session.region_name
        ident = _client("sts", region or "us-east-1", session, attempts=2).get_caller_identity()
        region_text = region or "not set (each site names its own)"
        detail = (f"account {ident['Account']} ({ident['Arn']}), region {region_text}, "
                  f"credentials from {creds.method}, {where}")
        return CredentialCheck("aws", True, _scrub(detail, creds))
    except ClientError as e:
        code, message = _error(e)
        return CredentialCheck("aws", False, _scrub(f"sts:GetCallerIdentity refused: {code}: {message} ({where})", creds))
    except (BotoCoreError, OSError, ValueError) as e:
        return CredentialCheck("aws", False, _scrub(f"cannot use AWS: {e} ({where})", creds))
    except Exception as e:  # noqa: BLE001 - check() never raises
        return CredentialCheck("aws", False, _scrub(f"AWS check failed: {type(e).__name__}: {e} ({where})", creds))


def _scrub(text: str, creds) -> str:
    """Belt and braces: no key material in anything check() returns."""
    if creds is not None:
        for secret in (creds.access_key, creds.secret_key, creds.token):
            if secret and len(secret) >= 8:  # real keys are 20+ characters
                text = text.replace(secret, "***")
    return text


# ---------------------------------------------------------------- launch

def find_image(ec2, name_pattern: str = DEFAULT_IMAGE_NAME, owner: str = "amazon") -> str:
    """The newest available x86_64 AMI named like `name_pattern` owned by `owner`."""
    images = ec2.describe_images(Owners=[owner], Filters=[
        {"Name": "name", "Values": [name_pattern]},
        {"Name": "state", "Values": ["available"]},
        {"Name": "architecture", "Values": ["x86_64"]}])["Images"]
    if not images:
        region = ec2.meta.region_name
        what = ("no Deep Learning AMI for PyTorch (Ubuntu 22.04, x86_64)" if name_pattern == DEFAULT_IMAGE_NAME
                else "no AMI")
        raise ProviderError(
            f"region {region} has {what} named like {name_pattern!r} owned by {owner!r}; choose another "
            "`region` for this site, or add a `candidates` entry in a region that has one")
    return max(images, key=lambda i: i.get("CreationDate", ""))["ImageId"]


def _options(plan: SitePlan) -> AwsOptions:
    return plan.provider_options or AwsOptions()


def _subnets(ec2, plan: SitePlan) -> list[tuple[str, str, str]]:
    return subnets(ec2, plan, _options(plan).subnets)


def open_ports(plan: SitePlan) -> None:
    """Create the site's security group (intra-site traffic only) if missing."""
    ec2 = _client("ec2", _region(plan))
    ensure_group(ec2, plan, _subnets(ec2, plan)[0][2], _tags(plan))


def _region(plan: SitePlan) -> str:
    region = plan.region or _session().region_name
    if not region:
        raise ProviderError(f"site {plan.site}: no AWS region (set `region` in the recipe or AWS_DEFAULT_REGION)")
    return region


def _root_device(ec2, plan: SitePlan, image: str) -> str:
    """The image's root device name (where `disk_gb` applies)."""
    from botocore.exceptions import ClientError
    try:
        images = ec2.describe_images(ImageIds=[image])["Images"]
    except ClientError as e:
        if not _error(e)[0].startswith("InvalidAMIID"):
            raise
        images = []
    if not images:
        raise ProviderError(f"site {plan.site}: AMI {image} does not exist in "
                            f"{ec2.meta.region_name}; set the placement's `aws.image` to an AMI "
                            "of that region, or leave it out for the Deep Learning AMI")
    return images[0].get("RootDeviceName") or "/dev/sda1"


def _run_args(plan: SitePlan, node: int, image: str, root: str, subnet: str, group: str,
              token: str, profile: str | None = None) -> dict:
    opts, tags = _options(plan), _tags(plan, node)
    profile = profile or opts.instance_profile
    args = dict(
        ImageId=image, InstanceType=plan.instance_type or DEFAULT_INSTANCE_TYPE,
        MinCount=1, MaxCount=1,
        # The subnet and group go on the interface: EC2 refuses them beside NetworkInterfaces.
        NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": subnet, "Groups": [group],
                            "AssociatePublicIpAddress": opts.public_ip,
                            "DeleteOnTermination": True}],
        BlockDeviceMappings=[{"DeviceName": root, "Ebs": {
            "VolumeSize": opts.disk_gb, "VolumeType": "gp3", "DeleteOnTermination": True}}],
        UserData=bootstrap.render(plan, node, token),
        MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled"},
        InstanceInitiatedShutdownBehavior="terminate",
        # Every resource the call creates carries the run's tags (a spot launch also
        # creates its spot request): the operator policy refuses an untagged one.
        TagSpecifications=[{"ResourceType": t, "Tags": tags} for t in (
            "instance", "volume", "network-interface") + (("spot-instances-request",) if plan.spot else ())])
    if plan.spot:
        args["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
            "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
    if profile:
        key = "Arn" if profile.startswith("arn:") else "Name"
        args["IamInstanceProfile"] = {key: profile}
    return args


def launch(plan: SitePlan) -> list[Node]:
    from botocore.exceptions import BotoCoreError, ClientError
    if plan.nodes < 1:
        raise ProviderError(f"site {plan.site}: nodes must be at least 1, got {plan.nodes}")
    region = _region(plan)
    session = _session()
    ec2 = _client("ec2", region, session)
    run = _client("ec2", region, session, attempts=1)
    group, created, launched, tried, role_made = None, False, [], [], False
    try:
        image = _options(plan).image or find_image(
            ec2, plan.option("image_name") or DEFAULT_IMAGE_NAME, plan.option("image_owner") or "amazon")
        root = _root_device(ec2, plan, image)
        candidates = _subnets(ec2, plan)
        tried += [f"aws:{region}/{z} (no subnet)" for z in plan.zones
                  if z not in {c[0] for c in candidates}]
        group, created = ensure_group(ec2, plan, candidates[0][2], _tags(plan))
        profile = None
        if _options(plan).run_role:
            role_made = True
            profile = iam.ensure_run_role(_client("iam", region, session), _client("sts", region, session),
                                          plan.run_id, plan.site, plan.store_url, _tags(plan))
        token = secrets.token_hex(32)  # only ever in the nodes' user data
        for zone, subnet, _ in candidates:
            try:
                for i in range(plan.nodes):
                    args = _run_args(plan, i, image, root, subnet, group, token, profile)
                    launched += iam.run_with_new_profile(
                        lambda: run.run_instances(**args), wait_s=iam.PROFILE_WAIT_S if profile else 0
                    )["Instances"]
            except ClientError as e:
                code, _ = _error(e)
                if code not in CAPACITY_CODES:
                    raise
                tried.append(f"aws:{region}/{zone} ({code})")
                _terminate_ids(ec2, [i["InstanceId"] for i in launched])
                launched = []
                continue
            return [_node(i, region) for i in launched]
        raise CapacityError(f"site {plan.site}: no AWS zone had room for {plan.nodes} x "
                            f"{plan.instance_type or DEFAULT_INSTANCE_TYPE}", tried)
    except BaseException as e:
        _cleanup(ec2, [i["InstanceId"] for i in launched], group if created else None)
        if role_made:
            try:
                _delete_role_if_unused(ec2, plan.run_id, plan.site, region)
            except Exception:  # noqa: BLE001 - never mask the launch error
                pass
        if isinstance(e, ClientError):
            code, message = _error(e)
            raise ProviderError(f"site {plan.site}: AWS refused a request in {region}: {code}: {message}") from e
        if isinstance(e, BotoCoreError):
            raise ProviderError(f"site {plan.site}: cannot reach AWS in {region}: {e}") from e
        raise


def _cleanup(ec2, instance_ids: list[str], group: str | None) -> None:
    """Best effort after a failed launch: the original error is what the caller sees."""
    try:
        _terminate_ids(ec2, instance_ids)
        if group:
            delete_group(ec2, group, WAIT_DELAY_S)
    except Exception:  # noqa: BLE001 - never mask the launch error
        pass


# ---------------------------------------------------------------- query / terminate

def _node(inst: dict, region: str) -> Node:
    tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
    return Node(tags.get(TAG_RUN, ""), tags.get(TAG_SITE, ""), "aws", inst["InstanceId"],
                inst["State"]["Name"], private_ip=inst.get("PrivateIpAddress"), region=region,
                owner=tags.get(TAG_OWNER))


def enabled_regions() -> list[str]:
    """Every region enabled for this account."""
    session = _session()
    ec2 = _client("ec2", session.region_name or "us-east-1", session)
    return sorted(r["RegionName"] for r in ec2.describe_regions()["Regions"])


def _query_region(region: str, filters: list[dict]) -> list[Node]:
    pages = _client("ec2", region).get_paginator("describe_instances").paginate(Filters=filters)
    return [_node(i, region) for page in pages for r in page["Reservations"] for i in r["Instances"]]


def query(run_id: str, site: str | None = None, regions: list[str] | None = None) -> list[Node]:
    """Live instances tagged for the run (and site), in `regions` or every
    enabled region (searched in parallel)."""
    filters = [{"Name": f"tag:{TAG_RUN}", "Values": [run_id]},
               {"Name": "instance-state-name", "Values": list(LIVE_STATES)}]
    if site is not None:
        filters.append({"Name": f"tag:{TAG_SITE}", "Values": [site]})
    where = regions or enabled_regions()
    with ThreadPoolExecutor(max_workers=min(16, len(where))) as pool:
        found = pool.map(lambda r: _query_region(r, filters), where)
    return sorted((n for nodes in found for n in nodes), key=lambda n: (n.region, n.site, n.instance_id))


def query_all() -> list[Node]:
    """Every live instance carrying a `geotrain-run` tag, of any run, in every
    enabled region (for `geotrain down --orphans`)."""
    filters = [{"Name": "tag-key", "Values": [TAG_RUN]},
               {"Name": "instance-state-name", "Values": list(LIVE_STATES)}]
    where = enabled_regions()
    with ThreadPoolExecutor(max_workers=min(16, len(where))) as pool:
        found = pool.map(lambda r: _query_region(r, filters), where)
    return sorted((n for nodes in found for n in nodes if n.run_id),
                  key=lambda n: (n.run_id, n.region, n.site, n.instance_id))


def _terminate_ids(ec2, ids: list[str]) -> None:
    """Terminate the instances that still exist and wait until they are gone."""
    if not ids:
        return
    found = ec2.describe_instances(Filters=[{"Name": "instance-id", "Values": ids}])
    live = [i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]
            if i["State"]["Name"] != "terminated"]
    if not live:
        return
    ec2.terminate_instances(InstanceIds=live)
    ec2.get_waiter("instance_terminated").wait(
        InstanceIds=live, WaiterConfig={"Delay": WAIT_DELAY_S, "MaxAttempts": WAIT_MAX_ATTEMPTS})


def _run_roles(ec2, ids: list[str]) -> set[tuple[str, str]]:
    """The (run, site) pairs among these instances that run as their site's own run role
    (aws.run_role): only those have a role for `terminate` to delete."""
    if not ids:
        return set()
    found = ec2.describe_instances(Filters=[{"Name": "instance-id", "Values": ids}])["Reservations"]
    out = set()
    for inst in (i for r in found for i in r["Instances"]):
        tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
        run_id, site = tags.get(TAG_RUN, ""), tags.get(TAG_SITE, "")
        arn = (inst.get("IamInstanceProfile") or {}).get("Arn", "")
        if run_id and arn.endswith(f":instance-profile{iam.PATH}{iam.role_name(run_id, site)}"):
            out.add((run_id, site))
    return out


def _delete_role_if_unused(ec2, run_id: str, site: str, region: str) -> None:
    """Delete the site's run role (aws.run_role; nothing when it has none) once no
    instance of the site is left in `region`."""
    live = ec2.describe_instances(Filters=[
        {"Name": f"tag:{TAG_RUN}", "Values": [run_id]}, {"Name": f"tag:{TAG_SITE}", "Values": [site]},
        {"Name": "instance-state-name", "Values": list(LIVE_STATES)}])["Reservations"]
    if not any(r["Instances"] for r in live):
        iam.delete_run_role(_client("iam", region), run_id, site)


def terminate(nodes: list[Node]) -> list[Node]:
    """Terminate the nodes, wait until EC2 says terminated, then delete each
    of their sites' security groups (found by tag)."""
    from botocore.exceptions import BotoCoreError, ClientError
    by_region: dict[str, list[Node]] = {}
    for n in nodes:
        by_region.setdefault(n.region or _session().region_name or "us-east-1", []).append(n)
    try:
        for region, group in by_region.items():
            ec2 = _client("ec2", region)
            roles = _run_roles(ec2, [n.instance_id for n in group])
            _terminate_ids(ec2, [n.instance_id for n in group])
            for run_id, site in sorted({(n.run_id, n.site) for n in group}):
                sgs = ec2.describe_security_groups(Filters=[
                    {"Name": f"tag:{TAG_RUN}", "Values": [run_id]},
                    {"Name": f"tag:{TAG_SITE}", "Values": [site]}])["SecurityGroups"]
                for sg in sgs:
                    delete_group(ec2, sg["GroupId"], WAIT_DELAY_S)
                if (run_id, site) in roles:
                    _delete_role_if_unused(ec2, run_id, site, region)
    except (ClientError, BotoCoreError) as e:
        code, message = _error(e)
        raise ProviderError(f"could not terminate AWS nodes: {code}: {message}") from e
    return [Node(n.run_id, n.site, n.provider, n.instance_id, "terminated", n.private_ip, n.pid,
                 n.region) for n in nodes]


def _iam_client():
    """IAM is global: its client in the session's region, or us-east-1."""
    return _client("iam", _session().region_name or "us-east-1")


def leftovers(run_id: str | None = None) -> list[Leftover]:
    """The run roles (aws.run_role) of `run_id`, or of every run, still in IAM."""
    from botocore.exceptions import BotoCoreError, ClientError
    try:
        found = iam.run_roles(_iam_client())
    except (ClientError, BotoCoreError) as e:
        code, message = _error(e)
        raise ProviderError(f"could not list geotrain's run roles in IAM: {code}: {message}") from e
    return [Leftover("aws", r["run"], r["site"], "iam-role", r["name"], r.get("owner"))
            for r in found if run_id is None or r["run"] == run_id]


def remove(leftovers: list[Leftover]) -> list[Leftover]:
    """Delete these run roles and their instance profiles."""
    from botocore.exceptions import BotoCoreError, ClientError
    client, gone = _iam_client(), []
    try:
        for leftover in leftovers:
            iam.delete_run_role(client, leftover.run_id, leftover.site)
            gone.append(leftover)
    except (ClientError, BotoCoreError) as e:
        code, message = _error(e)
        raise ProviderError(f"could not delete a geotrain run role: {code}: {message}") from e
    return gone


def console(node: Node) -> str:
    """The tail of the node's serial console (EC2 GetConsoleOutput, latest): where a
    node that cannot reach the run store says why (geotrain/site/node_info.py)."""
    import base64
    import binascii

    out = _client("ec2", node.region, attempts=2).get_console_output(
        InstanceId=node.instance_id, Latest=True).get("Output") or ""
    try:  # EC2 sends it base64-encoded
        return base64.b64decode(out, validate=True).decode("utf-8", errors="replace")
    except (binascii.Error, ValueError):
        return out
