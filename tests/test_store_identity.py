"""A node reaching a run store on another cloud with its own identity, exchanged
(geotrain/site/store_identity.py): what it asks its metadata server, what it hands the
AWS SDKs, and what it refuses. The whole path, STS included, boots in
tests/test_boot_twin.py."""

from __future__ import annotations

import os
import stat

import pytest

from geotrain.errors import ProviderError
from geotrain.site import store_identity
from tests.fakes.gce_boot import GceInstanceMetadata

pytestmark = pytest.mark.timeout(60)
ROLE = "arn:aws:iam::123456789012:role/geotrain-node-web"
ACCOUNT = "geotrain-node@my-project.iam.gserviceaccount.com"


@pytest.fixture
def metadata(request):
    """A GCE metadata server; with a service account unless the test is parametrized False."""
    account = getattr(request, "param", True)
    md = GceInstanceMetadata(name="n", instance_id="1", zone="us-central1-a", project="p",
                             project_number="42", machine_type="g2-standard-4", attributes={},
                             service_account=ACCOUNT if account else None,
                             scopes=["https://www.googleapis.com/auth/cloud-platform"],
                             token="t" if account else None).start()
    try:
        yield md
    finally:
        md.stop()


@pytest.fixture
def clean_aws_env(monkeypatch):
    for k in ("AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_SESSION_NAME"):
        monkeypatch.delenv(k, raising=False)  # restored after the test, setup() writes them


def test_a_gcp_node_hands_the_aws_sdks_its_own_identity_token(metadata, clean_aws_env):
    env = {"GEOTRAIN_STORE_ROLE_ARN": ROLE, "GEOTRAIN_PROVIDER": "gcp",
           "GCE_METADATA_HOST": metadata.host}
    identity = store_identity.setup("s3://bucket/runs/r1", "west", env)
    try:
        assert os.environ["AWS_ROLE_ARN"] == ROLE
        assert os.environ["AWS_ROLE_SESSION_NAME"] == "geotrain-west"
        path = os.environ["AWS_WEB_IDENTITY_TOKEN_FILE"]
        token = open(path).read()
        assert metadata.identity_tokens[token]["aud"] == "sts.amazonaws.com"
        assert metadata.identity_tokens[token]["email"] == ACCOUNT
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        identity.refresh()  # what the thread does every REFRESH_S: a new token, same file
        assert open(path).read() != token and len(metadata.identity_tokens) == 2
    finally:
        identity.stop()


@pytest.mark.parametrize("metadata", [False], indirect=True)
def test_no_service_account_no_token(metadata, clean_aws_env):
    env = {"GEOTRAIN_STORE_ROLE_ARN": ROLE, "GEOTRAIN_PROVIDER": "gcp",
           "GCE_METADATA_HOST": metadata.host}
    with pytest.raises(OSError, match="no identity token .* service account"):
        store_identity.setup("s3://bucket/runs/r1", "west", env)
    assert "AWS_ROLE_ARN" not in os.environ


@pytest.mark.parametrize("provider, store", [("azure", "gs://b/r"), ("gcp", "gs://b/r"),
                                             ("aws", "az://c/r"), ("local", "s3://b/r")])
def test_combinations_not_built_are_refused_in_one_line(provider, store, clean_aws_env):
    env = {"GEOTRAIN_STORE_ROLE_ARN": ROLE, "GEOTRAIN_PROVIDER": provider}
    with pytest.raises(ProviderError, match="not supported yet"):
        store_identity.setup(store, "s", env)


def test_a_node_on_the_stores_cloud_needs_nothing(clean_aws_env):
    assert store_identity.setup("s3://b/r", "s", {"GEOTRAIN_PROVIDER": "aws"}) is None


# -- an Azure VM assumes an AWS role with its managed identity's token -----------------

PRINCIPAL, CLIENT = "5f1c0b6e-0000-4000-8000-000000000001", "7a2d0c11-0000-4000-8000-000000000002"
AZURE_ROLE = "geotrain-node-azure"
AZURE_ROLE_ARN = f"arn:aws:iam::123456789012:role/{AZURE_ROLE}"
STORE = "s3://azure-to-s3/runs/r1"


@pytest.fixture
def azure_vm():
    """The IMDS of a VM with one managed identity (tests/fakes/azure_boot.py)."""
    from tests.fakes.azure_boot import AzureImds, NodeTokens

    tokens = NodeTokens()
    imds = AzureImds(compute={"name": "vm-1"}, identities={"": PRINCIPAL, CLIENT: PRINCIPAL},
                     default_identity="one", client_ids={PRINCIPAL: CLIENT}, tokens=tokens).start()
    try:
        yield imds, tokens
    finally:
        imds.stop()


@pytest.mark.timeout(120)
def test_an_azure_node_writes_an_s3_store_as_the_aws_role_its_identity_may_assume(azure_vm, moto_server,
                                                                                   tmp_path):
    """The node side for real, in a process of its own: setup() fetches the identity's
    token from IMDS, botocore exchanges it at STS (AssumeRoleWithWebIdentity) and signs
    its S3 requests with the keys it got — which the S3 stand-in accepts only for what
    the role's policy allows. The STS stand-in trusts this identity's tokens for the
    audience api://AzureADTokenExchange only."""
    import subprocess
    import sys

    import boto3

    from tests.fakes.aws_identity import S3IdentityProxy, StsWebIdentity, grant_store

    imds, tokens = azure_vm
    iam = boto3.client("iam", endpoint_url=moto_server, region_name="us-east-1",
                       aws_access_key_id="x", aws_secret_access_key="x")
    iam.create_role(RoleName=AZURE_ROLE, AssumeRolePolicyDocument="{}")
    grant_store(iam, AZURE_ROLE, "s3://azure-to-s3/runs")
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", aws_access_key_id="x",
                 aws_secret_access_key="x").create_bucket(Bucket="azure-to-s3")

    def claims(token):
        info = tokens.info(token)
        return info and {"aud": info["resource"], "sub": info["principal_id"],
                         "email": info["principal_id"]}
    s3 = S3IdentityProxy(moto_server)
    sts = StsWebIdentity(claims, {AZURE_ROLE_ARN: {PRINCIPAL}}, s3_proxy=s3,
                         audience=store_identity.AZURE_AUDIENCE,
                         provider="login.microsoftonline.com/TENANT/v2.0")
    node = ("import sys, boto3, fsspec\n"
            "from geotrain.site import store_identity\n"
            "identity = store_identity.setup(sys.argv[1], 'west')\n"
            "boto3.client('s3').put_object(Bucket='azure-to-s3', Key='runs/r1/hello', Body=b'hi')\n"
            "fsspec.filesystem('s3').pipe(sys.argv[1] + '/by-s3fs', b'there')\n"
            "try:\n"
            "    boto3.client('s3').put_object(Bucket='azure-to-s3', Key='elsewhere/x', Body=b'')\n"
            "except Exception as e:\n"
            "    print('refused', type(e).__name__, getattr(e, 'response', {}).get('Error', {}).get('Code'))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AZURE_", "GEOTRAIN_"))}
    env.update(GEOTRAIN_STORE_ROLE_ARN=AZURE_ROLE_ARN, GEOTRAIN_PROVIDER="azure",
               AZURE_POD_IDENTITY_AUTHORITY_HOST=imds.url, AWS_ENDPOINT_URL_STS=sts.url,
               AWS_ENDPOINT_URL_S3=s3.url, AWS_DEFAULT_REGION="us-east-1",
               AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true", NO_PROXY="127.0.0.1,localhost")
    try:
        out = subprocess.run([sys.executable, "-c", node, STORE], env=env, capture_output=True,
                             text=True, timeout=90, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.split()[-1:] == ["AccessDenied"], out.stdout  # outside the run's folder
        # What the node asked IMDS for, and what STS let it assume.
        asked = [q for (_, path, q) in imds.requests if path.endswith("/oauth2/token")]
        assert asked and {q["resource"] for q in asked} == {"api://AzureADTokenExchange"}
        assert sts.calls and all(c == {"role": AZURE_ROLE_ARN, "email": PRINCIPAL, "ok": True}
                                 for c in sts.calls)
        # Both writes landed, signed with the role's keys only.
        got = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                           aws_access_key_id="x", aws_secret_access_key="x")
        assert got.get_object(Bucket="azure-to-s3", Key="runs/r1/hello")["Body"].read() == b"hi"
        assert got.get_object(Bucket="azure-to-s3", Key="runs/r1/by-s3fs")["Body"].read() == b"there"
        assert {r["key_id"][:4] for r in s3.requests if r["status"] < 400} == {"ASIA"}
        assert not s3.errors and [r["path"] for r in s3.denied()] == ["/azure-to-s3/elsewhere/x"]
    finally:
        sts.close()
        s3.close()


def test_an_identity_the_role_does_not_trust_gets_no_keys(azure_vm, clean_aws_env):
    imds, _ = azure_vm
    env = {"GEOTRAIN_STORE_ROLE_ARN": ROLE, "GEOTRAIN_PROVIDER": "azure",
           "AZURE_POD_IDENTITY_AUTHORITY_HOST": imds.url, "AZURE_CLIENT_ID": "not-this-vms"}
    with pytest.raises(OSError, match="IMDS gave no managed identity token .*HTTP 400.*azure.identity"):
        store_identity.setup("s3://b/runs/r1", "west", env)
    assert "AWS_ROLE_ARN" not in os.environ
