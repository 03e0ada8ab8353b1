"""Compute Engine plumbing for the GCP provider (providers/gcp/__init__.py): the names
and labels of a run's resources, the clients one call needs (all on one endpoint,
$GEOTRAIN_GCE_ENDPOINT in tests), operation polling, and what in an error means "no
capacity here"."""

from __future__ import annotations

import hashlib
import os
import re
import time

from geotrain.errors import ProviderError

ENDPOINT_ENV = "GEOTRAIN_GCE_ENDPOINT"
OPERATION_TIMEOUT_S = 900.0
# Error codes (operation errors) / reasons (HTTP errors) that mean "no room
# here, try elsewhere"; compared upper-case without underscores so that
# `quotaExceeded` and `QUOTA_EXCEEDED` are one (and as prefixes, so that
# ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS counts).
CAPACITY_CODES = ("ZONERESOURCEPOOLEXHAUSTED", "QUOTAEXCEEDED", "UNSUPPORTEDOPERATION",
                  "RESOURCEPOOLEXHAUSTED", "STOCKOUT")
CAPACITY_PHRASES = ("does not exist in zone", "does not have enough resources",
                    "is not available in zone", "currently unavailable in the")


# -- names and labels -------------------------------------------------------
def label_value(text: str) -> str:
    """A GCP label value: lowercase [a-z0-9_-], at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "-", text.lower())[:63]


def _rfc1035(text: str, limit: int) -> str:
    """A resource name ([a-z]([-a-z0-9]*[a-z0-9])?, at most `limit` chars);
    when it must be shortened, a hash of the full text keeps it unique."""
    name = re.sub(r"[^a-z0-9-]", "-", text.lower())
    if not name[:1].isalpha():
        name = "g" + name
    if len(name) > limit:
        name = name[:limit - 9].rstrip("-") + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return name.rstrip("-")


def network_tag(run_id: str, site: str) -> str:
    return _rfc1035(f"geotrain-{run_id}-{site}", 57)  # room for "-intra"


def firewall_name(run_id: str, site: str) -> str:
    return f"{network_tag(run_id, site)}-intra"


def instance_name(run_id: str, site: str, index: int) -> str:
    return f"{_rfc1035(f'gt-{run_id}-{site}', 58)}-{index}"


def labels(run_id: str, site: str, owner: str | None = None) -> dict[str, str]:
    out = {"geotrain-run": label_value(run_id), "geotrain-site": label_value(site)}
    if owner:
        out["geotrain-owner"] = label_value(owner)
    return out


# -- clients ----------------------------------------------------------------
def _credentials():
    import google.auth

    creds, adc_project = google.auth.default()
    env_project = os.environ.get("GOOGLE_CLOUD_PROJECT")
    return creds, env_project or adc_project, ("GOOGLE_CLOUD_PROJECT" if env_project else "ADC")


class _Api:
    """The Compute Engine clients one call needs, all on the same endpoint."""

    def __init__(self):
        # Credentials and project first: without them, fail before loading the compute
        # SDK (seconds of imports), e.g. for `down --orphans` on a machine with no GCP.
        creds, self.project, _ = _credentials()
        self.credentials = creds  # for the run accounts' IAM and bucket-policy calls
        if not self.project:
            raise ProviderError("no GCP project: set $GOOGLE_CLOUD_PROJECT or the ADC project "
                                "(`gcloud config set project ...`)")
        from google.api_core.client_options import ClientOptions
        from google.cloud import compute_v1

        endpoint = os.environ.get(ENDPOINT_ENV)
        kw = {"credentials": creds, "transport": "rest",
              "client_options": ClientOptions(api_endpoint=endpoint) if endpoint else None}
        self.v1 = compute_v1
        self.instances = compute_v1.InstancesClient(**kw)
        self.zone_ops = compute_v1.ZoneOperationsClient(**kw)
        self.firewalls = compute_v1.FirewallsClient(**kw)
        self.global_ops = compute_v1.GlobalOperationsClient(**kw)
        self.zones = compute_v1.ZonesClient(**kw)

    def wait(self, operation: str, zone: str | None = None) -> None:
        """Poll an operation to DONE (insert().result() would build its own
        operations client on the default endpoint); raise _OperationFailed
        with its errors."""
        deadline = time.monotonic() + OPERATION_TIMEOUT_S
        while True:
            if zone:
                op = self.zone_ops.wait(project=self.project, zone=zone, operation=operation)
            else:
                op = self.global_ops.wait(project=self.project, operation=operation)
            if op.status == self.v1.Operation.Status.DONE:
                break
            if time.monotonic() > deadline:
                raise ProviderError(f"GCE operation {operation} not done after "
                                    f"{OPERATION_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        if op.error and op.error.errors:
            raise _OperationFailed([(e.code, e.message) for e in op.error.errors])


class _OperationFailed(Exception):
    def __init__(self, errors: list[tuple[str, str]]):
        super().__init__("; ".join(f"{c}: {m}" for c, m in errors))
        self.errors = errors


def _capacity_code(exc: Exception) -> str | None:
    """The capacity code/reason in an HTTP error or a failed operation, else None."""
    from google.api_core import exceptions as gexc

    if isinstance(exc, _OperationFailed):
        pairs = exc.errors
    elif isinstance(exc, gexc.GoogleAPICallError):
        pairs = [(e.get("reason", ""), e.get("message", "")) for e in exc.errors or []
                 if isinstance(e, dict)] + [(exc.reason or "", exc.message or "")]
    else:
        return None
    for code, message in pairs:
        if code and code.upper().replace("_", "").startswith(CAPACITY_CODES):
            return code
        if any(p in (message or "").lower() for p in CAPACITY_PHRASES):
            return code or "UNAVAILABLE_IN_ZONE"
    return None


def _ignore_404(call, *args, **kwargs):
    from google.api_core import exceptions as gexc

    try:
        return call(*args, **kwargs)
    except gexc.NotFound:
        return None
