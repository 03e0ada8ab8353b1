"""The stand-in clouds enforce the node policies of infra/ (issue 12): a node may touch
only its run store's prefix, and on AWS never delete.

- the IAM evaluator (tests/fakes/iam_eval.py) and the S3 request -> action mapping
  (tests/fakes/s3_actions.py), alone;
- the GCS condition parser (tests/fakes/gcs_iam.py), alone;
- through the S3 stand-in (moto behind `S3IdentityProxy`) with a role carrying
  infra/aws/geotrain-node-policy.json, and through the GCS stand-in (the emulator behind
  `GcsIdentityProxy`) with infra/gcp/run-bucket-policy.json: in the prefix yes, in another
  run's prefix of the same bucket no, delete no (AWS).

That nodes need nothing more is tests/test_boot_aws.py and tests/test_boot_gcp.py: their
runs succeed with these policies enforced and no request refused.

Run: .venv/bin/python -m pytest -q tests/test_store_policies.py
"""

from __future__ import annotations

import json
import uuid

import boto3
import pytest
from botocore.exceptions import ClientError

import geotrain.store.objects  # noqa: F401 - before gcsfs: no HNS probe against the emulator
from tests.fakes.aws_identity import S3IdentityProxy, grant_store, node_policy
from tests.fakes.gcs_iam import ConditionError, bindings_from, condition, infra_policy
from tests.fakes.iam_eval import PolicyError, evaluate
from tests.fakes.s3_actions import UnknownRequest, s3_checks

pytestmark = pytest.mark.timeout(120)
ACCOUNT = "geotrain-node@my-project.iam.gserviceaccount.com"  # the document's node account
READ_WRITE = "https://www.googleapis.com/auth/devstorage.read_write"

ALLOW_GET = {"Version": "2012-10-17", "Statement": [
    {"Sid": "Get", "Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/exp1/*"}]}


def doc(*statements) -> dict:
    return {"Version": "2012-10-17", "Statement": list(statements)}


# -- the evaluator --------------------------------------------------------------------------

def test_allow_and_default_deny():
    assert evaluate([ALLOW_GET], "s3:GetObject", "arn:aws:s3:::b/exp1/x").allowed
    d = evaluate([ALLOW_GET], "s3:PutObject", "arn:aws:s3:::b/exp1/x")
    assert not d.allowed and d.reason == "no statement allows it"
    assert not evaluate([ALLOW_GET], "s3:GetObject", "arn:aws:s3:::b/exp2/x").allowed
    assert not evaluate([], "s3:GetObject", "arn:aws:s3:::b/exp1/x").allowed


def test_an_explicit_deny_wins_over_any_allow():
    deny = doc({"Sid": "NoSecrets", "Effect": "Deny", "Action": "s3:*",
                "Resource": "arn:aws:s3:::b/exp1/secret*"})
    d = evaluate([ALLOW_GET, deny], "s3:GetObject", "arn:aws:s3:::b/exp1/secret.txt")
    assert not d.allowed and "explicitly denied by NoSecrets" in d.reason
    assert evaluate([ALLOW_GET, deny], "s3:GetObject", "arn:aws:s3:::b/exp1/public.txt").allowed


def test_wildcards_in_actions_and_resources():
    p = doc({"Effect": "Allow", "Action": ["s3:Get*", "s3:?utObject"], "Resource": "arn:aws:s3:::b/*/data-?"})
    assert evaluate([p], "s3:GetObject", "arn:aws:s3:::b/a/b/data-1").allowed  # * crosses "/"
    assert evaluate([p], "S3:getobject", "arn:aws:s3:::b/a/data-2").allowed  # actions ignore case
    assert evaluate([p], "s3:PutObject", "arn:aws:s3:::b/a/data-3").allowed
    assert not evaluate([p], "s3:GetObject", "arn:aws:s3:::b/a/data-10").allowed  # ? is one char
    assert not evaluate([p], "s3:GetObject", "arn:aws:s3:::B/a/data-1").allowed  # ARNs keep case
    assert not evaluate([p], "s3:DeleteObject", "arn:aws:s3:::b/a/data-1").allowed


def test_the_s3_prefix_condition_of_the_node_policy():
    policy = json.loads(node_policy("s3://b/exp1"))
    bucket = "arn:aws:s3:::b"
    for prefix in ("exp1", "exp1/", "exp1/run-1/rounds/"):
        assert evaluate([policy], "s3:ListBucket", bucket, {"s3:prefix": prefix}).allowed, prefix
    for prefix in ("exp2/", "exp10/", "", "exp"):
        assert not evaluate([policy], "s3:ListBucket", bucket, {"s3:prefix": prefix}).allowed, prefix
    assert not evaluate([policy], "s3:ListBucket", bucket, {}).allowed  # no prefix: the whole bucket
    equals = doc({"Effect": "Allow", "Action": "s3:ListBucket", "Resource": bucket,
                  "Condition": {"StringEquals": {"s3:prefix": "exp1/*"}}})
    assert evaluate([equals], "s3:ListBucket", bucket, {"s3:prefix": "exp1/*"}).allowed
    assert not evaluate([equals], "s3:ListBucket", bucket, {"s3:prefix": "exp1/x"}).allowed


@pytest.mark.parametrize("statement, says", [
    ({"Effect": "Allow", "NotAction": "s3:DeleteObject", "Resource": "*"}, "unsupported keys"),
    ({"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*",
      "Condition": {"StringLikeIfExists": {"s3:prefix": "x"}}}, "operator 'StringLikeIfExists'"),
    ({"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*",
      "Condition": {"ForAnyValue:StringLike": {"s3:prefix": "x"}}}, "is not supported"),
    ({"Effect": "allow", "Action": "s3:GetObject", "Resource": "*"}, "Effect must be"),
    ({"Effect": "Allow", "Action": "GetObject", "Resource": "*"}, "not service:Action"),
    ({"Effect": "Allow", "Action": "s3:GetObject", "Resource": "b/exp1/*"}, "not an ARN"),
    ({"Effect": "Allow", "Action": "s3:GetObject"}, "Resource is required"),
    ({"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/${aws:username}/*"},
     "policy variables"),
])
def test_grammar_the_evaluator_does_not_know_raises(statement, says):
    with pytest.raises(PolicyError, match=says.replace("(", r"\(").replace("$", r"\$")):
        evaluate([ALLOW_GET, doc(statement)], "s3:GetObject", "arn:aws:s3:::b/exp1/x")
    with pytest.raises(PolicyError, match="Version"):
        evaluate([{"Statement": [ALLOW_GET["Statement"][0]]}], "s3:GetObject", "arn:aws:s3:::b/x")


def test_s3_requests_map_to_the_actions_aws_checks():
    h: dict = {}
    assert s3_checks("GET", "/b/exp1/a%20b", "x-id=GetObject", h) == [
        ("s3:GetObject", "arn:aws:s3:::b/exp1/a b", {})]
    assert s3_checks("HEAD", "/b/exp1/k", "", h)[0][0] == "s3:GetObject"
    assert s3_checks("PUT", "/b/exp1/k", "", h) == [("s3:PutObject", "arn:aws:s3:::b/exp1/k", {})]
    assert s3_checks("DELETE", "/b/exp1/k", "", h) == [("s3:DeleteObject", "arn:aws:s3:::b/exp1/k", {})]
    assert s3_checks("GET", "/b", "list-type=2&prefix=exp1%2F&delimiter=%2F", h) == [
        ("s3:ListBucket", "arn:aws:s3:::b", {"s3:prefix": "exp1/", "s3:delimiter": "/"})]
    for method, query in (("POST", "uploads"), ("PUT", "partNumber=1&uploadId=u"), ("POST", "uploadId=u")):
        assert s3_checks(method, "/b/exp1/k", query, h)[0][0] == "s3:PutObject", (method, query)
    copy = s3_checks("PUT", "/b/exp1/k", "", {"x-amz-copy-source": "b/exp2/src"})
    assert ("s3:GetObject", "arn:aws:s3:::b/exp2/src", {}) in copy
    body = b"<Delete><Object><Key>exp1/a</Key></Object><Object><Key>exp1/b&amp;c</Key></Object></Delete>"
    assert [r for _, r, _ in s3_checks("POST", "/b", "delete", h, body)] == [
        "arn:aws:s3:::b/exp1/a", "arn:aws:s3:::b/exp1/b&c"]
    for method, path, query in (("GET", "/b/k", "acl"), ("PUT", "/b", "policy"), ("POST", "/", "")):
        with pytest.raises(UnknownRequest):
            s3_checks(method, path, query, h)


# -- GCS conditions -------------------------------------------------------------------------

def test_gcs_name_conditions_and_what_they_refuse():
    obj = "projects/_/buckets/b/objects/"
    c = condition(f'resource.name.startsWith("{obj}exp1/") || resource.name.startsWith(\'{obj}shared/\')')
    assert c(obj + "exp1/x") and c(obj + "shared/y") and not c(obj + "exp2/x") and not c(obj + "exp1")
    both = condition(f'(resource.name.startsWith("{obj}") && resource.name.startsWith("{obj}a/")) '
                     f'|| resource.name.startsWith("{obj}z")')
    assert both(obj + "a/1") and both(obj + "z9") and not both(obj + "b/1")
    ends = condition(f'resource.name.startsWith("{obj}") && resource.name.endsWith("/a.bin")')
    assert ends(obj + "r/1/a.bin") and not ends(obj + "r/1/ba.bin") and not ends("elsewhere/a.bin")
    thirteen = " || ".join(f'resource.name.startsWith("{obj}{i}/")' for i in range(14))
    for bad in (thirteen, 'resource.name.contains("x")', 'resource.name == "x"', 'resource.name.startsWith("x") ||',
                '(resource.name.startsWith("x")', 'request.time < timestamp("2030-01-01T00:00:00Z")', ""):
        with pytest.raises(ConditionError):
            condition(bad)
    document, roles = infra_policy("b", "exp1")
    [operator, node, lister] = bindings_from(document, roles)
    assert node.holds(obj + "exp1/run/x") and not node.holds(obj + "exp2/run/x")
    assert not node.holds("projects/_/buckets/b")  # a list request's resource: the bucket
    assert lister.permissions == {"storage.objects.list"} and lister.holds is None
    with pytest.raises(ConditionError, match="unknown to the stand-in"):
        bindings_from(document)  # the custom role's permissions are not given


# -- through the S3 stand-in ----------------------------------------------------------------

@pytest.fixture
def s3_store(moto_server):
    """(node client, bucket, proxy): a role with the node policy for s3://bucket/exp1,
    its key allowed at the proxy bound to that role; other runs' objects exist."""
    kw = dict(endpoint_url=moto_server, region_name="us-east-1", aws_access_key_id="x",
              aws_secret_access_key="x")
    bucket, role = f"policies-{uuid.uuid4().hex[:8]}", f"node-{uuid.uuid4().hex[:8]}"
    admin = boto3.client("s3", **kw)
    admin.create_bucket(Bucket=bucket)
    admin.put_object(Bucket=bucket, Key="exp2/run-9/model.pt", Body=b"another run")
    iam = boto3.client("iam", **kw)
    iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(doc(
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"})))
    grant_store(iam, role, f"s3://{bucket}/exp1")
    proxy = S3IdentityProxy(moto_server)
    key = "ASIA" + uuid.uuid4().hex[:16].upper()
    proxy.allow(key, role=role)
    node = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1",
                        aws_access_key_id=key, aws_secret_access_key="s", aws_session_token="t")
    try:
        yield node, bucket, proxy, iam, role
    finally:
        proxy.close()


def denied(call) -> str:
    with pytest.raises(ClientError) as e:
        call()
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert e.value.response["Error"]["Code"] == "AccessDenied"
    return e.value.response["Error"].get("Message", "")


def test_a_node_role_works_under_its_prefix_only_and_never_deletes(s3_store):
    node, bucket, proxy, _, role = s3_store
    node.put_object(Bucket=bucket, Key="exp1/run-1/alive", Body=b"1")
    node.put_object(Bucket=bucket, Key="exp1/run-1/alive", Body=b"2")  # an overwrite is a put
    assert node.get_object(Bucket=bucket, Key="exp1/run-1/alive")["Body"].read() == b"2"
    assert node.head_object(Bucket=bucket, Key="exp1/run-1/alive")["ContentLength"] == 1
    listed = node.list_objects_v2(Bucket=bucket, Prefix="exp1/", Delimiter="/")
    assert [p["Prefix"] for p in listed["CommonPrefixes"]] == ["exp1/run-1/"]
    mp = node.create_multipart_upload(Bucket=bucket, Key="exp1/run-1/big")
    etag = node.upload_part(Bucket=bucket, Key="exp1/run-1/big", PartNumber=1, UploadId=mp["UploadId"],
                            Body=b"x" * 1024)["ETag"]
    node.complete_multipart_upload(Bucket=bucket, Key="exp1/run-1/big", UploadId=mp["UploadId"],
                                   MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
    assert not proxy.denied() and not proxy.errors

    # Another run's prefix in the same bucket: no read, write or list; the bucket root no list.
    denied(lambda: node.get_object(Bucket=bucket, Key="exp2/run-9/model.pt"))
    denied(lambda: node.put_object(Bucket=bucket, Key="exp2/run-9/model.pt", Body=b"forged"))
    denied(lambda: node.list_objects_v2(Bucket=bucket, Prefix="exp2/"))
    denied(lambda: node.list_objects_v2(Bucket=bucket))
    denied(lambda: node.put_object(Bucket=bucket, Key="exp1-other/x", Body=b"x"))  # not exp1/
    # No delete, not even its own objects, nor by a batch.
    why = denied(lambda: node.delete_object(Bucket=bucket, Key="exp1/run-1/alive"))
    assert f"role {role} may not s3:DeleteObject" in why
    with pytest.raises(ClientError):
        node.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "exp1/run-1/alive"}]})
    assert node.get_object(Bucket=bucket, Key="exp1/run-1/alive")["Body"].read() == b"2"
    assert {r["role"] for r in proxy.denied()} == {role} and not proxy.errors


def test_unknown_requests_and_policy_grammar_are_denied_and_reported(s3_store):
    node, bucket, proxy, iam, role = s3_store
    node.put_object(Bucket=bucket, Key="exp1/k", Body=b"v")
    denied(lambda: node.get_object_acl(Bucket=bucket, Key="exp1/k"))  # no mapping: denied
    assert len(proxy.errors) == 1 and "UnknownRequest" in proxy.errors[0]
    # A policy with grammar the evaluator does not know: everything denied, said why.
    iam.put_role_policy(RoleName=role, PolicyName="typo", PolicyDocument=json.dumps(doc(
        {"Effect": "Allow", "NotAction": "s3:DeleteObject", "Resource": "*"})))
    why = denied(lambda: node.get_object(Bucket=bucket, Key="exp1/k"))
    assert "PolicyError" in why and "NotAction" in why and len(proxy.errors) == 2
    iam.delete_role_policy(RoleName=role, PolicyName="typo")
    assert node.get_object(Bucket=bucket, Key="exp1/k")["Body"].read() == b"v"  # read live from IAM


def test_keys_without_a_role_keep_the_old_meaning(moto_server):
    """An operator's key (allowed without a role) is not policy-checked."""
    proxy = S3IdentityProxy(moto_server, {"AKIAOPERATOR00000001"})
    try:
        c = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1",
                         aws_access_key_id="AKIAOPERATOR00000001", aws_secret_access_key="s")
        bucket = f"policies-{uuid.uuid4().hex[:8]}"
        c.create_bucket(Bucket=bucket)
        c.put_object(Bucket=bucket, Key="anywhere", Body=b"x")
        c.delete_object(Bucket=bucket, Key="anywhere")
        assert not proxy.denied()
    finally:
        proxy.close()


# -- through the GCS stand-in ---------------------------------------------------------------

@pytest.fixture
def gcs_store(gcs_emulator):
    """(node gcsfs, operator gcsfs, bucket, proxy, fake): infra/gcp/run-bucket-policy.json
    for gs://bucket/<prefix>, a node token of its service account."""
    from tests.fakes.gce_server import FakeGCE
    from tests.fakes.gcs_identity import GcsIdentityProxy

    def gcsfs_as(url: str, token: str):
        import gcsfs
        from google.oauth2.credentials import Credentials

        return gcsfs.GCSFileSystem(endpoint_url=url, token=Credentials(token), skip_instance_cache=True)
    fake = FakeGCE()
    proxy = GcsIdentityProxy(gcs_emulator.endpoint, fake.token_info, allowed_tokens={fake.token})
    bucket, prefix = gcs_emulator.bucket, f"exp-{uuid.uuid4().hex[:6]}"
    proxy.apply_policy(bucket, *infra_policy(bucket, prefix))
    token, _ = fake.issue_token(ACCOUNT, "us-central1-a/node-a", [READ_WRITE])
    try:
        yield gcsfs_as(proxy.url, token), gcsfs_as(proxy.url, fake.token), bucket, prefix, proxy
    finally:
        proxy.close()


def test_a_gcs_node_works_under_its_prefix_only(gcs_store):
    node, operator, bucket, prefix, proxy = gcs_store
    other = f"{bucket}/{prefix}-other/run-9/model.pt"  # another run's prefix, same bucket
    operator.pipe(other, b"another run")
    mine = f"{bucket}/{prefix}/run-1/alive"
    node.pipe(mine, b"1")
    node.pipe(mine, b"2")  # an overwrite: objectUser's delete under the prefix allows it
    assert node.cat(mine) == b"2"
    assert node.ls(f"{bucket}/{prefix}/run-1") == [mine]  # listing: geotrainNodeLister
    assert not proxy.denied() and not proxy.errors

    with pytest.raises(OSError, match="storage.objects.get"):
        node.cat(other)
    with pytest.raises(OSError, match="storage.objects.create"):
        node.pipe(f"{bucket}/{prefix}-other/run-9/forged", b"x")
    with pytest.raises(OSError, match="storage.objects.delete"):
        node.rm_file(other)
    assert operator.cat(other) == b"another run"
    assert {r["status"] for r in proxy.denied()} == {403} and not proxy.errors


def test_overwriting_on_gcs_needs_delete(gcs_store):
    """GCS checks storage.objects.delete on an overwrite: with objectCreator only, a node
    creates an object once and cannot replace it (why the node keeps delete on GCS)."""
    node, _, bucket, prefix, proxy = gcs_store
    expr = f'resource.name.startsWith("projects/_/buckets/{bucket}/objects/{prefix}/")'
    proxy.apply_policy(bucket, {"bindings": [{
        "role": "roles/storage.objectCreator", "members": [f"serviceAccount:{ACCOUNT}"],
        "condition": {"title": "prefix", "expression": expr}}]})
    node.pipe(f"{bucket}/{prefix}/once", b"1")
    with pytest.raises(OSError, match="storage.objects.delete"):
        node.pipe(f"{bucket}/{prefix}/once", b"2")
