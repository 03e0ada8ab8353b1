"""Moving a live run: a site to another provider or region, make-before-break;
or the whole run store to another backend.

`geotrain migrate RUN --site S --to PROVIDER[:REGION[:INSTANCE]]` asks the
run's controller (through the state db on the operator's machine, never the
run store, which nodes can write) to move site S. The controller then, without stopping anything:

1. launches S again on the new placement under a new member name `S~k`,
   training S's own data shard beside the old member;
2. waits until a round's decision has accepted a contribution of the new
   member (it has joined);
3. tells the old member to stop, waits for it to leave, terminates its
   nodes, and from then on knows S by its new member and placement.

The site's shard is never without a trainer, so the migration's downtime is
the time between the old member stopping and the new one's first step — zero
when the new one trained first, which is what step 2 guarantees.

`geotrain migrate RUN --store URL` moves the run store while the run goes on:

1. the controller copies the store to URL (`store_copy.copy_run`: checksums
   verified, markers last, so the copy is valid at every instant; the old
   store is left intact);
2. it asks every site, through `control/switch.json` in the old store (signed
   with the run's control key), to publish
   round A = (newest decided round + 2) and later to the new store;
3. once round A-1 is committed in the old store it copies again (only what
   changed), marks the new store ready, and switches itself; each site moves
   before publishing round A (its trainer) or within a second (its agent).
Rounds stay strictly increasing with no gap: rounds < A live in both stores,
A and later only in the new one.
"""

from __future__ import annotations

import json
import threading
import time

import providers
from geotrain.errors import GeotrainError
from geotrain.recipe import Placement

JOIN_TIMEOUT_S = 600.0
DRAIN_TIMEOUT_S = 60.0


def parse_target(to: str) -> Placement:
    """'PROVIDER[:REGION[:INSTANCE]]' -> a Placement (typed errors for bad input)."""
    parts = to.split(":")
    if not parts[0] or len(parts) > 3 or parts[0] not in providers.PROVIDERS:
        raise GeotrainError(f"--to {to!r}: expected PROVIDER[:REGION[:INSTANCE]] with PROVIDER one "
                            f"of {', '.join(providers.PROVIDERS)}")
    region = parts[1] if len(parts) > 1 and parts[1] else None
    instance = parts[2] if len(parts) > 2 and parts[2] else None
    return Placement(provider=parts[0], region=region, instance_type=instance)


def target_problem(recipe, store_url: str, site: str | None = None, to: str | None = None,
                   new_store: str | None = None) -> str | None:
    """Why a migration could not work on the nodes it would need (None: it can): a site
    moved to a cloud whose nodes the recipe gives no way into the run store, or a store
    moved where the run's cloud sites could not reach it. Asked before the request is sent."""
    from geotrain.checks import placement_store_access, store_access

    if new_store is not None:
        scoped = store_scoped_sites(recipe)
        if scoped:
            return (f"cannot move the store to {new_store}: the nodes of {', '.join(scoped)} are "
                    "granted only this run's folder of the current store (aws.run_role, "
                    "gcp.run_account, azure.store_scope), and a move does not carry grants "
                    "yet; migrate those sites to a placement without it first, or keep the store")
        moved = recipe.model_copy(update={"store": recipe.store.model_copy(update={"url": new_store})})
        problem = store_access(moved)
        return f"cannot move the store to {new_store}: {problem}" if problem else None
    spec = next((s for s in recipe.sites if s.name == site), None)
    if spec is None or to is None:
        return None  # the controller names an unknown site
    target = parse_target(to)
    i = recipe.sites.index(spec)
    problem = placement_store_access(target.provider, spec.options_for(target.provider, target.region),
                                     store_url, f"site {site} on {to}", f"sites[{i}].{target.provider}")
    if problem:
        return (f"{problem}; a run migrates only to a provider whose node options the recipe "
                f"gives the site (e.g. as one of its candidates)")
    return None


def store_scoped_sites(recipe) -> list[str]:
    """The sites some placement of which has its store access made by launch for this run's
    folder of the current store (aws.run_role, gcp.run_account; azure.store_scope), as
    'site NAME'."""
    out = []
    for site in recipe.sites:
        for p in site.placements():
            opts = p.options()
            if (opts is not None and opts.makes_run_resources()) or getattr(opts, "store_scope", None):
                out.append(f"site {site.name}")
                break
    return out


class Migrations:
    """The controller's side of migrations (mixed into Controller)."""

    def _poll_requests(self) -> None:
        """What the CLI asked of this run (the state db, on this machine only)."""
        for c in self.db.take_requests(self.run_id):
            if c["kind"] == "finish":
                self.start_finish()
            elif c["kind"] == "migrate-store":
                try:
                    self._start_store_migration(c["to"])
                except GeotrainError as e:
                    self.event("migrate-failed", f"moving the store to {c.get('to')}: {e}",
                               site=None, store=c.get("to"), error=str(e))
            elif c["kind"] == "migrate-site":
                try:
                    self._start_migration(c["target"], parse_target(c["to"]))
                except GeotrainError as e:
                    self.event("migrate-failed", f"migrating site {c.get('target')}: {e}",
                               site=c.get("target"), error=str(e))

    def _start_migration(self, name: str, to: Placement) -> None:
        if name not in self.sites:
            raise GeotrainError(f"no site {name!r} in this run; sites: {', '.join(self.sites)}")
        if name in self.migrating:
            raise GeotrainError(f"site {name} is already being migrated")
        old = self.member[name]
        generation = int(old.rsplit("~", 1)[1]) + 1 if "~" in old else 1
        new = f"{name}~{generation}"
        spec = self.sites[name]
        to = to.model_copy(update={"spot": spec.spot, "zones": to.zones or []})
        self.event("migrate-started", f"site {name}: starting {new} on {to.where()} beside {old}",
                   site=name, member=new, to=to.model_dump(mode="json"))
        nodes, placement = self._launch_spec(name, self._spec(name, member=new, over=to))
        self.migrating[name] = {"new": new, "old": old, "nodes": nodes, "placement": placement,
                                "old_nodes": list(self.nodes.get(name, [])),
                                "t0": time.time(), "phase": "joining",
                                "from_round": self.store.latest_global() or 0}

    def _accepted(self, member: str, from_round: int) -> int | None:
        r = from_round + 1
        while (decision := self.store.members(r)) is not None:
            if any(e["site"] == member for e in decision["accepted"]):
                return r
            r += 1
        return None

    def _advance_migrations(self) -> None:
        for name, m in list(self.migrating.items()):
            now = time.time()
            new_state = (self.store.heartbeat(m["new"]) or {}).get("state")
            if m["phase"] == "joining":
                joined = self._accepted(m["new"], m["from_round"])
                if new_state == "failed" or (joined is None and now - m["t0"] > JOIN_TIMEOUT_S):
                    self._abort_migration(name, m, "the new member failed" if new_state == "failed"
                                          else f"it did not join a round within {JOIN_TIMEOUT_S:g} s")
                elif joined is not None:
                    m.update(phase="draining", drain_at=now, join_s=now - m["t0"], joined=joined)
                    self.store.send_command(m["old"], "stop")
                    self.event("migrate-joined", f"site {name}: {m['new']} joined round {joined}; "
                               f"draining {m['old']}", site=name, round=joined, join_s=m["join_s"])
            elif m["phase"] == "draining":
                old_nodes = [n for p in self._providers_of(name)
                             for n in self._query(p, m["old"])]
                ours = {n.instance_id for n in m["old_nodes"]}
                if any(n.instance_id in ours for n in old_nodes) and \
                        now - m["drain_at"] < DRAIN_TIMEOUT_S:
                    continue  # the old member is still leaving
                self._finish_migration(name, m, old_nodes)

    def _finish_migration(self, name: str, m: dict, old_nodes: list) -> None:
        if old_nodes:
            providers.get(old_nodes[0].provider).terminate(old_nodes)
        stopped_at = time.time()
        for row in self.db.nodes(self.run_id):
            if row["site"] == m["old"] and row["state"] != "terminated":
                self.db.update_node(row["id"], state="terminated", terminated_at=stopped_at)
        first_step = (self.store.heartbeat(m["new"]) or {}).get("first_step_at") or stopped_at
        self.member[name], self.override[name] = m["new"], m["placement"]
        self.nodes[name], self.launched_at[name] = m["nodes"], time.time()
        self.db.update_site(self.run_id, name, member=m["new"], provider=m["placement"].provider,
                            region=m["placement"].region,
                            placement=json.dumps(m["placement"].model_dump(mode="json")))
        downtime = max(0.0, first_step - m["drain_at"])
        self.event("site-migrated", f"site {name} moved to {m['placement'].where()} as {m['new']} "
                   f"in {stopped_at - m['t0']:.1f} s; downtime {downtime:.1f} s", site=name,
                   member=m["new"], seconds=stopped_at - m["t0"], join_s=m["join_s"],
                   downtime_s=downtime, overlap_s=m["drain_at"] - first_step)
        del self.migrating[name]

    def _abort_migration(self, name: str, m: dict, why: str) -> None:
        nodes = [n for p in {m["placement"].provider}
                 for n in self._query(p, m["new"])]
        if nodes:
            providers.get(m["placement"].provider).terminate(nodes)
        for row in self.db.nodes(self.run_id):  # as _finish_migration does for the old member
            if row["site"] == m["new"] and row["state"] != "terminated":
                self.db.update_node(row["id"], state="terminated", terminated_at=time.time())
        self.event("migrate-failed", f"site {name}: migration abandoned ({why}); {m['old']} "
                   "goes on", site=name, error=why)
        del self.migrating[name]


    # -- the whole store ----------------------------------------------------------------

    def _start_store_migration(self, to: str) -> None:
        from geotrain.store import RunStore

        if self.store_move:
            raise GeotrainError("the run store is already being moved")
        RunStore(to)  # a bad URL fails here, with the valid schemes
        self.store_move = {"to": to.rstrip("/"), "phase": "copying", "t0": time.time()}
        self.event("migrate-store-started", f"copying the run store to {to}", store=to)
        self._copy_in_background()

    def _copy_in_background(self) -> None:
        from geotrain.store_copy import copy_run

        move = self.store_move

        def work() -> None:
            try:
                move["report"] = copy_run(self.store.url, move["to"])
            except Exception as e:  # noqa: BLE001 - reported by the watch loop
                move["error"] = e
        move["thread"] = threading.Thread(target=work, name="store-copy", daemon=True)
        move["thread"].start()

    def _advance_store_migration(self) -> None:
        from geotrain.store import RunStore

        move = self.store_move
        if not move or move["thread"].is_alive():
            return
        if "error" in move:
            self.event("migrate-failed", f"moving the store to {move['to']} failed: {move['error']}; "
                       "the run goes on in the old store", store=move["to"], error=str(move["error"]))
            self.store_move = None
            return
        if move["phase"] == "copying":
            move["at_round"] = self.newest_decided() + 2
            if move["at_round"] > self.rounds_total:
                self.event("migrate-failed", "too close to the end of the run to move the store",
                           store=move["to"], error="too late")
                self.store_move = None
                return
            self.store.request_switch(move["to"], move["at_round"])
            move["phase"] = "waiting"
        elif move["phase"] == "waiting" and self.store.is_committed(move["at_round"] - 1):
            move["phase"] = "final"
            self._copy_in_background()
        elif move["phase"] == "final":
            old = self.store.url
            RunStore(move["to"], control=self.store.control, site_key=None).mark_switch_ready(
                move["at_round"])
            self.store.switch(move["to"])
            self.db.update_run(self.run_id, store=move["to"])
            now = time.time()
            for name in self.sites:  # their beats move over within a second or two
                self.launched_at[name] = now
            report = move["report"]
            self.event("store-migrated", f"run store moved from {old} to {move['to']} at round "
                       f"{move['at_round']} in {now - move['t0']:.1f} s", store=move["to"],
                       previous=old, at_round=move["at_round"], seconds=now - move["t0"],
                       copied_bytes=report.bytes_copied)
            self.store_move = None


def request_store_migration(db, run_id: str, to: str) -> float:
    """Ask the run's controller (through the state db) to move the run store to `to`;
    returns the request time."""
    from geotrain.store import RunStore

    RunStore(to, control=None, site_key=None)  # refuse a malformed URL before asking
    return db.add_request(run_id, "migrate-store", to=to)


def request_site_migration(db, run_id: str, site: str, to: str) -> float:
    """Ask the run's controller (through the state db) to migrate `site`; returns the
    request time."""
    parse_target(to)  # refuse a malformed target before asking
    return db.add_request(run_id, "migrate-site", target=site, to=to)
