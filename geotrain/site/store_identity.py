"""A node's way into a run store on another cloud: its own cloud identity, exchanged.

A GCP node writing an s3:// store has no AWS identity. The recipe names an AWS role
in the site's `gcp.store_credentials`; the boot script exports it as
GEOTRAIN_STORE_ROLE_ARN, and `setup()` (run by the site agent before it opens the
store) makes the node's AWS SDKs assume that role by web identity:

- it asks the GCE metadata server for an identity token of the node's own service
  account, audience `sts.amazonaws.com` (a Google-signed OIDC token, ~1 h),
- writes it to an owner-only file, and points AWS_WEB_IDENTITY_TOKEN_FILE and
  AWS_ROLE_ARN at it, so botocore and s3fs's aiobotocore exchange it with STS
  (AssumeRoleWithWebIdentity) for short-lived keys and renew them by themselves,
- and refreshes the file every REFRESH_S in a daemon thread.

No key is stored anywhere: the role's trust policy (infra/aws/README.md) decides which
Google service accounts may assume it. Only this combination is built; a node on
Azure, or a gs:// / az:// store on another cloud, is refused with one line.
"""

from __future__ import annotations

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

AUDIENCE = "sts.amazonaws.com"
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


def setup(store_url: str, site: str, environ: Mapping[str, str] = os.environ) -> WebIdentity | None:
    """Make this process (and the Ray workers it starts) reach an s3:// store on another
    cloud through GEOTRAIN_STORE_ROLE_ARN; None when the node needs nothing of this."""
    role = environ.get("GEOTRAIN_STORE_ROLE_ARN") or ""
    if not role:
        return None
    provider = environ.get("GEOTRAIN_PROVIDER") or ""
    if not store_url.startswith("s3://") or provider != "gcp":
        raise ProviderError(f"store_credentials for a {store_url.split('://')[0]}:// store on a "
                            f"{provider or 'non-cloud'} node is not supported yet (only a GCP node "
                            "writing an s3:// store, by an AWS role)")
    path = Path(tempfile.mkdtemp(prefix="gt-identity-")) / "aws-web-identity-token"
    identity = WebIdentity(lambda: gce_identity_token(AUDIENCE, environ), path)
    identity.refresh()
    os.environ.update(AWS_ROLE_ARN=role, AWS_WEB_IDENTITY_TOKEN_FILE=str(path),
                      AWS_ROLE_SESSION_NAME=f"geotrain-{site}"[:64])
    log.info("store access: AWS role %s by web identity (audience %s)", role, AUDIENCE)
    return identity.start()
