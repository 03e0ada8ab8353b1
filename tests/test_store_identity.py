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


@pytest.mark.parametrize("provider, store", [("azure", "s3://b/r"), ("gcp", "gs://b/r"),
                                             ("aws", "az://c/r")])
def test_combinations_not_built_are_refused_in_one_line(provider, store, clean_aws_env):
    env = {"GEOTRAIN_STORE_ROLE_ARN": ROLE, "GEOTRAIN_PROVIDER": provider}
    with pytest.raises(ProviderError, match="not supported yet"):
        store_identity.setup(store, "s", env)


def test_a_node_on_the_stores_cloud_needs_nothing(clean_aws_env):
    assert store_identity.setup("s3://b/r", "s", {"GEOTRAIN_PROVIDER": "aws"}) is None
