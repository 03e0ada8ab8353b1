"""Whether this machine can use each provider: `geotrain check` and the launch preflight.

`check_providers()` imports each provider module lazily and calls its `check()`. It never
raises: a provider module that does not exist yet is "not implemented", and a `check()`
that raises is reported with the exception's type and a message from which anything that
looks like a key or token has been cut (a provider's `check()` must never include a
secret; this is the second fence) — all but the provider's own non-secret endpoint
settings (`SETTINGS`), which each result also lists in `settings`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import providers

# Long runs of key-like characters (access keys, SAS tokens, bearer tokens, client secrets).
SECRETISH = re.compile(r"[A-Za-z0-9+/=_\-]{20,}")
# The environment settings (none of them a secret) that say where each provider's calls
# go; `geotrain check` shows the ones that are set, so a test or a proxy is never a surprise.
SETTINGS = {
    "aws": ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2", "AWS_PROFILE", "AWS_DEFAULT_REGION",
            "AWS_REGION"),
    "gcp": ("GEOTRAIN_GCE_ENDPOINT", "GCE_METADATA_HOST", "GOOGLE_CLOUD_PROJECT"),
    "azure": ("GEOTRAIN_ARM_ENDPOINT", "GEOTRAIN_ARM_CA_BUNDLE", "AZURE_SUBSCRIPTION_ID"),
}

SETTING_NAMES = tuple(n for names in SETTINGS.values() for n in names)


@dataclass(frozen=True)
class ProviderCheck:
    provider: str
    implemented: bool
    ok: bool
    detail: str
    settings: dict[str, str] = field(default_factory=dict)  # SETTINGS in effect: name -> value


def settings_of(name: str) -> dict[str, str]:
    """The non-secret environment settings of provider `name` that are set here."""
    return {k: os.environ[k] for k in SETTINGS.get(name, ()) if os.environ.get(k)}


def redact(text: str, keep: tuple[str, ...] = ()) -> str:
    """Cut key-like runs out of `text`, except the known non-secret strings in `keep`
    (setting names and values: endpoints, paths, a subscription id)."""
    keep = (*keep, *SETTING_NAMES)  # a message saying which setting to export names it
    kept = sorted({k for k in keep if k}, key=len, reverse=True)
    for i, k in enumerate(kept):
        text = text.replace(k, f"\x00{i}\x00")
    text = SECRETISH.sub("[redacted]", text)
    for i, k in enumerate(kept):
        text = text.replace(f"\x00{i}\x00", k)
    return text


def check_one(name: str) -> ProviderCheck:
    try:
        module = providers.get(name)
    except ModuleNotFoundError as e:
        if e.name == f"providers.{name}":
            return ProviderCheck(name, False, False, "not implemented")
        return ProviderCheck(name, True, False, f"cannot import: missing module {e.name}")
    except Exception as e:  # noqa: BLE001 - an import that fails is a result, not a crash
        return ProviderCheck(name, True, False, f"cannot import: {type(e).__name__}: "
                             f"{redact(str(e))[:200]}")
    try:
        result = module.check()
    except Exception as e:  # noqa: BLE001 - check() must not raise; report it if it does
        return ProviderCheck(name, True, False, f"check() raised {type(e).__name__}: "
                             f"{redact(str(e))[:200]}")
    settings = settings_of(name)
    keep = tuple(settings) + tuple(settings.values())
    return ProviderCheck(name, True, bool(result.ok), redact(str(result.detail), keep)[:500],
                         settings)


def check_providers(names: tuple[str, ...] | None = None) -> list[ProviderCheck]:
    """One ProviderCheck per provider (all of them by default), in order."""
    return [check_one(n) for n in (names or providers.PROVIDERS)]


# -- can every cloud node reach the run store? ------------------------------------------

STORE_CLOUD = {"s3": "aws", "gs": "gcp", "az": "azure"}  # the cloud each store scheme is on
IDENTITY = {"aws": "instance_profile", "gcp": "service_account", "azure": "identity"}
# What a node on another cloud needs in `store_credentials`, by store scheme: (the
# providers whose nodes can use it, what, form). Built: GCP and Azure nodes assuming an
# AWS role by web identity for an s3:// store, AWS nodes federating their instance
# profile's role through a GCP workload identity pool for a gs:// store
# (geotrain/site/store_identity.py). An az:// store on another cloud is refused.
CROSS_CLOUD = {
    "s3": (("gcp", "azure"),
           "the ARN of an AWS role it assumes by web identity (see infra/aws/README.md)",
           re.compile(r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/\S+$")),
    "gs": (("aws",),
           "the full resource name of a GCP workload identity pool provider that trusts its "
           "AWS account, //iam.googleapis.com/projects/NUMBER/locations/global/"
           "workloadIdentityPools/POOL/providers/PROVIDER (see infra/gcp/README.md)",
           re.compile(r"^//iam\.googleapis\.com/projects/[0-9]+/locations/global/"
                      r"workloadIdentityPools/[a-z0-9-]{4,32}/providers/[a-z0-9-]{4,32}$")),
}
BUILT = "only GCP and Azure nodes writing an s3:// store, and AWS nodes a gs:// store"


def store_access(recipe) -> str | None:
    """Why some cloud placement's nodes would have no way to read and write the run store,
    in one line naming the site and the option to set; None when every one has. Looks at
    the recipe only (nothing is called), so `launch` refuses before creating anything.
    Sites on this machine (a provider whose capabilities say `runs_here`) need nothing."""
    store = recipe.store_root()
    for i, site in enumerate(recipe.sites):
        for j, p in enumerate(site.placements()):
            who = f"site {site.name}" + (f" (candidates[{j - 1}])" if j else "")
            at = f"sites[{i}]" + (f".candidates[{j - 1}]" if j else "") + f".{p.provider}"
            if (problem := placement_store_access(p.provider, p.options(), store, who, at)):
                return problem
    return None


def placement_store_access(provider: str, opts, store: str, who: str, at: str) -> str | None:
    """Why nodes on `provider` with options `opts` could not use the store at `store`
    (None: they can, or the provider runs on this machine). `who` names the site in the
    message, `at` the recipe field of the options."""
    if providers.capabilities_of(provider).runs_here:
        return None
    scheme = store.split("://", 1)[0]
    if scheme == "file":
        return (f"{who}: its {provider} nodes cannot reach the run store {store}, "
                "which is on this machine's disk; set store.url to an s3://, gs:// or "
                "az:// bucket")
    if getattr(opts, "run_role", False) and scheme != "s3":
        return (f"{who}: {at}.run_role scopes a role to an s3:// run store, not {store}; "
                f"use store_credentials for a store on another cloud")
    if getattr(opts, "run_account", False) and scheme != "gs":
        return (f"{who}: {at}.run_account scopes a service account to a gs:// run store, not "
                f"{store}; use store_credentials for a store on another cloud")
    if STORE_CLOUD[scheme] == provider:
        key = IDENTITY[provider]
        if opts is None or (getattr(opts, key) is None and not opts.makes_run_resources()):
            return (f"{who}: its {provider} nodes have no identity to write the run "
                    f"store {store}; set {at}.{key} (see infra/{provider}/README.md)")
        return None
    if provider not in CROSS_CLOUD.get(scheme, ((),))[0]:
        return (f"{who}: its {provider} nodes cannot reach the {scheme}:// run store {store} "
                f"on another cloud (not built yet: {BUILT}); place the site on "
                f"{STORE_CLOUD[scheme]} or put the store in S3")
    _, what, form = CROSS_CLOUD[scheme]
    if opts is None or opts.store_credentials is None:
        return (f"{who}: its {provider} nodes have no credential for the run store "
                f"{store} on another cloud; set {at}.store_credentials to {what}")
    if not form.match(opts.store_credentials):
        return (f"{who}: {at}.store_credentials must be {what} for the run store "
                f"{store} (got {opts.store_credentials!r})")
    key = IDENTITY[provider]
    if scheme == "gs" and getattr(opts, key) is None:  # whose identity is exchanged
        return (f"{who}: its {provider} nodes have no identity of their own to exchange for "
                f"the run store {store}; set {at}.{key} (see infra/gcp/README.md)")
    return None


def data_access(recipe) -> str | None:
    """Why a cloud placement's nodes could not read the recipe's data files (a local path
    is on this machine's disk), in one line naming the site and what to do; None when
    every one can."""
    from geotrain.train.data import is_url

    if recipe.data.source != "files":
        return None
    local = [(k, p) for k, p in enumerate(recipe.data.paths) if not is_url(p)]
    if not local:
        return None
    k, path = local[0]
    for site in recipe.sites:
        cloud = [p.provider for p in site.placements()
                 if not providers.capabilities_of(p.provider).runs_here]
        if cloud:
            return (f"site {site.name}: its {cloud[0]} nodes cannot read data.paths[{k}] "
                    f"{path!r}, which is on this machine; copy the files to object storage "
                    "and list their URL instead (e.g. 's3://bucket/corpus/*.txt')")
    return None
