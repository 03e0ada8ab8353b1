"""A site's network on AWS: the subnets its nodes may go in (one per zone, tried in
order) and its security group, `geotrain-<run>-<site>`, whose one ingress rule admits
traffic from that same group only (Ray reachable from the site's own nodes, nothing
else). Used by providers/aws/__init__.py; `ec2` is a boto3 EC2 client of the region."""

from __future__ import annotations

import time

from geotrain.errors import ProviderError
from providers import SitePlan

GROUP_DELETE_TIMEOUT_S = 120.0  # how long a just-terminated instance may hold its group


def _code(e: Exception) -> str:
    return getattr(e, "response", {}).get("Error", {}).get("Code", type(e).__name__)


def group_name(run_id: str, site: str) -> str:
    return f"geotrain-{run_id}-{site}"


def subnets(ec2, plan: SitePlan, wanted: list[str]) -> list[tuple[str, str, str]]:
    """(zone, subnet id, vpc id) candidates in the order to try them: the recipe's
    `aws.subnets` (`wanted`), or the default VPC's default subnet of each zone."""
    if wanted:
        found = {s["SubnetId"]: s for s in ec2.describe_subnets(SubnetIds=wanted)["Subnets"]}
        listed = [found[i] for i in wanted if i in found]  # in the recipe's order
    else:
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            region = ec2.meta.region_name
            raise ProviderError(f"site {plan.site}: region {region} has no default VPC; create one "
                                f"(`aws ec2 create-default-vpc --region {region}`), set the "
                                "site's `aws.subnets`, or choose another `region` for this site")
        listed = sorted(ec2.describe_subnets(Filters=[
            {"Name": "vpc-id", "Values": [vpcs[0]["VpcId"]]},
            {"Name": "default-for-az", "Values": ["true"]}])["Subnets"],
            key=lambda s: (s["AvailabilityZone"], s["SubnetId"]))
    by_zone = {}
    for s in listed:
        by_zone.setdefault(s["AvailabilityZone"], (s["AvailabilityZone"], s["SubnetId"], s["VpcId"]))
    if len({v for _, _, v in by_zone.values()}) > 1:
        raise ProviderError(f"site {plan.site}: aws.subnets {', '.join(wanted)} are in "
                            "different VPCs; a site's nodes share one VPC")
    if not plan.zones:
        return list(by_zone.values())
    missing = [z for z in plan.zones if z not in by_zone]
    if len(missing) == len(plan.zones):
        raise ProviderError(f"no subnet in zone(s) {', '.join(missing)} of {plan.region}; "
                            f"valid: {', '.join(by_zone) or 'none'}")
    return [by_zone[z] for z in plan.zones if z in by_zone]


def ensure_group(ec2, plan: SitePlan, vpc_id: str, tags: list[dict]) -> tuple[str, bool]:
    """(group id, created now) of the site's security group, with its one rule."""
    from botocore.exceptions import ClientError
    name = group_name(plan.run_id, plan.site)
    try:
        gid = ec2.create_security_group(
            GroupName=name, VpcId=vpc_id,
            Description=f"geotrain site {plan.site} of run {plan.run_id}: intra-site traffic only",
            TagSpecifications=[{"ResourceType": "security-group", "Tags": tags}])["GroupId"]
        created = True
    except ClientError as e:
        if _code(e) != "InvalidGroup.Duplicate":
            raise
        gid = ec2.describe_security_groups(Filters=[
            {"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc_id]}],
        )["SecurityGroups"][0]["GroupId"]
        created = False
    try:
        ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[
            {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": gid}]}])
    except ClientError as e:
        if _code(e) != "InvalidPermission.Duplicate":
            raise
    return gid, created


def delete_group(ec2, group_id: str, every_s: float) -> None:
    """Delete a security group; a just-terminated instance's network interface
    can hold it for a little while (DependencyViolation), so retry briefly."""
    from botocore.exceptions import ClientError
    deadline = time.monotonic() + GROUP_DELETE_TIMEOUT_S
    while True:
        try:
            ec2.delete_security_group(GroupId=group_id)
            return
        except ClientError as e:
            code = _code(e)
            if code == "InvalidGroup.NotFound":
                return
            if code != "DependencyViolation" or time.monotonic() > deadline:
                raise
        time.sleep(min(every_s, 5.0))
