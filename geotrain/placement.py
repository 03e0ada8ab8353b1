"""Failover: put a site on the first of its placements that has capacity.

`launch_site()` walks `site.placements()` (the site's own fields, then its `candidates`)
in order. For each it first records a node row in the state db — so `geotrain down`
can find whatever the provider might create even if this process dies mid-call — then
asks the provider to launch. A `CapacityError` is recorded (provider, region, zones,
instance type, spot, error) and the next placement is tried; when none is left the
site fails with a `CapacityError` whose `tried` lists every attempt and why. Any other
provider error is recorded the same way and raised at once: it is not a question of
room, and the next placement would most likely fail alike.

Each placement's `SitePlan.workers` is the site's `workers` with `auto` made the
type's GPU count from the catalog; an explicit count above it fails the site at once
(`WorkersError`, recorded like a provider error).

The record of what was tried is stored with the site (`sites.placements_tried`) and
shown by `geotrain status`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import providers
from geotrain.errors import CapacityError, GeotrainError
from geotrain.plan import Catalogs, resolve, workers_on
from geotrain.recipe import Placement, SiteSpec
from geotrain.site.devices import WorkersError
from geotrain.state import StateDB, owner_id


@dataclass(frozen=True)
class Attempt:
    provider: str
    region: str | None
    zones: tuple[str, ...]
    instance_type: str | None
    spot: bool
    error: str

    def line(self) -> str:
        zones = f"[{','.join(self.zones)}]" if self.zones else ""
        spot = " spot" if self.spot else ""
        return (f"{self.provider}/{self.region or '*'}{zones} {self.instance_type or '-'}{spot}: "
                f"{self.error}")


def concrete(p: Placement, site: SiteSpec, cats: Catalogs) -> tuple[Placement, float, int]:
    """The placement with the catalog's choice of type/region filled in, its $/h
    (× nodes; 0 where the catalog has no price: the provider, not the catalog, decides
    whether the type exists) and the workers per node (plan.workers_on; raises
    WorkersError for more than the type's GPUs)."""
    c = resolve(p, site, cats)
    workers = workers_on(site, c)
    if providers.capabilities_of(p.provider).runs_here:
        # The local provider does not use the count; the site agent counts this machine's GPUs.
        return p, c.usd_per_hour or 0.0, 1 if workers == "auto" else int(workers)
    return (p.model_copy(update={"instance_type": c.instance_type or p.instance_type,
                                 "region": c.region or p.region}), c.usd_per_hour or 0.0, int(workers))


def launch_site(db: StateDB, run_id: str, site: SiteSpec, *, store_url: str,
                options: tuple[tuple[str, str], ...] = (), member_key: str | None = None,
                home: Path | None = None) -> tuple[list[providers.Node], Placement, list[Attempt]]:
    """Launch `site` on its first placement with capacity: (nodes, placement, failed attempts)."""
    cats = Catalogs(home)
    owner = owner_id(db.path.parent)  # tagged on every node: down --orphans sweeps only ours
    tried: list[Attempt] = []
    for wanted in site.placements():
        try:
            p, usd_per_hour, workers = concrete(wanted, site, cats)
        except WorkersError as e:  # more workers than the type has GPUs: not a capacity question
            tried.append(_attempt(wanted, str(e)))
            _record(db, run_id, site.name, tried)
            raise
        if not providers.capabilities_of(p.provider).runs_here and p.instance_type is None:
            tried.append(_attempt(p, f"no catalog instance type has {site.gpu}"))
            _record(db, run_id, site.name, tried)
            continue
        plan = providers.SitePlan(
            run_id=run_id, site=site.name, provider=p.provider, store_url=store_url,
            region=p.region, zones=tuple(p.zones), nodes=site.nodes, workers=workers,
            instance_type=p.instance_type, spot=p.spot, options=options, owner=owner,
            provider_options=p.options(), member_key=member_key)
        row = db.add_node(run_id, site.name, p.provider, p.region)  # before the provider call
        try:
            nodes = providers.get(p.provider).launch(plan)
        except CapacityError as e:
            db.update_node(row, state="terminated", terminated_at=time.time())
            tried.append(_attempt(p, str(e)))
            _record(db, run_id, site.name, tried)
            continue
        except GeotrainError as e:
            db.update_node(row, state="terminated", terminated_at=time.time())
            tried.append(_attempt(p, str(e)))
            _record(db, run_id, site.name, tried)
            raise
        _record_nodes(db, row, run_id, site.name, p, nodes)
        db.update_site(run_id, site.name, provider=p.provider, region=p.region,
                       placement=json.dumps(p.model_dump(mode="json")),
                       placements_tried=json.dumps([asdict(a) for a in tried]),
                       usd_per_hour=usd_per_hour, launched_at=time.time())
        return nodes, p, tried
    raise CapacityError(f"site {site.name!r}: none of its {len(tried)} placement(s) could be "
                        "launched; add candidates (other zones, regions, providers, on-demand) "
                        "to the site", tried=[a.line() for a in tried])


def _attempt(p: Placement, error: str) -> Attempt:
    return Attempt(p.provider, p.region, tuple(p.zones), p.instance_type, p.spot, error)


def _record(db: StateDB, run_id: str, site: str, tried: list[Attempt]) -> None:
    db.update_site(run_id, site, placements_tried=json.dumps([asdict(a) for a in tried]))


def _record_nodes(db: StateDB, row: int, run_id: str, site: str, p: Placement,
                  nodes: list[providers.Node]) -> None:
    """Fill the row recorded before the call with node 0; add rows for the others."""
    for i, n in enumerate(nodes):
        node_row = row if i == 0 else db.add_node(run_id, site, p.provider, n.region or p.region)
        db.update_node(node_row, instance_id=n.instance_id, pid=n.pid, state="running",
                       region=n.region or p.region)

