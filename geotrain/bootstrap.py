"""Boot scripts for cloud nodes: what a freshly created machine runs to become
part of a site.

`render(plan, node_index, ray_token)` fills `infra/boot.sh.tmpl` for one node.
Every value comes from the plan and is passed through `shlex.quote`, so nothing
in a recipe can inject shell. Cloud providers pass the result as user data
(AWS), the `startup-script` metadata item (GCP) or custom data (Azure).
"""

from __future__ import annotations

import shlex
import string
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / "infra" / "boot.sh.tmpl"


# What the boot script downloads, each a signed URL + sha256 + file name set by
# geotrain/bundle.py `boot_options` (code_* only when the recipe has an entrypoint;
# requirements_hashes "true" only when the requirements come from a lock with hashes).
BUNDLE_KEYS = ("wheel_url", "wheel_sha256", "wheel_name", "requirements_url",
               "requirements_sha256", "requirements_hashes", "code_url", "code_sha256")


def template_text() -> str:
    return TEMPLATE.read_text()


def render(plan, node_index: int, ray_token: str) -> str:
    """The boot script for node `node_index` of the site in `plan` (a providers.SitePlan)."""
    if not 0 <= node_index < plan.nodes:
        raise ValueError(f"node_index {node_index} out of range for a {plan.nodes}-node site")
    values = {"run_id": plan.run_id, "site": plan.site, "provider": plan.provider,
              "node_index": str(node_index), "nodes": str(plan.nodes), "ray_token": ray_token,
              "store_url": plan.store_url, "data_site": plan.option("data_site") or plan.site,
              "ray_port": plan.option("ray_port") or "6379",  # geotrain/site/cluster.py
              # The public half of the run's control key (geotrain/store/control.py).
              "control_key": plan.option("control_key") or "",
              # The member's private signing key: a secret, like the Ray token.
              "member_key": plan.member_key or ""}
    values.update({k: plan.option(k) or "" for k in BUNDLE_KEYS})
    # An az:// store's storage account (its URL names only the container).
    values["store_account"] = plan.option("store_account") or ""
    values["store_role_arn"] = store_role_arn(plan)
    values["store_gcp_provider"] = store_gcp_provider(plan)
    values["access_grace_s"] = str(access_grace_s(plan))
    return string.Template(template_text()).substitute(
        {k: shlex.quote(v) for k, v in values.items()})


# How long a node keeps asking when the store refuses it: an Azure role assignment that
# launch makes for a VM's own identity, right after creating the VM, takes minutes to
# apply (Azure documents up to about 10 minutes).
ROLE_APPLY_S = 600


def access_grace_s(plan) -> int:
    """Seconds the boot fetch keeps retrying a 401/403 before it gives up: ROLE_APPLY_S
    when launch grants the store to the VM's own identity as it creates it (Azure,
    `identity: system` with `store_scope`); 0 otherwise, so a node without access is
    reported at once."""
    opts = plan.provider_options
    if plan.provider == "azure" and opts is not None and getattr(opts, "store_scope", None):
        return ROLE_APPLY_S
    return 0


def store_role_arn(plan) -> str:
    """The AWS role a node on another cloud assumes by web identity to use an s3:// run
    store (its placement's `store_credentials`); "" when it needs none."""
    opts = plan.provider_options
    if plan.provider == "aws" or not plan.store_url.startswith("s3://") or opts is None:
        return ""
    return getattr(opts, "store_credentials", None) or ""


def store_gcp_provider(plan) -> str:
    """The GCP workload identity pool provider through which an AWS node federates its
    instance profile's role to use a gs:// run store (its placement's
    `store_credentials`); "" when it needs none."""
    opts = plan.provider_options
    if plan.provider != "aws" or not plan.store_url.startswith("gs://") or opts is None:
        return ""
    return getattr(opts, "store_credentials", None) or ""
