"""Providers: the places a site can be put, behind one small function set.

Every provider module (`providers/local.py`, later `aws.py`, `gcp.py`,
`azure.py`) implements exactly the functions declared here, with the same
signatures, and says "see providers/__init__.py" instead of repeating the
docstrings. Callers never import a provider module directly: they call
`get(name)`, which imports it on first use, so a cloud SDK is loaded only when
that cloud is used.

The contract:

    capabilities() -> Capabilities
        What the provider can do; the planner and controller ask this instead
        of testing the provider's name.

    check() -> CredentialCheck
        Whether this machine can use the provider, and why not. Never raises,
        never includes a secret.

    launch(plan: SitePlan) -> list[Node]
        Create the nodes of one site and start the site agent on node 0. The
        caller has already recorded the intent in the state db. Raises
        CapacityError when the provider has no room (the caller fails over to
        the site's next candidate), ProviderError for anything else; in both
        cases nothing is left running.

    query(run_id: str, site: str | None = None) -> list[Node]
        Every node the provider holds for a run (optionally one site), found by
        the provider's own tags/labels, not by our memory.

    terminate(nodes: list[Node]) -> list[Node]
        Stop and delete the given nodes and everything attached to them; idempotent;
        returns the nodes with their final state.

    open_ports(plan: SitePlan) -> None
        Allow traffic between the site's own nodes and nothing else (Ray and its
        agents are never reachable from outside the site).

Optional (callers test with hasattr):

    query_all() -> list[Node]
        Every node the provider holds that carries a geotrain run tag, of any run
        (in the account / project / subscription the credentials reach; locally:
        started from this GEOTRAIN_HOME), each with its `owner` tag (None when it
        has none). `geotrain down --orphans` terminates the ones carrying this
        operator's owner id whose run the state db does not know or says is over.

Owner: `launch` writes `plan.owner` (the launching GEOTRAIN_HOME's owner id,
geotrain/state.py `owner_id`) as the tag/label `geotrain-owner` on every
resource it tags (locally: the GEOTRAIN_OWNER environment variable of the
site's processes), so a teammate's or CI's nodes in the same account are never
another operator's orphans.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from geotrain.recipe import ProviderOptions

PROVIDERS = ("local", "aws", "gcp", "azure")


@dataclass(frozen=True)
class Capabilities:
    spot: bool
    multi_node: bool
    preemption_notice: bool
    gpus: bool


@dataclass(frozen=True)
class CredentialCheck:
    provider: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class SitePlan:
    """One concrete placement of a site."""

    run_id: str
    site: str
    provider: str
    store_url: str
    region: str | None = None
    zones: tuple[str, ...] = ()  # tried in order; empty lets the provider choose
    nodes: int = 1
    workers: int = 1
    instance_type: str | None = None
    spot: bool = False
    # geotrain's own settings for the site, none a secret (log_dir, data_site, ...).
    options: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    owner: str | None = None  # the launching operator's owner id, tagged on every node
    # The recipe's typed options for this provider (geotrain/recipe.py AwsOptions,
    # GcpOptions, AzureOptions): node identity, network, image, disk. None: the
    # provider's defaults (and always for `local`).
    provider_options: ProviderOptions | None = None

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)


@dataclass(frozen=True)
class Node:
    run_id: str
    site: str
    provider: str
    instance_id: str
    state: str  # pending | running | terminated
    private_ip: str | None = None
    pid: int | None = None
    region: str | None = None
    owner: str | None = None  # the `geotrain-owner` tag it carries (None: none)


def get(name: str) -> ModuleType:
    """The provider module for `name`, imported on first use."""
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; valid: {', '.join(PROVIDERS)}")
    return importlib.import_module(f"providers.{name}")
