"""The AWS stand-in cloud boots what it creates (tests/fakes/ec2_boot.py).

moto server plays EC2/IAM/S3; `Ec2Booter` runs each instance's user data as a real
process tree (tests/fakes/node.BootedNode) with its own IMDSv2 (`Imds`), and the
store is reached only through `S3IdentityProxy`, which accepts a request only when
it is signed with credentials the instance's identity was given.

Run: GEOTRAIN_HOME=$(mktemp -d) .venv/bin/python -m pytest -q tests/test_standin_aws.py
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from providers.aws.watcher import AwsWatcher
from tests.fakes.aws_identity import S3IdentityProxy, grant_store, sigv4_key_id
from tests.fakes.ec2_boot import Ec2Booter
from tests.fakes.ec2_imds import Imds
from tests.fakes.node import node_image, tagged_pids

pytestmark = pytest.mark.timeout(180)

REGION = "us-east-1"
IMAGE = "ami-0d1a0000000000002"  # tests/fakes/aws_amis.json
STORE_ROLE, OTHER_ROLE = "geotrain-node", "no-store"
TEST_KEY = "AKIATESTPROCESSKEY01"  # the test process's own (fake) credential: never a node's

# The instance's user data: IMDSv2 token + instance id, then a put to the store with
# whatever credentials the default chain finds (on an instance: its Imds), then sleep.
USER_DATA = r"""#!/bin/bash
# As geotrain's own boot script does (infra/boot.sh.tmpl): botocore waits 1 s, once, for
# the Imds, which a stand-in in a loaded test process may take longer to answer.
export AWS_METADATA_SERVICE_TIMEOUT=5 AWS_METADATA_SERVICE_NUM_ATTEMPTS=3
python3 - <<'PY'
import json, os, urllib.request
root = os.environ["GEOTRAIN_NODE_ROOT"]
base = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254/").rstrip("/")
out = {}
try:
    req = urllib.request.Request(base + "/latest/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    token = urllib.request.urlopen(req, timeout=5).read().decode()
    req = urllib.request.Request(base + "/latest/meta-data/instance-id",
                                 headers={"X-aws-ec2-metadata-token": token})
    iid = out["instance_id"] = urllib.request.urlopen(req, timeout=5).read().decode()
    import boto3
    boto3.client("s3").put_object(Bucket=os.environ["BUCKET"], Key="nodes/" + iid,
                                  Body=("hello from " + iid).encode())
    out["result"] = "ok"
except Exception as e:
    out["result"] = type(e).__name__
    out["client_error"] = any(c.__name__ == "ClientError" for c in type(e).__mro__)
    out["code"] = (getattr(e, "response", None) or {}).get("Error", {}).get("Code")
    out["message"] = str(e)
with open(os.path.join(root, "result.json.tmp"), "w") as f:
    json.dump(out, f)
os.replace(os.path.join(root, "result.json.tmp"), os.path.join(root, "result.json"))
print("boot result:", json.dumps(out), flush=True)
PY
sleep 3600 &
sleep 3600 &
wait
"""


def wait_for(cond, timeout: float, what: str, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def moto(url: str, service: str):
    return boto3.client(service, endpoint_url=url, region_name=REGION,
                        aws_access_key_id=TEST_KEY, aws_secret_access_key="testing")


def reset(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"),
                           timeout=10).close()


def imds_get(base: str, path: str, token: str | None = "fresh") -> tuple[int, bytes]:
    if token == "fresh":
        req = urllib.request.Request(f"{base}/latest/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        token = urllib.request.urlopen(req, timeout=5).read().decode()
    headers = {"X-aws-ec2-metadata-token": token} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


@pytest.fixture
def cloud(moto_server, tmp_path, monkeypatch):
    """moto reset, a bucket, two roles with instance profiles (only STORE_ROLE may use
    the store), an S3 identity proxy and a booter; everything ended at teardown."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    reset(moto_server)
    bucket = f"standin-{uuid.uuid4().hex[:8]}"
    moto(moto_server, "s3").create_bucket(Bucket=bucket)
    iam = moto(moto_server, "iam")
    trust = json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]})
    for role in (STORE_ROLE, OTHER_ROLE):
        iam.create_role(RoleName=role, AssumeRolePolicyDocument=trust)
        iam.create_instance_profile(InstanceProfileName=role)
        iam.add_role_to_instance_profile(InstanceProfileName=role, RoleName=role)
    grant_store(iam, STORE_ROLE, f"s3://{bucket}/nodes")  # the proxy enforces the role's policy
    proxy = S3IdentityProxy(moto_server)
    booter = None
    try:
        booter = Ec2Booter(moto_server, node_image(tmp_path / "image"), tmp_path / "nodes",
                           {"BUCKET": bucket}, regions=(REGION,), s3_proxy=proxy,
                           store_roles={STORE_ROLE})
        ec2 = moto(moto_server, "ec2")

        def launch(profile: str | None = None, count: int = 1) -> list[str]:
            kw = {"IamInstanceProfile": {"Name": profile}} if profile else {}
            resp = ec2.run_instances(ImageId=IMAGE, InstanceType="g5.xlarge", MinCount=count,
                                     MaxCount=count, UserData=USER_DATA, **kw)
            return [i["InstanceId"] for i in resp["Instances"]]

        yield SimpleNamespace(url=moto_server, bucket=bucket, proxy=proxy, booter=booter, ec2=ec2,
                              s3=moto(moto_server, "s3"), launch=launch)
    finally:
        ids = booter.booted() if booter else set()
        if booter:
            booter.close()
        proxy.close()
        assert not [p for iid in ids for p in tagged_pids(iid)], "a node process outlived the test"


def result_of(cloud, iid: str, timeout: float = 90.0) -> dict:
    wait_for(lambda: iid in cloud.booter.nodes(), 60, f"{iid} to boot")
    path = Path(cloud.booter.nodes()[iid].root) / "result.json"
    wait_for(path.exists, timeout,
             f"{iid}'s boot script to report (console: {cloud.booter.nodes()[iid].console_text()[-2000:]})")
    return json.loads(path.read_text())


def objects(cloud) -> list[str]:
    return [o["Key"] for o in cloud.s3.list_objects_v2(Bucket=cloud.bucket).get("Contents", [])]


def node_environ(iid: str) -> dict[str, str]:
    pid = tagged_pids(iid)[0]
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(kv.split("=", 1) for kv in raw.decode().split("\0") if "=" in kv)


def test_a_node_whose_role_may_use_the_store_writes_with_the_credentials_its_imds_gives(cloud):
    [iid] = cloud.launch(STORE_ROLE)
    result = result_of(cloud, iid)
    assert result == {"instance_id": iid, "result": "ok"}
    assert objects(cloud) == [f"nodes/{iid}"]
    body = cloud.s3.get_object(Bucket=cloud.bucket, Key=f"nodes/{iid}")["Body"].read()
    assert body == f"hello from {iid}".encode()

    imds = cloud.booter.imds(iid)
    key = imds.credentials["AccessKeyId"]
    assert key.startswith("ASIA") and key in cloud.proxy.allowed_keys
    puts = [r for r in cloud.proxy.requests if r["method"] == "PUT" and r["path"].endswith(iid)]
    assert puts and {r["key_id"] for r in puts} == {key} and puts[-1]["status"] == 200
    # The node's credentials came from its Imds, never from the test process.
    env = node_environ(iid)
    assert not {k for k in env if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                         "AWS_PROFILE")}
    assert TEST_KEY not in json.dumps(env)
    assert env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] == f"{imds.url}/"
    assert env["GEOTRAIN_METADATA_ENDPOINT"] == imds.url
    assert env["AWS_ENDPOINT_URL_S3"] == cloud.proxy.url
    assert env["AWS_DEFAULT_REGION"] == REGION
    # What the Imds says about the instance.
    status, doc = imds_get(imds.url, "/latest/dynamic/instance-identity/document")
    assert status == 200 and json.loads(doc)["instanceId"] == iid and json.loads(doc)["region"] == REGION
    assert imds_get(imds.url, "/latest/meta-data/iam/security-credentials/") == (200, STORE_ROLE.encode())
    status, creds = imds_get(imds.url, f"/latest/meta-data/iam/security-credentials/{STORE_ROLE}")
    creds = json.loads(creds)
    assert status == 200 and creds["Code"] == "Success" and creds["Type"] == "AWS-HMAC"
    assert creds["AccessKeyId"] == key and creds["Token"] and creds["Expiration"].endswith("Z")


def test_a_node_without_an_instance_profile_has_no_credentials_and_writes_nothing(cloud):
    [iid] = cloud.launch(None)
    result = result_of(cloud, iid)
    assert result["result"] == "NoCredentialsError", result
    assert objects(cloud) == []
    imds = cloud.booter.imds(iid)
    assert imds_get(imds.url, "/latest/meta-data/iam/security-credentials/")[0] == 404
    assert imds.credentials is None and not cloud.proxy.allowed_keys


def test_a_node_whose_role_lacks_store_access_is_denied_by_the_store(cloud):
    [iid] = cloud.launch(OTHER_ROLE)
    result = result_of(cloud, iid)
    assert result["client_error"] and result["code"] == "AccessDenied", result
    assert objects(cloud) == []
    key = cloud.booter.imds(iid).credentials["AccessKeyId"]
    assert key not in cloud.proxy.allowed_keys
    denied = [r for r in cloud.proxy.requests if r["key_id"] == key]
    assert denied and all(r["status"] == 403 for r in denied)


def test_a_spot_notice_at_the_imds_is_what_the_aws_watcher_reads(cloud):
    [iid] = cloud.launch(STORE_ROLE)
    cloud.booter.wait_booted(1, timeout=60)
    watcher = AwsWatcher(cloud.booter.imds(iid).url)
    assert watcher.poll() is None and watcher.healthy
    before = time.time()
    cloud.booter.notice(iid, in_s=120)
    notice = watcher.poll()
    assert notice is not None and notice.provider == "aws" and notice.kind == "preempt" and notice.urgent
    assert before + 110 <= notice.deadline <= time.time() + 121
    cloud.booter.imds(iid).expire_tokens()  # the watcher re-fetches a token on 401
    assert watcher.poll() == notice


def test_terminating_an_instance_ends_its_whole_process_tree(cloud):
    [iid] = cloud.launch(STORE_ROLE)
    result_of(cloud, iid)
    pids = wait_for(lambda: len(tagged_pids(iid)) >= 3 and tagged_pids(iid), 30, "bash and its two sleeps")
    imds_url = cloud.booter.imds(iid).url
    key = cloud.booter.imds(iid).credentials["AccessKeyId"]
    assert key in cloud.proxy.allowed_keys
    cloud.ec2.terminate_instances(InstanceIds=[iid])
    wait_for(lambda: not tagged_pids(iid), 60, f"{iid}'s processes {pids} to end")
    cloud.booter.wait_stopped(iid, timeout=30)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{imds_url}/latest/meta-data/instance-id", timeout=2)
    assert iid in cloud.booter.booted() and iid not in cloud.booter.nodes()  # booted once, not again
    assert key not in cloud.proxy.allowed_keys  # its credentials no longer open the store


def test_close_leaves_no_process(cloud):
    ids = cloud.launch(None, count=2)
    cloud.booter.wait_booted(2, timeout=60)
    for iid in ids:
        wait_for(lambda iid=iid: tagged_pids(iid), 30, f"{iid} to run")
    cloud.booter.close()
    assert not [p for iid in ids for p in tagged_pids(iid)]
    assert cloud.booter.nodes() == {}


# -- the parts on their own ------------------------------------------------------------------

def test_imds_is_v2_only_and_checks_its_tokens():
    imds = Imds("i-0123456789abcdef0", REGION, "us-east-1b")
    try:
        assert imds_get(imds.url, "/latest/meta-data/instance-id", token=None)[0] == 401
        assert imds_get(imds.url, "/latest/meta-data/instance-id", token="forged")[0] == 401
        assert imds_get(imds.url, "/latest/meta-data/instance-id") == (200, b"i-0123456789abcdef0")
        assert imds_get(imds.url, "/latest/meta-data/placement/availability-zone") == (200, b"us-east-1b")
        assert imds_get(imds.url, "/latest/meta-data/local-ipv4") == (200, b"127.0.0.1")
        assert imds_get(imds.url, "/latest/meta-data/spot/instance-action")[0] == 404
        assert imds_get(imds.url, "/latest/meta-data/events/recommendations/rebalance")[0] == 404
        imds.rebalance()
        assert imds_get(imds.url, "/latest/meta-data/events/recommendations/rebalance")[0] == 200
        bad = urllib.request.Request(f"{imds.url}/latest/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "99999"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=5)
        assert e.value.code == 400
        e.value.close()
        with pytest.raises(ValueError):
            imds.issue_credentials()  # no profile, no credentials
    finally:
        imds.close()


def test_s3_proxy_forwards_only_allowed_keys_streaming_every_kind_of_request(moto_server):
    bucket = f"proxy-{uuid.uuid4().hex[:8]}"
    moto(moto_server, "s3").create_bucket(Bucket=bucket)
    proxy = S3IdentityProxy(moto_server, {"AKIAALLOWED000000001"})
    try:
        def s3(key, config=None):
            return boto3.client("s3", endpoint_url=proxy.url, region_name=REGION, config=config,
                                aws_access_key_id=key, aws_secret_access_key="whatever")

        ok, bad = s3("AKIAALLOWED000000001"), s3("AKIADENIED0000000001")
        with pytest.raises(ClientError) as e:
            bad.put_object(Bucket=bucket, Key="x", Body=b"nope")
        assert e.value.response["Error"]["Code"] == "AccessDenied"
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        with pytest.raises(ClientError) as e:
            bad.head_bucket(Bucket=bucket)
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

        big = os.urandom(3 * 1024 * 1024 + 17)
        ok.put_object(Bucket=bucket, Key="big", Body=big)
        assert ok.get_object(Bucket=bucket, Key="big")["Body"].read() == big
        mp = ok.create_multipart_upload(Bucket=bucket, Key="multi")
        part1, part2 = os.urandom(5 * 1024 * 1024), b"tail"
        parts = [{"PartNumber": n, "ETag": ok.upload_part(Bucket=bucket, Key="multi", PartNumber=n,
                                                          UploadId=mp["UploadId"], Body=b)["ETag"]}
                 for n, b in ((1, part1), (2, part2))]
        ok.complete_multipart_upload(Bucket=bucket, Key="multi", UploadId=mp["UploadId"],
                                     MultipartUpload={"Parts": parts})
        assert ok.get_object(Bucket=bucket, Key="multi")["Body"].read() == part1 + part2
        ok.delete_object(Bucket=bucket, Key="multi")

        # A presigned URL carries its key id in X-Amz-Credential (SigV4) or AWSAccessKeyId (SigV2).
        for version in ("s3v4", None):
            cfg = Config(signature_version=version) if version else None
            url = s3("AKIAALLOWED000000001", cfg).generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": "big"})
            assert ("X-Amz-Credential=" in url) == (version == "s3v4")
            assert urllib.request.urlopen(url, timeout=10).read() == big
            denied = s3("AKIADENIED0000000001", cfg).generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": "big"})
            with pytest.raises(urllib.error.HTTPError) as he:
                urllib.request.urlopen(denied, timeout=10)
            assert he.value.code == 403 and b"<Code>AccessDenied</Code>" in he.value.read()
            he.value.close()

        # A chunked upload is relayed as chunked.
        conn = http.client.HTTPConnection("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]), timeout=10)
        auth = "AWS4-HMAC-SHA256 Credential=AKIAALLOWED000000001/20250101/us-east-1/s3/aws4_request, " \
               "SignedHeaders=host, Signature=0"
        conn.request("PUT", f"/{bucket}/chunked", body=iter([b"abc", b"def" * 1000]),
                     encode_chunked=True, headers={"Authorization": auth, "Transfer-Encoding": "chunked"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        assert resp.status == 200
        assert ok.get_object(Bucket=bucket, Key="chunked")["Body"].read() == b"abc" + b"def" * 1000

        # s3fs (aiobotocore) through the proxy.
        import s3fs
        fs = s3fs.S3FileSystem(key="AKIAALLOWED000000001", secret="whatever", skip_instance_cache=True,
                               client_kwargs={"endpoint_url": proxy.url, "region_name": REGION})
        fs.pipe(f"{bucket}/fs/a.bin", b"0123456789" * 1000)
        assert fs.cat(f"{bucket}/fs/a.bin") == b"0123456789" * 1000
        denied_fs = s3fs.S3FileSystem(key="AKIADENIED0000000001", secret="x", skip_instance_cache=True,
                                      client_kwargs={"endpoint_url": proxy.url, "region_name": REGION})
        with pytest.raises(PermissionError):
            denied_fs.cat(f"{bucket}/fs/a.bin")

        keys = {r["key_id"] for r in proxy.requests}
        assert keys >= {"AKIAALLOWED000000001", "AKIADENIED0000000001"}
        assert all(r["status"] == 403 for r in proxy.requests if r["key_id"] == "AKIADENIED0000000001")
    finally:
        proxy.close()


def test_sigv4_key_id():
    auth = {"Authorization": "AWS4-HMAC-SHA256 Credential=ASIAXYZ/20250101/us-east-1/s3/aws4_request, "
                             "SignedHeaders=host;x-amz-date, Signature=abc"}
    assert sigv4_key_id(auth, "") == "ASIAXYZ"
    assert sigv4_key_id({}, "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAQ%2F2025%2Fus-east-1"
                            "%2Fs3%2Faws4_request") == "AKIAQ"
    assert sigv4_key_id({}, "AWSAccessKeyId=AKIAV2&Signature=x&Expires=1") == "AKIAV2"
    assert sigv4_key_id({"Authorization": "AWS AKIAV2H:c2ln"}, "") == "AKIAV2H"
    assert sigv4_key_id({}, "") is None


def test_the_booter_survives_an_unreachable_cloud_and_closes(tmp_path):
    from tests.conftest import free_port

    booter = Ec2Booter(f"http://127.0.0.1:{free_port()}", node_image(tmp_path / "image"), tmp_path / "nodes",
                       interval_s=0.1)
    try:
        wait_for(lambda: len(booter.errors) >= 2, 60, "two failed polls")
        assert booter._thread.is_alive() and booter.nodes() == {}
    finally:
        booter.close()
    assert not booter._thread.is_alive()
