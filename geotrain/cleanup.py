"""Leave nothing running: terminate a run's nodes, and find orphans across providers.

`terminate_run(db, run)` terminates what the state db recorded for the run (every node
row not yet terminated that has an instance id) *and* what each provider finds by the
run's tags — the db catches nodes whose tags never landed, the tags catch nodes created
after a crash between the provider call and the db update.

`down_orphans(home)` asks every provider that can list by tag (`query_all`, optional in
the contract) for every geotrain-tagged node that carries this operator's owner id (the
`geotrain-owner` tag every launch from this GEOTRAIN_HOME writes; geotrain/state.py
`owner_id`), and terminates those whose run the state db does not know, or says is
finished, failed or stopped — and, of a run whose controller died (abandoned), the nodes
the db never recorded (created by a call in flight when the controller died). A node
with another owner id, or none (a teammate's, CI's, or launched before owner ids), is
never touched: this db cannot know whether its run is over. `dry_run` lists what would
be terminated and terminates nothing; `confirm` is asked, with the list, before anything
is terminated. A provider module that does not exist yet, cannot list, or fails is
reported as skipped, never raised.

Some providers make resources for a run's sites beside their nodes (`RunResources`: an
AWS run role, aws.run_role; a GCP run service account, gcp.run_account), which `terminate` removes with a site's last node. What a
launch killed before any node existed left, `terminate_run` removes for its run (when
its recipe makes such resources) and `down_orphans` for this operator's runs that are
over or unknown here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import providers
from geotrain.checks import redact
from geotrain.recipe import default_home
from geotrain.state import StateDB, owner_id

OVER = ("succeeded", "failed", "stopped")


def _module(name: str):
    try:
        return providers.get(name)
    except ModuleNotFoundError as e:
        if e.name == f"providers.{name}":
            return None
        raise


def recorded_regions(db: StateDB, run_id: str, provider: str,
                     site: str | None = None) -> list[str] | None:
    """The regions the state db says the run (or one site) ever asked `provider`
    for — every attempt is recorded before its call, so no node of the run can be
    elsewhere. None (search everywhere) when an attempt left the region to the
    provider, or when nothing is recorded."""
    rows = [r for r in db.nodes(run_id) if r["provider"] == provider
            and (site is None or r["site"] == site)]
    if not rows or any(not r["region"] for r in rows):
        return None
    return sorted({r["region"] for r in rows})


def query_run(db: StateDB, run_id: str, provider: str, site: str | None = None) -> list[providers.Node]:
    """`provider.query` for the run (or one site), searching only the recorded regions."""
    return providers.get(provider).query(run_id, site,
                                         regions=recorded_regions(db, run_id, provider, site))


def terminate_run(db: StateDB, run_id: str) -> list[providers.Node]:
    """Terminate every node of a run the state db or the providers' tags know of
    (the tags searched in the regions the db recorded; see recorded_regions)."""
    rows = db.nodes(run_id)
    gone: list[providers.Node] = []
    for name in sorted({r["provider"] for r in rows}):
        provider = _module(name)
        if provider is None:
            continue
        live = provider.query(run_id, regions=recorded_regions(db, run_id, name))
        known = {n.instance_id for n in live}
        recorded = [providers.Node(run_id, r["site"], name, r["instance_id"], "running",
                                   pid=r["pid"], region=r["region"])
                    for r in rows if r["provider"] == name and r["instance_id"]
                    and r["state"] != "terminated" and r["instance_id"] not in known]
        if live or recorded:
            gone += provider.terminate(live + recorded)
    for r in rows:
        if r["state"] != "terminated":
            db.update_node(r["id"], state="terminated", terminated_at=time.time())
    remove_run_leftovers(db, run_id)
    return gone


def run_resource_providers(db: StateDB, run_id: str) -> list[str]:
    """The providers on which the run's recipe has launch make resources beside the nodes
    (a placement whose options say so: aws.run_role, gcp.run_account)."""
    from geotrain.recipe import Recipe

    raw = db.run(run_id).get("recipe_json")
    try:
        recipe = Recipe.model_validate(json.loads(raw)) if raw else None
    except (ValueError, TypeError):
        return []
    if recipe is None:
        return []
    return sorted({p.provider for s in recipe.sites for p in s.placements()
                   if p.options() is not None and p.options().makes_run_resources()})


def remove_run_leftovers(db: StateDB, run_id: str) -> list[providers.Leftover]:
    """Remove what launch made for the run's sites beside their nodes (run roles) and
    `terminate` left, because no node of that site was ever made (a launch killed half-way)
    or a node outlived the controller's teardown."""
    import logging

    gone: list[providers.Leftover] = []
    for name in run_resource_providers(db, run_id):
        provider = providers.get(name)
        if not providers.capabilities_of(name).run_resources:
            continue
        try:
            gone += provider.remove(provider.leftovers(run_id))
        except Exception as e:  # noqa: BLE001 - the nodes are gone; this must not undo that
            logging.getLogger("geotrain.cleanup").warning(
                "%s: could not remove what run %s made beside its nodes (%s); `geotrain down "
                "--orphans` removes it later", name, run_id, redact(str(e))[:200])
    return gone


def abandoned(run: dict) -> bool:
    """A run the db says is running whose controller process is gone (killed,
    crashed, the machine rebooted): nothing watches its nodes any more."""
    from geotrain.runs import controller_alive

    return run["state"] == "running" and not controller_alive(run)


def find_orphans(db: StateDB) -> tuple[list[providers.Node], list[dict], int]:
    """(this operator's orphaned nodes, skipped providers, how many tagged nodes of
    runs unknown here or over were left alone because another owner id, or none, is
    on them). See `down_orphans`."""
    me = owner_id(db.path.parent)
    runs = {r["id"]: r["state"] for r in db.runs()}
    recorded = {r["id"]: {n["instance_id"] for n in db.nodes(r["id"]) if n["instance_id"]}
                for r in db.runs() if abandoned(r)}

    def orphaned(n: providers.Node) -> bool:
        if n.run_id in recorded:
            return n.instance_id not in recorded[n.run_id]
        return n.run_id not in runs or runs[n.run_id] in OVER

    found, skipped, others = [], [], 0
    for name in providers.PROVIDERS:
        try:
            provider = _module(name)
            if provider is None:
                skipped.append({"provider": name, "reason": "not implemented"})
                continue
            candidates = [n for n in provider.query_all() if orphaned(n)]
            found += [n for n in candidates if n.owner == me]
            others += sum(1 for n in candidates if n.owner != me)
        except Exception as e:  # noqa: BLE001 - one provider failing must not stop the others
            skipped.append({"provider": name, "reason": f"{type(e).__name__}: {redact(str(e))[:200]}"})
    return found, skipped, others


def down_orphans(home: Path | None = None, *, dry_run: bool = False,
                 confirm: Callable[[list[providers.Node]], bool] | None = None) -> dict:
    """Terminate every node carrying this operator's owner id whose run is unknown
    here or over, and every such node of an abandoned run (see `abandoned`) that the
    db never recorded — one created by a call whose answer the dead controller never
    wrote down. An abandoned run's recorded nodes are kept: `geotrain resume` adopts
    them, `geotrain down RUN` ends them. With `dry_run`, or when `confirm(nodes)`
    says no, nothing is terminated. Also removes what launch made beside the nodes for
    such runs (run roles: `_orphaned_leftovers`), unless dry_run or declined. Returns
    {"terminated": [node...], "found": [node...] (found), "others": n (another owner's,
    left alone), "dry_run": bool, "declined": bool, "skipped": [{"provider", "reason"}],
    "leftovers": [leftover...] (found), "removed": [leftover...]}."""
    db = StateDB(home or default_home())
    runs = {r["id"]: r["state"] for r in db.runs()}
    recorded = {r["id"] for r in db.runs() if abandoned(r)}
    found, skipped, others = find_orphans(db)
    leftovers = _orphaned_leftovers(db)
    result = {"terminated": [], "found": [asdict(n) for n in found], "others": others,
              "dry_run": dry_run, "declined": False, "skipped": skipped,
              "leftovers": [asdict(x) for x in leftovers], "removed": []}
    if dry_run or not (found or leftovers):
        return result
    if found and confirm is not None and not confirm(found):
        result["declined"] = True
        return result
    terminated = _per_provider(found, lambda p, items: p.terminate(items), skipped)
    gone = {n.instance_id for n in terminated}
    for run_id in sorted({n.run_id for n in terminated} & set(runs)):
        for r in db.nodes(run_id, live_only=True):
            # An abandoned run keeps its recorded nodes; its in-flight row (no id) is settled.
            if run_id not in recorded or r["instance_id"] in gone or not r["instance_id"]:
                db.update_node(r["id"], state="terminated", terminated_at=time.time())
    result["terminated"] = [asdict(n) for n in terminated]
    removed = _per_provider(leftovers, lambda p, items: p.remove(items), skipped)
    result["removed"] = [asdict(x) for x in removed]
    return result


def _per_provider(items: list, act: Callable, skipped: list[dict]) -> list:
    """`act(provider module, its items)` for each provider among `items` (each has a
    `provider`); what they return, concatenated. A provider that fails is added to
    `skipped` with why, and the others go on."""
    done: list = []
    for name in sorted({x.provider for x in items}):
        try:
            done += act(providers.get(name), [x for x in items if x.provider == name])
        except Exception as e:  # noqa: BLE001 - one provider failing must not stop the others
            skipped.append({"provider": name, "reason": f"{type(e).__name__}: {redact(str(e))[:200]}"})
    return done


def _orphaned_leftovers(db: StateDB) -> list[providers.Leftover]:
    """What launch made beside the nodes (run roles, run accounts) for runs launched from this home
    (its owner id) that the db does not know or says are over: `terminate` removes a
    site's once its last node is gone, so these are a launch's killed before any node
    was made. Best effort: a provider that cannot list them (no IAM rights: those are
    needed only with aws.run_role / gcp.run_account) is passed over, with a warning in the log."""
    import logging

    me = owner_id(db.path.parent)
    runs = {r["id"]: r["state"] for r in db.runs()}
    found: list[providers.Leftover] = []
    for name in providers.PROVIDERS:
        if _module(name) is None or not providers.capabilities_of(name).run_resources:
            continue
        try:
            found += [x for x in providers.get(name).leftovers() if x.owner == me
                      and (x.run_id not in runs or runs[x.run_id] in OVER)]
        except Exception as e:  # noqa: BLE001 - a sweep of leftovers never stops down
            logging.getLogger("geotrain.cleanup").warning(
                "%s: could not list per-run resources: %s", name, redact(str(e))[:200])
    return found
