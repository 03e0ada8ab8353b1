"""Providers: the places a site can be put, behind one small function set.

Every provider is a package (`providers/local/`, `aws/`, `gcp/`, `azure/`) holding
all it knows of its cloud: provisioning in its `__init__.py`, which is a
`Provider` — it implements exactly the functions the `Provider` protocol below
declares, with the same signatures (tests/test_provider_contract.py checks), and
says "see providers/__init__.py" instead of repeating their docstrings — its
recipe options (`options.py`: identity, network, image, disk; shared parts in
providers/options.py), the node-side preemption watcher for its metadata service
(`watcher.py`, run by geotrain/site/preemption.py) and its public price sources
(`catalog.py`, for `geotrain catalog refresh`). What a
provider can do beyond that it declares in its `Capabilities`; callers ask those
instead of testing the provider's name. Callers never import a provider module
directly: they call `get(name)`, which imports it on first use, so a cloud SDK is
loaded only when that cloud is used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

if TYPE_CHECKING:
    from geotrain.recipe import ProviderOptions

PROVIDERS = ("local", "aws", "gcp", "azure")


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do; the planner, the recipe's checks and the controller ask
    this instead of testing the provider's name. The last three default to off."""

    spot: bool  # spot / preemptible nodes (`spot: true` placements)
    multi_node: bool  # a site of more than one node
    preemption_notice: bool  # nodes learn of a preemption ahead of it (the agent drains)
    gpus: bool  # nodes with GPUs
    # The nodes are processes on this machine: they need no boot bundle, no instance
    # type and no identity for the run store, they read this machine's files (data,
    # the entrypoint), and they cost nothing unless the provider's catalog file says so.
    runs_here: bool = False
    console: bool = False  # implements `Console.console`: what a node printed while booting
    # implements `FaultSeams` (preempt, kill, processes): the seams tests and demos inject
    # faults through
    fault_seams: bool = False
    # implements `RunResources`: resources launch makes for a run's sites beside their
    # nodes (AWS run roles), which `down` removes even when no node was ever made
    run_resources: bool = False


@dataclass(frozen=True)
class Leftover:
    """A resource a provider made for one site of a run beside its nodes."""

    provider: str
    run_id: str
    site: str
    kind: str  # e.g. "iam-role"
    name: str
    owner: str | None = None  # the launching operator's owner id, when tagged


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
    # The recipe's typed options for this provider (providers/<cloud>/options.py AwsOptions,
    # GcpOptions, AzureOptions): node identity, network, image, disk. None: the
    # provider's defaults (and always for `local`).
    provider_options: ProviderOptions | None = None
    # The member's private signing key (geotrain/store/control.py): a secret, put only in
    # the site's boot data (locally: its processes' environment); never shown.
    member_key: str | None = field(default=None, repr=False)

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


@runtime_checkable
class Provider(Protocol):
    """What every provider module implements, as module-level functions."""

    def capabilities(self) -> Capabilities:
        """What the provider can do; the planner and controller ask this instead of
        testing the provider's name. A constant: no call is made."""

    def check(self) -> CredentialCheck:
        """Whether this machine can use the provider, and why not. Never raises, never
        includes a secret."""

    def launch(self, plan: SitePlan) -> list[Node]:
        """Create the nodes of one site and start the site agent on node 0. The caller
        has already recorded the intent in the state db. Raises CapacityError when the
        provider has no room (the caller fails over to the site's next candidate),
        ProviderError for anything else; in both cases nothing is left running.

        Writes `plan.owner` (the launching GEOTRAIN_HOME's owner id, geotrain/state.py
        `owner_id`) as the tag/label `geotrain-owner` on every resource it tags (locally:
        the GEOTRAIN_OWNER environment variable of the site's processes), so a teammate's
        or CI's nodes in the same account are never another operator's orphans."""

    def query(self, run_id: str, site: str | None = None,
              regions: list[str] | None = None) -> list[Node]:
        """Every node the provider holds for a run (optionally one site), found by the
        provider's own tags/labels, not by our memory. `regions`: where to look (the
        regions the state db recorded for the run); None searches everywhere the
        credentials reach. A provider that lists every region in one call ignores it."""

    def terminate(self, nodes: list[Node]) -> list[Node]:
        """Stop and delete the given nodes and everything attached to them; idempotent;
        returns the nodes with their final state. `terminate([])` calls nothing and
        returns []."""

    def open_ports(self, plan: SitePlan) -> None:
        """Allow traffic between the site's own nodes and nothing else (Ray and its
        agents are never reachable from outside the site)."""

    def query_all(self) -> list[Node]:
        """Every node the provider holds that carries a geotrain run tag, of any run (in
        the account / project / subscription the credentials reach; locally: started
        from this GEOTRAIN_HOME), each with its `owner` tag (None when it has none).
        `geotrain down --orphans` terminates the ones carrying this operator's owner id
        whose run the state db does not know or says is over."""


@runtime_checkable
class Console(Protocol):
    """What a provider whose `Capabilities.console` is true implements as well."""

    def console(self, node: Node) -> str:
        """The tail of what the node printed on its serial console: where a node that
        cannot boot or reach the run store says why (geotrain/site/node_info.py)."""


@runtime_checkable
class FaultSeams(Protocol):
    """What a provider whose `Capabilities.fault_seams` is true implements as well."""

    def preempt(self, run_id: str, site: str, notice_s: float = 30.0) -> None:
        """Announce a spot preemption to the site through its own metadata endpoint, so
        the agent's real watcher sees it `notice_s` ahead."""

    def kill(self, run_id: str, site: str) -> list[int]:
        """The site's machine is gone: end every process of it at once, no notice.
        Returns their pids."""

    def processes(self, run_id: str) -> list[int]:
        """Every live process of the run (agents, their Ray processes, workers)."""


@runtime_checkable
class RunResources(Protocol):
    """What a provider whose `Capabilities.run_resources` is true implements as well."""

    def leftovers(self, run_id: str | None = None) -> list[Leftover]:
        """The per-site resources launch made (of `run_id`, or of every run) that are
        still there; `terminate` removes a site's once its last node is gone, so these
        are what a launch killed before its nodes existed left behind, or what belongs
        to sites still running."""

    def remove(self, leftovers: list[Leftover]) -> list[Leftover]:
        """Delete them (each may be gone already); returns those deleted."""


def get(name: str) -> Provider:
    """The provider module for `name`, imported on first use."""
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; valid: {', '.join(PROVIDERS)}")
    return cast(Provider, importlib.import_module(f"providers.{name}"))


def capabilities_of(name: str) -> Capabilities:
    """What provider `name` declares it can do (its module imported on first use; no
    client is made, nothing is called)."""
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; valid: {', '.join(PROVIDERS)}")
    return importlib.import_module(f"providers.{name}").capabilities()
