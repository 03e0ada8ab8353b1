"""The AWS stand-in judges the operator's calls under infra/aws/geotrain-user-policy.json,
as AWS would (issue 12): tests/fakes/aws_operator.py maps each call to what AWS
authorizes, tests/fakes/iam_eval.py decides, tests/fakes/aws_faults.py `FaultProxy.enforce`
answers a refusal with the service's own error document.

- the evaluator's `Null` operator and calls authorized as several checks;
- through real boto3 clients, calls the policy forbids are refused with AWS's error codes
  (terminating an instance not tagged by geotrain, a role under /geotrain/ without the
  node boundary, a launch without the geotrain tags or into another group, passing a role
  the policy does not name, tagging after creation, another bucket, a call geotrain never
  makes) and the same calls within the policy pass;
- everything geotrain's AWS provider and store do, driven in this process, passes, and
  together they need every action the policy grants: it grants nothing geotrain never uses.

That the CLI and its controller need nothing more is tests/test_cloud_aws.py,
tests/test_aws_run_role.py and tests/test_boot_aws.py, which run under it.

Run: .venv/bin/python -m pytest -q tests/test_aws_operator_policy.py
"""

from __future__ import annotations

import boto3
import pytest
from botocore.exceptions import ClientError

from geotrain.recipe import AwsOptions
from providers import aws
from providers.aws import iam as run_iam
from tests.fakes.aws_operator import user_policy
from tests.fakes.iam_eval import PolicyError, evaluate, evaluate_all
from tests.test_provider_aws import (NEWEST_DLAMI, REGION, client, node_profile, plan,  # noqa: F401 - proxy
                                     proxy)

pytestmark = pytest.mark.timeout(180)
BUCKET = "geotrain-runs"  # the run bucket of the policy here (node_profile's RUN_BUCKET)
ACCOUNT = "123456789012"  # moto's account
BOUNDARY = f"arn:aws:iam::{ACCOUNT}:policy/geotrain-node-boundary"
TAGS = [{"Key": "geotrain-run", "Value": "run-1"}, {"Key": "geotrain-site", "Value": "east"}]


def doc(*statements) -> dict:
    return {"Version": "2012-10-17", "Statement": list(statements)}


# -- the evaluator --------------------------------------------------------------------------

def test_null_tells_a_present_key_from_an_absent_one():
    tagged = doc({"Sid": "Tagged", "Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "*",
                  "Condition": {"Null": {"aws:RequestTag/geotrain-run": "false"}}})
    untagged = doc({"Sid": "Untagged", "Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "*",
                    "Condition": {"Null": {"aws:RequestTag/geotrain-run": "true"}}})
    present, absent = {"aws:RequestTag/geotrain-run": ""}, {"aws:RequestTag/other": "x"}
    assert evaluate([tagged], "ec2:RunInstances", "*", present).allowed  # empty value: still present
    assert not evaluate([tagged], "ec2:RunInstances", "*", absent).allowed
    assert evaluate([untagged], "ec2:RunInstances", "*", absent).allowed
    assert not evaluate([untagged], "ec2:RunInstances", "*", present).allowed
    with pytest.raises(PolicyError, match='expected "true" or "false"'):
        evaluate([doc({"Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "*",
                       "Condition": {"Null": {"aws:RequestTag/x": "no"}}})], "ec2:RunInstances", "*")


def test_one_call_is_allowed_only_when_every_check_is():
    policy = user_policy(BUCKET, ACCOUNT)
    ec2 = f"arn:aws:ec2:{REGION}:{ACCOUNT}"
    tags = {"aws:RequestTag/geotrain-run": "r", "aws:RequestTag/geotrain-site": "s"}
    run = [("ec2:RunInstances", f"{ec2}:instance/*", tags), ("ec2:RunInstances", f"{ec2}:volume/*", tags),
           ("ec2:RunInstances", f"arn:aws:ec2:{REGION}::image/ami-1", {})]
    assert evaluate_all([policy], run).allowed
    bare_volume = run[:1] + [("ec2:RunInstances", f"{ec2}:volume/*", {})] + run[2:]
    decision = evaluate_all([policy], bare_volume)
    assert not decision.allowed and decision.refused[1] == f"{ec2}:volume/*", decision
    assert "volume/*: no statement allows it" in decision.reason
    assert evaluate_all([policy], []).allowed  # sts:GetCallerIdentity: nothing to check


# -- through boto3 --------------------------------------------------------------------------

@pytest.fixture
def operator(proxy, moto_server):  # noqa: F811
    """(ec2, iam, s3, moto's ec2) for the operator: boto3 through the proxy, which enforces
    the user policy; the node profile of infra/aws and a run bucket set up in moto."""
    node_profile(moto_server)
    client(moto_server, "s3").create_bucket(Bucket=BUCKET)
    client(moto_server, "s3").create_bucket(Bucket="another-bucket")
    proxy.enforce(user_policy(BUCKET, ACCOUNT))
    kw = dict(endpoint_url=proxy.url, region_name=REGION)
    return boto3.client("ec2", **kw), boto3.client("iam", **kw), boto3.client("s3", **kw), client(moto_server)


def refused(call, code: str) -> ClientError:
    with pytest.raises(ClientError) as e:
        call()
    err = e.value.response
    assert (err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"]) == (code, 403), err
    return e.value


def _network(moto_ec2, group_tags: list[dict] | None = TAGS) -> tuple[str, str]:
    """(default subnet, a new security group, tagged `group_tags`), made straight in moto."""
    subnet = moto_ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"][0]
    kw = {"TagSpecifications": [{"ResourceType": "security-group", "Tags": group_tags}]} if group_tags else {}
    group = moto_ec2.create_security_group(GroupName=f"g{len(kw)}", Description="d",
                                           VpcId=subnet["VpcId"], **kw)["GroupId"]
    return subnet["SubnetId"], group


def _run(ec2, subnet: str, group: str, tagged=("instance", "volume", "network-interface"), **extra) -> dict:
    return ec2.run_instances(
        ImageId=NEWEST_DLAMI, InstanceType="t3.micro", MinCount=1, MaxCount=1,
        NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": subnet, "Groups": [group]}],
        TagSpecifications=[{"ResourceType": t, "Tags": TAGS} for t in tagged], **extra)["Instances"][0]


def test_a_launch_must_tag_every_resource_it_creates_and_use_a_geotrain_group(proxy, operator):
    ec2, _, _, moto_ec2 = operator
    subnet, group = _network(moto_ec2)
    _, other = _network(moto_ec2, group_tags=None)
    e = refused(lambda: _run(ec2, subnet, group, tagged=()), "UnauthorizedOperation")
    assert str(e).count("You are not authorized to perform this operation") == 1
    assert f"ec2:RunInstances on resource: arn:aws:ec2:{REGION}:{ACCOUNT}:instance/*" in str(e)
    e = refused(lambda: _run(ec2, subnet, group, tagged=("instance",)), "UnauthorizedOperation")
    assert "volume/*" in str(e)  # each resource is judged by its own tags
    e = refused(lambda: _run(ec2, subnet, other), "UnauthorizedOperation")
    assert f"security-group/{other}" in str(e)
    assert moto_ec2.describe_instances()["Reservations"] == []  # none reached moto
    spot_market = {"InstanceMarketOptions": {"MarketType": "spot"}}
    e = refused(lambda: _run(ec2, subnet, group, **spot_market), "UnauthorizedOperation")
    assert "spot-instances-request/*" in str(e)  # a spot request is created, and tagged too
    spot = _run(ec2, subnet, group, tagged=("instance", "volume", "network-interface",
                                            "spot-instances-request"), **spot_market)
    assert {t["Key"] for t in spot["Tags"]} == {"geotrain-run", "geotrain-site"}
    assert [d["call"] for d in proxy.denied()] == ["RunInstances"] * 4


def test_only_the_node_role_and_run_roles_may_be_passed_to_ec2(operator, moto_server):
    ec2, iam, _, moto_ec2 = operator
    subnet, group = _network(moto_ec2)
    moto_iam = client(moto_server, "iam")
    moto_iam.create_role(RoleName="admin", AssumeRolePolicyDocument="{}")
    moto_iam.create_instance_profile(InstanceProfileName="admin")
    moto_iam.add_role_to_instance_profile(InstanceProfileName="admin", RoleName="admin")
    e = refused(lambda: _run(ec2, subnet, group, IamInstanceProfile={"Name": "admin"}),
                "UnauthorizedOperation")
    assert f"iam:PassRole on resource: arn:aws:iam::{ACCOUNT}:role/admin" in str(e)
    assert _run(ec2, subnet, group, IamInstanceProfile={"Name": "geotrain-node"})["InstanceId"]
    # Putting a role in a profile passes it too (AddRoleToInstanceProfile needs PassRole).
    moto_iam.create_instance_profile(InstanceProfileName="geotrain-x", Path="/geotrain/")
    e = refused(lambda: iam.add_role_to_instance_profile(InstanceProfileName="geotrain-x", RoleName="admin"),
                "AccessDenied")
    assert "iam:PassRole" in str(e)


def test_only_geotrain_tagged_instances_and_groups_may_be_ended_and_only_tagged_on_create(operator):
    ec2, _, _, moto_ec2 = operator
    subnet, group = _network(moto_ec2)
    _, other = _network(moto_ec2, group_tags=None)
    theirs = moto_ec2.run_instances(ImageId=NEWEST_DLAMI, MinCount=1, MaxCount=1,
                                    SubnetId=subnet)["Instances"][0]["InstanceId"]
    e = refused(lambda: ec2.terminate_instances(InstanceIds=[theirs]), "UnauthorizedOperation")
    assert f"instance/{theirs}" in str(e)
    refused(lambda: ec2.get_console_output(InstanceId=theirs), "UnauthorizedOperation")
    refused(lambda: ec2.delete_security_group(GroupId=other), "UnauthorizedOperation")
    refused(lambda: ec2.create_tags(Resources=[theirs], Tags=TAGS), "UnauthorizedOperation")  # no adopting
    ours = _run(ec2, subnet, group)["InstanceId"]
    ec2.terminate_instances(InstanceIds=[ours])
    ec2.delete_security_group(GroupId=group)
    # One forbidden instance among allowed ones refuses the whole call.
    refused(lambda: ec2.terminate_instances(InstanceIds=[ours, theirs]), "UnauthorizedOperation")
    # A resource that does not exist gets moto's own answer, as geotrain's cleanup expects.
    with pytest.raises(ClientError, match="InvalidGroup.NotFound"):
        ec2.delete_security_group(GroupId=group)
    [[inst]] = [r["Instances"] for r in moto_ec2.describe_instances(InstanceIds=[theirs])["Reservations"]]
    assert inst["State"]["Name"] == "running"  # not theirs to end


def test_run_roles_only_under_geotrain_and_only_with_the_node_boundary(operator):
    _, iam, _, _ = operator
    trust = '{"Version": "2012-10-17", "Statement": []}'
    e = refused(lambda: iam.create_role(RoleName="geotrain-a", Path="/geotrain/",
                                        AssumeRolePolicyDocument=trust), "AccessDenied")
    assert f"iam:CreateRole on resource: arn:aws:iam::{ACCOUNT}:role/geotrain/geotrain-a" in str(e)
    refused(lambda: iam.create_role(RoleName="geotrain-a", Path="/geotrain/", AssumeRolePolicyDocument=trust,
                                    PermissionsBoundary="arn:aws:iam::aws:policy/AdministratorAccess"),
            "AccessDenied")
    refused(lambda: iam.create_role(RoleName="admin2", AssumeRolePolicyDocument=trust,
                                    PermissionsBoundary=BOUNDARY), "AccessDenied")
    iam.create_role(RoleName="geotrain-a", Path="/geotrain/", AssumeRolePolicyDocument=trust,
                    PermissionsBoundary=BOUNDARY, Tags=TAGS)
    inline = ('{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", '
              f'"Resource": "arn:aws:s3:::{BUCKET}/x"}}]}}')
    iam.put_role_policy(RoleName="geotrain-a", PolicyName="p", PolicyDocument=inline)
    refused(lambda: iam.put_role_policy(RoleName="geotrain-node", PolicyName="p", PolicyDocument=inline),
            "AccessDenied")  # the standing node role is not the operator's to change
    refused(lambda: iam.delete_role(RoleName="geotrain-node"), "AccessDenied")


def test_the_run_bucket_only_unknown_calls_refused_and_who_am_i_always_answered(proxy, operator):
    ec2, _, s3, _ = operator
    s3.put_object(Bucket=BUCKET, Key="runs/x", Body=b"1")
    assert s3.get_object(Bucket=BUCKET, Key="runs/x")["Body"].read() == b"1"
    refused(lambda: s3.put_object(Bucket="another-bucket", Key="x", Body=b"1"), "AccessDenied")
    refused(lambda: s3.list_buckets(), "AccessDenied")
    e = refused(lambda: ec2.stop_instances(InstanceIds=["i-0123456789abcdef0"]), "UnauthorizedOperation")
    assert "ec2:StopInstances is not a call geotrain makes" in str(e)
    refused(lambda: boto3.client("iam", endpoint_url=proxy.url, region_name=REGION).create_user(UserName="u"),
            "AccessDenied")
    sts = boto3.client("sts", endpoint_url=proxy.url, region_name=REGION)
    assert sts.get_caller_identity()["Account"] == ACCOUNT


# -- what geotrain does needs exactly the policy --------------------------------------------

def test_geotrain_needs_every_action_the_policy_grants_and_no_other(proxy, operator, moto_server):
    """The provider's whole life cycle (a spot site as the node role, a run_role site,
    console, terminate, leftovers, removal) and the store's writes, reads, listings and
    deletes, in this process through the enforcing proxy: nothing refused, and every
    action the policy names was needed by some call."""
    from geotrain.store.objects import ObjectStore
    from geotrain.store_check import check_writable

    assert REGION in aws.enabled_regions()
    store = f"s3://{BUCKET}/team/run-1"
    standing = aws.launch(plan(nodes=1, provider_options=AwsOptions(instance_profile="geotrain-node")))
    own_role = AwsOptions(run_role=True)
    roled = aws.launch(plan(site="west", nodes=1, store_url=store, provider_options=own_role))
    again = aws.launch(plan(site="west", nodes=1, store_url=store, provider_options=own_role))  # reuses it
    aws.console(standing[0])
    aws.terminate(standing + roled + again)
    run_iam.ensure_run_role(boto3.client("iam", region_name=REGION), boto3.client("sts", region_name=REGION),
                            "run-2", "east", store, TAGS)  # a launch that died before its nodes
    aws.remove(aws.leftovers("run-2"))
    check_writable(f"s3://{BUCKET}/team")
    # A file system of its own: fsspec caches instances by their arguments, not by the
    # environment that pointed this one at the proxy, and a later test's s3:// store would
    # be handed this one (seen in CI: test_store's s3 tests all refused).
    objects = ObjectStore(store, skip_instance_cache=True)
    objects.put("a.json", b"{}")
    assert objects.get("a.json") == b"{}" and objects.keys() == ["a.json"]
    assert not proxy.denied(), [f"{d['call']}: {d['why']}" for d in proxy.denied()]
    used = {action for j in proxy.enforcer.judged for action, _, _ in j["checks"]}
    granted = {a for st in user_policy(BUCKET, ACCOUNT)["Statement"]
               for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    assert granted - used == set(), "the policy grants what geotrain never uses"
    assert used - granted == set()  # (would have been refused above)
