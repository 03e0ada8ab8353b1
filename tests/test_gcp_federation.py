"""An AWS node reaching a gs:// run store through GCP workload identity federation, no
key anywhere (geotrain/site/store_identity.py `gcp_federation`): the stand-in GCP STS
(tests/fakes/gcp_sts.py) takes only a GetCallerIdentity request signed with keys the
AWS stand-in's IMDS issued, and the stand-in GCS judges the federated token by the
bucket's IAM policy. The node side runs for real — google-auth's external_account
credentials, under gcsfs — in a process of its own. The whole path, a booted node
included, is tests/test_boot_aws_gs.py.

Run: .venv/bin/python -m pytest -q tests/test_gcp_federation.py
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from geotrain import bootstrap
from geotrain.errors import ProviderError
from geotrain.site import store_identity
from geotrain.site.node_info import fatal_line
from providers import SitePlan
from providers.aws.options import AwsOptions
from tests.fakes.ec2_imds import ACCOUNT_ID, Imds
from tests.fakes.gcp_sts import AWS4_REQUEST, GcpSts, principal_set, sigv4_signature
from tests.fakes.gcs_identity import GcsIdentityProxy
from tests.fakes.node import BootedNode, node_image, tagged_pids
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(120)
PROVIDER = ("//iam.googleapis.com/projects/123456789/locations/global/workloadIdentityPools/"
            "geotrain-aws/providers/aws-nodes")
ROLE = "geotrain-node"
MEMBER = principal_set(PROVIDER, f"arn:aws:sts::{ACCOUNT_ID}:assumed-role/{ROLE}")
NODE = ("import sys\n"
        "import geotrain.store.objects  # gcsfs must not probe for HNS on the emulator\n"
        "import gcsfs\n"
        "from geotrain.site import store_identity\n"
        "path = store_identity.setup(sys.argv[1], 'east')\n"
        "print('config', path)\n"
        "fs = gcsfs.GCSFileSystem(skip_instance_cache=True)\n"
        "fs.pipe(sys.argv[1] + '/hello', b'hi')\n"
        "print('read', fs.cat(sys.argv[1] + '/hello').decode())\n")


@pytest.fixture
def aws_node():
    """(the instance's IMDS with its instance profile's keys issued, the GCP STS that
    knows them, PROVIDER trusting the account)."""
    imds = Imds("i-0fed", "us-east-1", role=ROLE)
    imds.issue_credentials()
    sts = GcpSts(lambda key: imds if imds.credentials["AccessKeyId"] == key else None,
                 {PROVIDER: ACCOUNT_ID})
    try:
        yield imds, sts
    finally:
        sts.close()
        imds.close()


def policy(bucket: str, members: list[str]) -> dict:
    return {"version": 3, "bindings": [{"role": "roles/storage.objectUser", "members": members}]}


def node_env(imds: Imds, sts: GcpSts, proxy: GcsIdentityProxy) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "GOOGLE_", "GCE_", "GEOTRAIN_", "STORAGE_EMULATOR"))}
    env.update(GEOTRAIN_PROVIDER="aws", GEOTRAIN_STORE_GCP_PROVIDER=PROVIDER,
               GEOTRAIN_METADATA_ENDPOINT=imds.url, GEOTRAIN_GCP_STS_URL=sts.url,
               STORAGE_EMULATOR_HOST=proxy.url, NO_GCE_CHECK="true",
               NO_PROXY="127.0.0.1,localhost")
    return env


def test_a_node_writes_the_store_as_its_roles_principal_set_and_only_so(aws_node, gcs_emulator,
                                                                        tmp_path):
    """setup() writes the external_account configuration; gcsfs's google.auth.default()
    takes it, signs GetCallerIdentity with the role's keys from IMDSv2, exchanges it at
    STS, and the store accepts the federated token because the bucket's policy binds the
    role's principal set. Without that binding the same node is refused (403, naming
    the principal set and the permission)."""
    imds, sts = aws_node
    bucket = gcs_emulator.bucket
    proxy = GcsIdentityProxy(gcs_emulator.endpoint, sts.token_info)
    store = f"gs://{bucket}/fed/r1"
    try:
        proxy.apply_policy(bucket, policy(bucket, [MEMBER]))
        out = subprocess.run([sys.executable, "-c", NODE, store], env=node_env(imds, sts, proxy),
                             capture_output=True, text=True, timeout=90, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "read hi" in out.stdout, out.stdout
        # An owner-only file, the form google-auth documents for AWS.
        path = out.stdout.split("config ", 1)[1].split()[0]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        config = json.loads(open(path).read())
        assert config["audience"] == PROVIDER and config["subject_token_type"] == AWS4_REQUEST
        assert config["credential_source"]["environment_id"] == "aws1"
        assert config["credential_source"]["imdsv2_session_token_url"] == f"{imds.url}/latest/api/token"
        # google-auth used IMDSv2 (a session token first) for the role's keys.
        paths = [p for (_, p, s) in imds.requests if s == 200]
        assert "/latest/api/token" in paths and f"/latest/meta-data/iam/security-credentials/{ROLE}" in paths
        assert sts.calls and all(c["ok"] and c["role"] == ROLE for c in sts.calls), sts.calls
        by_node = [r for r in proxy.requests if r["email"]]
        assert by_node and {r["email"] for r in by_node} == {MEMBER}
        assert not proxy.denied() and not proxy.errors

        # The bucket's policy without the principal set: the token is still issued, the
        # store refuses it, in GCS's words.
        proxy.apply_policy(bucket, policy(bucket, ["serviceAccount:x@p.iam.gserviceaccount.com"]))
        out = subprocess.run([sys.executable, "-c", NODE, store], env=node_env(imds, sts, proxy),
                             capture_output=True, text=True, timeout=90, cwd=tmp_path)
        assert out.returncode != 0
        assert f"{MEMBER} does not have storage.objects" in out.stderr, out.stderr[-2000:]
        [denied, *_] = proxy.denied()
        assert denied["status"] == 403 and denied["email"] == MEMBER
    finally:
        proxy.close()


def exchange(sts: GcpSts, subject: dict | str, audience: str = PROVIDER) -> tuple[int, dict]:
    token = subject if isinstance(subject, str) else urllib.parse.quote(json.dumps(subject))
    form = urllib.parse.urlencode({
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "audience": audience,
        "scope": "https://www.googleapis.com/auth/cloud-platform",
        "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "subject_token": token, "subject_token_type": AWS4_REQUEST}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(sts.url, data=form), timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.load(e)


def signed(creds: dict, audience: str = PROVIDER, secret: str | None = None,
           token: str | None = None, at: float | None = None, sign_audience: bool = True) -> dict:
    """A serialized GetCallerIdentity request signed with `creds` (or another secret)."""
    host, query = "sts.us-east-1.amazonaws.com", "Action=GetCallerIdentity&Version=2011-06-15"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(at or time.time()))
    headers = {"host": host, "x-amz-date": stamp,
               "x-amz-security-token": creds["Token"] if token is None else token,
               "x-goog-cloud-target-resource": audience}
    names = sorted(headers) if sign_audience else ["host", "x-amz-date", "x-amz-security-token"]
    scope = f"{stamp[:8]}/us-east-1/sts/aws4_request"
    signature = sigv4_signature(secret or creds["SecretAccessKey"], "POST", "/", query, headers,
                                names, stamp, scope)
    headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds['AccessKeyId']}/{scope}, "
                                f"SignedHeaders={';'.join(names)}, Signature={signature}")
    return {"url": f"https://{host}?{query}", "method": "POST",
            "headers": [{"key": k, "value": v} for k, v in headers.items()]}


def test_sts_takes_only_a_request_signed_with_keys_aws_issued(aws_node):
    imds, sts = aws_node
    creds = imds.credentials
    status, doc = exchange(sts, signed(creds))
    assert status == 200 and doc["token_type"] == "Bearer", doc
    assert sts.token_info(doc["access_token"])["email"] == MEMBER
    assert sts.token_info(doc["access_token"])["subject"] == \
        f"arn:aws:sts::{ACCOUNT_ID}:assumed-role/{ROLE}/i-0fed"
    # Signing the audience header is recommended, not required (google-auth does not).
    assert exchange(sts, signed(creds, sign_audience=False))[0] == 200

    unsigned = signed(creds)
    unsigned["headers"] = [h for h in unsigned["headers"] if h["key"] != "Authorization"]
    tampered = signed(creds)
    tampered["url"] = tampered["url"].replace("GetCallerIdentity", "GetSessionToken")
    other = dict(creds, AccessKeyId="ASIAFORGEDFORGED0000")
    forged = {
        "unsigned": unsigned,
        "signed with another secret": signed(creds, secret="not-the-secret"),
        "another session token": signed(creds, token="forged-session-token"),
        "a key nobody issued": signed(other),
        "signed an hour ago": signed(creds, at=time.time() - 3600),
        "another call than GetCallerIdentity": tampered,
        "another provider in the header": signed(creds, audience=PROVIDER.replace("aws-nodes", "others")),
        "not a serialized request": "eyJhbGciOiJub25lIn0.e30.",
    }
    for why, subject in forged.items():
        status, doc = exchange(sts, subject)
        assert (status, doc.get("error")) == (400, "invalid_grant"), (why, doc)
    # An audience that is no provider of this STS.
    status, doc = exchange(sts, signed(creds, audience=PROVIDER + "x"), audience=PROVIDER + "x")
    assert (status, doc["error"]) == (400, "invalid_target")
    # Keys rotate: the old ones are refused once IMDS hands out new ones.
    imds.issue_credentials()
    assert exchange(sts, signed(creds))[0] == 400
    assert exchange(sts, signed(imds.credentials))[0] == 200
    assert [c["ok"] for c in sts.calls].count(True) == 3


def test_sts_refuses_a_provider_trusting_another_account(aws_node):
    imds, _ = aws_node
    sts = GcpSts(lambda key: imds, {PROVIDER: "210987654321"})
    try:
        status, doc = exchange(sts, signed(imds.credentials))
        assert (status, doc["error"]) == (400, "invalid_grant"), doc
        assert f"AWS account {ACCOUNT_ID} is not the one the provider trusts" in doc["error_description"]
        assert sts.token_info("ya29.anything") is None
    finally:
        sts.close()


@pytest.mark.parametrize("provider, store", [("aws", "s3://b/r"), ("gcp", "gs://b/r"),
                                             ("azure", "gs://b/r")])
def test_a_pool_provider_serves_aws_nodes_writing_a_gs_store_only(provider, store):
    env = {"GEOTRAIN_STORE_GCP_PROVIDER": PROVIDER, "GEOTRAIN_PROVIDER": provider}
    with pytest.raises(ProviderError, match="serve AWS nodes writing a gs:// store"):
        store_identity.setup(store, "s", env)


def test_the_configuration_names_the_nodes_metadata_service_and_sts():
    config = store_identity.gcp_federation(PROVIDER, {})
    source = config["credential_source"]
    assert config["token_url"] == "https://sts.googleapis.com/v1/token"
    assert source["url"] == "http://169.254.169.254/latest/meta-data/iam/security-credentials"
    assert source["region_url"].endswith("/latest/meta-data/placement/availability-zone")
    assert "{region}" in source["regional_cred_verification_url"]
    moved = store_identity.gcp_federation(PROVIDER, {"GEOTRAIN_METADATA_ENDPOINT": "http://127.0.0.1:9/",
                                                     "GEOTRAIN_GCP_STS_URL": "http://127.0.0.1:8/v1/token"})
    assert moved["token_url"] == "http://127.0.0.1:8/v1/token"
    assert moved["credential_source"]["imdsv2_session_token_url"] == "http://127.0.0.1:9/latest/api/token"


@pytest.mark.parametrize("trusted", [True, False], ids=["federated", "another-account"])
def test_the_boot_fetch_signs_and_exchanges_by_itself(aws_node, gcs_emulator, tmp_path, trusted):
    """The boot script's fetch (plain Python, before geotrain is installed) reads a gs://
    object with a federated token of its own: its SigV4 signature verifies at STS and the
    store serves the bytes (whose sha256 is not the one asked for here, so the boot stops
    right after, saying so). A provider that trusts another AWS account: STS refuses,
    and the node says that, once, not after retries."""
    imds, sts = aws_node
    if not trusted:
        sts.providers[PROVIDER] = "210987654321"
    bucket = gcs_emulator.bucket
    proxy = GcsIdentityProxy(gcs_emulator.endpoint, sts.token_info)
    proxy.apply_policy(bucket, policy(bucket, [MEMBER]))
    put = urllib.request.Request(f"{gcs_emulator.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType="
                                 "media&name=fed/r1/_boot/w.whl", data=b"wheel", method="POST")
    urllib.request.build_opener(urllib.request.ProxyHandler({})).open(put, timeout=30).close()
    plan = SitePlan("r1", "east", "aws", f"gs://{bucket}/fed/r1", options=(
        ("wheel_url", f"gs://{bucket}/fed/r1/_boot/w.whl"), ("wheel_sha256", "0" * 64),
        ("wheel_name", "w.whl"), ("requirements_url", f"gs://{bucket}/fed/r1/_boot/req.txt"),
        ("requirements_sha256", "1" * 64)),
        provider_options=AwsOptions(instance_profile=ROLE, store_credentials=PROVIDER))
    script = bootstrap.render(plan, 0, "t" * 64)
    env = {"GEOTRAIN_METADATA_ENDPOINT": imds.url, "GEOTRAIN_GCP_STS_URL": sts.url,
           "STORAGE_EMULATOR_HOST": proxy.url, "NO_PROXY": "127.0.0.1,localhost"}
    node = BootedNode("i-0fed", script, tmp_path / "node", node_image(tmp_path / "image"), env=env)
    node.start()
    try:
        wait_for(lambda: not node.running(), 120, every=0.2)
        said = fatal_line(node.console_text())
        if trusted:
            assert said and said.startswith(f"w.whl has sha256 {hashlib.sha256(b'wheel').hexdigest()}"), \
                node.console_text()
            assert [c["ok"] for c in sts.calls] == [True]
            assert [(r["email"], r["status"]) for r in proxy.requests] == [(MEMBER, 200)]
            # Its region from IMDS (no AWS_REGION on a real node), read with IMDSv2.
            assert ("GET", "/latest/meta-data/placement/region", 200) in imds.requests
        else:
            assert said and said.startswith(
                f"could not fetch w.whl from the run store (GCP STS refused this node's AWS "
                f"identity for {PROVIDER}: HTTP 400"), node.console_text()
            assert "is not the one the provider trusts" in said
            assert [c["ok"] for c in sts.calls] == [False] and not proxy.requests
    finally:
        node.stop()
        proxy.close()
    assert tagged_pids("i-0fed") == []
