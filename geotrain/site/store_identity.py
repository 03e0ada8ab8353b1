"""A node's way into a run store on another cloud: its own cloud identity, exchanged.

A GCP or Azure node writing an s3:// store has no AWS identity. The recipe names an
AWS role in the site's `gcp.store_credentials` / `azure.store_credentials`; the boot
script exports it as GEOTRAIN_STORE_ROLE_ARN, and `setup()` (run by the site agent
before it opens the store) makes the node's AWS SDKs assume that role by web identity:

- it asks its own metadata service for an OIDC token of the node's identity:
  a GCE node its service account's identity token, audience `sts.amazonaws.com`
  (signed by Google, ~1 h); an Azure VM its managed identity's token for the
  resource AZURE_AUDIENCE, `api://AzureADTokenExchange` (signed by Entra ID for the
  VM's tenant, subject the identity's principal id), the audience Entra gives
  managed-identity tokens meant for another party to trust;
- writes it to an owner-only file, and points AWS_WEB_IDENTITY_TOKEN_FILE and
  AWS_ROLE_ARN at it, so botocore and s3fs's aiobotocore exchange it with STS
  (AssumeRoleWithWebIdentity) for short-lived keys and renew them by themselves,
- and refreshes the file every REFRESH_S in a daemon thread.

No key is stored anywhere: the role's trust policy (infra/aws/README.md) decides which
service accounts or managed identities may assume it.

An AWS node writing a gs:// store has no Google identity. The recipe names a GCP
workload identity pool provider in the site's `aws.store_credentials`; the boot script
exports it as GEOTRAIN_STORE_GCP_PROVIDER, and `setup()` writes a google-auth
`external_account` credential configuration (`gcp_federation`) to an owner-only file and
points GOOGLE_APPLICATION_CREDENTIALS at it, so gcsfs's google.auth.default() signs a
GetCallerIdentity request with the instance profile role's keys (from IMDSv2, at the
endpoint the boot data names), exchanges it at GCP STS for a federated access token and
renews it by itself. The bucket's IAM policy grants the role's principal set
(infra/gcp/README.md); nothing is impersonated. The boot fetch does the same exchange in
plain Python before geotrain is installed (infra/boot.sh.tmpl).

Only these combinations are built; an az:// store on another cloud, or a gs:// one from
an Azure node, is refused with one line (and by `geotrain launch` before it creates
anything: geotrain/checks.py).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path

from geotrain.errors import ProviderError
from geotrain.site.preemption import _request

log = logging.getLogger("geotrain.site.store_identity")

AUDIENCE = "sts.amazonaws.com"  # of a GCE identity token for AWS
AZURE_AUDIENCE = "api://AzureADTokenExchange"  # the resource an Azure VM asks a token for
AZURE_IMDS = "http://169.254.169.254"
AWS_IMDS = "http://169.254.169.254"
GCP_STS = "https://sts.googleapis.com/v1/token"
STS_URL_ENV = "GEOTRAIN_GCP_STS_URL"  # GCP STS elsewhere (a stand-in in the tests)
AWS4_REQUEST = "urn:ietf:params:aws:token-type:aws4_request"
REFRESH_S = 600.0  # GCE identity tokens last an hour


def gce_identity_token(audience: str, environ: Mapping[str, str] = os.environ) -> str:
    """An OIDC identity token for this GCE node's service account."""
    host = environ.get("GCE_METADATA_HOST") or "metadata.google.internal"
    query = urllib.parse.urlencode({"audience": audience, "format": "full"})
    status, _, body = _request("GET", f"http://{host}/computeMetadata/v1/instance/"
                               f"service-accounts/default/identity?{query}",
                               {"Metadata-Flavor": "Google"})
    if status != 200 or not body.strip():
        raise OSError(f"the metadata server gave no identity token (HTTP {status}): does the "
                      "instance have a service account?")
    return body.decode().strip()


def azure_identity_token(resource: str, environ: Mapping[str, str] = os.environ) -> str:
    """An access token of this Azure VM's managed identity for `resource`, from IMDS (at
    the address azure-identity also reads from AZURE_POD_IDENTITY_AUTHORITY_HOST; with
    AZURE_CLIENT_ID, of that one of the VM's identities)."""
    host = (environ.get("AZURE_POD_IDENTITY_AUTHORITY_HOST") or AZURE_IMDS).rstrip("/")
    query = {"api-version": "2018-02-01", "resource": resource}
    if environ.get("AZURE_CLIENT_ID"):
        query["client_id"] = environ["AZURE_CLIENT_ID"]
    status, _, body = _request("GET", f"{host}/metadata/identity/oauth2/token?"
                               + urllib.parse.urlencode(query), {"Metadata": "true"})
    try:
        token = json.loads(body)["access_token"] if status == 200 else ""
    except (ValueError, KeyError, TypeError):
        token = ""
    if not token:
        said = " ".join(body.decode("utf-8", "replace").split())[:200]
        raise OSError(f"IMDS gave no managed identity token (HTTP {status}: {said}): does the "
                      "VM have an identity (azure.identity)?")
    return token


# The token each provider's nodes present to AWS STS, and where it comes from.
TOKENS: dict[str, Callable[[Mapping[str, str]], str]] = {
    "gcp": lambda environ: gce_identity_token(AUDIENCE, environ),
    "azure": lambda environ: azure_identity_token(AZURE_AUDIENCE, environ),
}


class WebIdentity:
    """Keeps an identity token in a file the AWS SDKs read, fresh."""

    def __init__(self, fetch: Callable[[], str], path: Path, every_s: float = REFRESH_S):
        self.fetch, self.path, self.every_s = fetch, path, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="web-identity", daemon=True)

    def refresh(self) -> None:
        token = self.fetch()
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        os.replace(tmp, self.path)

    def start(self) -> WebIdentity:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - the old token stays until it expires
                log.warning("identity token refresh failed: %s", e)


def gcp_federation(audience: str, environ: Mapping[str, str] = os.environ) -> dict:
    """google-auth's `external_account` configuration for this AWS node: its instance
    profile role's keys (IMDSv2 at GEOTRAIN_METADATA_ENDPOINT, else the link-local
    address) federated through the workload identity pool provider `audience`."""
    imds = (environ.get("GEOTRAIN_METADATA_ENDPOINT") or AWS_IMDS).rstrip("/")
    return {"type": "external_account", "audience": audience,
            "subject_token_type": AWS4_REQUEST,
            "token_url": environ.get(STS_URL_ENV) or GCP_STS,
            "credential_source": {
                "environment_id": "aws1",
                "region_url": f"{imds}/latest/meta-data/placement/availability-zone",
                "url": f"{imds}/latest/meta-data/iam/security-credentials",
                "regional_cred_verification_url":
                    "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15",
                "imdsv2_session_token_url": f"{imds}/latest/api/token"}}


def setup_gcp_federation(audience: str, environ: Mapping[str, str] = os.environ) -> Path:
    """Write `gcp_federation(audience)` to an owner-only file and point this process's
    GOOGLE_APPLICATION_CREDENTIALS at it; the file's path."""
    path = Path(tempfile.mkdtemp(prefix="gt-identity-")) / "gcp-federation.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(gcp_federation(audience, environ), f, indent=2)
    os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = str(path)
    # The pool's project, so google.auth.default() does not ask Cloud Resource Manager
    # for one (a federated principal seldom may; the store needs no project).
    os.environ.setdefault("GOOGLE_CLOUD_PROJECT", audience.split("/")[4])
    log.info("store access: GCP workload identity federation through %s (instance profile "
             "role, by a signed GetCallerIdentity)", audience)
    return path


def setup(store_url: str, site: str, environ: Mapping[str, str] = os.environ) -> WebIdentity | Path | None:
    """Make this process (and the Ray workers it starts) reach a store on another cloud:
    an s3:// one through GEOTRAIN_STORE_ROLE_ARN (the WebIdentity that keeps its token
    fresh), a gs:// one from an AWS node through GEOTRAIN_STORE_GCP_PROVIDER (the
    credential configuration's path); None when the node needs nothing of this."""
    provider = environ.get("GEOTRAIN_PROVIDER") or ""
    audience = environ.get("GEOTRAIN_STORE_GCP_PROVIDER") or ""
    if audience:
        if not store_url.startswith("gs://") or provider != "aws":
            raise ProviderError(f"store_credentials naming a GCP workload identity pool provider "
                                f"serve AWS nodes writing a gs:// store, not a "
                                f"{store_url.split('://')[0]}:// store on a "
                                f"{provider or 'non-cloud'} node")
        return setup_gcp_federation(audience, environ)
    role = environ.get("GEOTRAIN_STORE_ROLE_ARN") or ""
    if not role:
        return None
    if not store_url.startswith("s3://") or provider not in TOKENS:
        raise ProviderError(f"store_credentials for a {store_url.split('://')[0]}:// store on a "
                            f"{provider or 'non-cloud'} node is not supported yet (only GCP and "
                            "Azure nodes writing an s3:// store, by an AWS role, and AWS nodes "
                            "a gs:// store, by GCP workload identity federation)")
    path = Path(tempfile.mkdtemp(prefix="gt-identity-")) / "aws-web-identity-token"
    identity = WebIdentity(lambda: TOKENS[provider](environ), path)
    identity.refresh()
    os.environ.update(AWS_ROLE_ARN=role, AWS_WEB_IDENTITY_TOKEN_FILE=str(path),
                      AWS_ROLE_SESSION_NAME=f"geotrain-{site}"[:64])
    log.info("store access: AWS role %s by web identity (%s token, audience %s)", role, provider,
             AUDIENCE if provider == "gcp" else AZURE_AUDIENCE)
    return identity.start()
