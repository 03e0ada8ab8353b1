"""The controller: provision a run's sites, watch them, finish.

A run is created by geotrain/runs.py `create_run()`. `Controller(run_id).run()` then
provisions each site, watches heartbeats, commits and the provider's view of
the nodes, and finishes: the final model and a summary in the store, every
site torn down. It runs in the foreground under `geotrain launch`, or as its
own process (`python -m geotrain.controller RUN`) under `launch --detach`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import providers
from geotrain.budget import over_budget
from geotrain.errors import GeotrainError
from geotrain.migrate import Migrations
from geotrain.recipe import Placement, Recipe, SiteSpec, default_home
from geotrain.runs import (Kept, control_key, final_summary, log_dir, record_controller, status,
                           terminate_run, write_roster)
from geotrain.state import StateDB
from geotrain.store import RunStore
from geotrain.store.roster import KEY as ROSTER

POLL_S = 0.5
DRAIN_WAIT_S = 40.0  # how long a preempted site may take to drain before it is terminated
CONSOLE_POLL_S = 5.0  # how often a booting cloud site's console is read for a fatal line
log = logging.getLogger("geotrain.controller")


class RunFailed(GeotrainError):
    pass


class Stop(BaseException):
    """Raised in the controller's loop by SIGTERM / SIGINT: stop the run. A BaseException
    (as KeyboardInterrupt is): the signal lands wherever the loop is, also inside a call
    whose failure the controller tolerates (`except Exception`, e.g. reading a booting
    node's console), and must stop the run there, not pass for that call's failure."""



class Controller(Migrations, Kept):
    def __init__(self, run_id: str, home: Path | None = None,
                 on_tick: Callable[[dict], None] | None = None):
        self.home = home or default_home()
        self.db = StateDB(self.home)
        self.run_id = self.db.run(run_id)["id"]
        row = self.db.run(self.run_id)
        self.store = RunStore(row["store"], control=control_key(self.db, row), site_key=None)
        self.recipe = Recipe.model_validate(json.loads(row["recipe_json"]))
        self.recipe_path = row["recipe_path"]
        self._bundle = None  # what cloud nodes install (geotrain/bundle.py), made on first use
        # The run's last round: the recipe's, or earlier after `geotrain finish`.
        self.rounds_total = row["rounds_total"] or self.recipe.train.rounds
        self.sites = {s.name: s for s in self.recipe.sites}
        self.on_tick = on_tick or (lambda s: None)
        self.log_dir = log_dir(self.home, self.run_id)
        self.nodes: dict[str, list[providers.Node]] = {}
        self.launched_at: dict[str, float] = {}
        self.replacements: dict[str, int] = {}
        self.lost_at: dict[str, float] = {}  # site -> when it was declared lost, until it trains again
        # A site's name in the store (its member) and placement change when it is migrated.
        rows = {r["name"]: r for r in self.db.sites(self.run_id)}
        self.member = {n: (rows.get(n) or {}).get("member") or n for n in self.sites}
        self.override: dict[str, Placement] = {
            n: Placement.model_validate_json(rows[n]["placement"]) for n in self.sites
            if self.member[n] != n and (rows.get(n) or {}).get("placement")}
        self.migrating: dict[str, dict] = {}
        self.draining: dict[str, float] = {}  # preempted sites publishing their last work
        self.failing: dict[str, tuple[float, str]] = {}  # failed sites whose agent is leaving: (since, error)
        self.console_read: dict[str, float] = {}  # when each booting site's console was last read
        self._in_provider_call, self._stop_pending = 0, False
        self.store_move: dict | None = None
        self.started = time.time()
        # What this controller signed and keeps in the store, put back if changed there.
        write_roster(self.db, self.store, self.run_id)
        self._kept = {"run.json": self._verified_run_json(row), ROSTER: self.store.get(ROSTER)}
        self._kept_checked = time.monotonic()

    # -- events --------------------------------------------------------------------

    def event(self, kind: str, message: str, **data) -> None:
        self.store.event("controller", kind, message, **data)
        self.db.add_event(self.run_id, "controller", kind, message, **data)

    # -- lifecycle -----------------------------------------------------------------

    def run(self, resume: bool = False) -> str:
        """Drive the run to its end; returns the final state. With `resume`, take
        over the sites still running and relaunch the others."""
        record_controller(self.db, self.run_id, os.getpid(), state="running",
                          finished_at=None, error=None)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if resume:
                self.event("resumed", f"controller resumed the run (pid {os.getpid()}) at round "
                           f"{self.store.latest_global() or 0}")
            self.provision(adopt=resume)
            state = self.watch()
        except Stop:
            state = "stopped"
            self.event("stopped", "run stopped by the user")
        except Exception as e:  # noqa: BLE001 - any failure ends the run cleanly, recorded
            state = "failed"
            self.db.update_run(self.run_id, error=str(e)[:2000])
            self.event("failed", f"run failed: {e}")
        finally:  # the teardown itself is never cut short by a second signal
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.teardown()
            for s, h in previous.items():
                signal.signal(s, h)
        self.db.update_run(self.run_id, state=state, finished_at=time.time())
        self.on_tick(status(self.run_id, self.home))
        return state

    def _on_signal(self, signum, frame):
        if self._in_provider_call:  # never abandon a create/delete half-way: stop right after it
            self._stop_pending = True
            return
        raise Stop()

    @contextlib.contextmanager
    def _provider_call(self):
        """A provider call that creates or deletes nodes runs to its end even when
        `down` signals meanwhile: cut off mid-request it could leave a node whose id
        we never learn. The stop takes effect as the call returns."""
        self._in_provider_call += 1
        try:
            yield
        finally:
            self._in_provider_call -= 1
            if not self._in_provider_call and self._stop_pending:
                self._stop_pending = False
                raise Stop()

    def provision(self, adopt: bool = False) -> None:
        for site in self.recipe.sites:
            if not (adopt and self._adopt(site.name)):
                self._launch(site.name)

    def _spec(self, name: str, member: str | None = None, over: Placement | None = None) -> SiteSpec:
        """The site as launched now: under its member name, on its override placement."""
        member, over = member or self.member[name], over or self.override.get(name)
        update: dict = {"name": member} if member != name else {}
        if over:
            update.update(provider=over.provider, region=over.region, zones=list(over.zones),
                          instance_type=over.instance_type, spot=over.spot, candidates=[],
                          aws=None, gcp=None, azure=None)
            # A migration target names no options: take the recipe's for that provider.
            opts = (getattr(over, over.provider, None)
                    or self.sites[name].options_for(over.provider, over.region))
            if opts is not None:
                update[over.provider] = opts
        return self.sites[name].model_copy(update=update) if update else self.sites[name]

    def _launch_spec(self, name: str, spec: SiteSpec) -> tuple[list[providers.Node], Placement]:
        from geotrain.placement import launch_site

        # control_key: the public half of the run's control key, with which the site's
        # nodes check what the controller signs (not a secret).
        options = (("log_dir", str(self.log_dir)), ("data_site", name),
                   ("control_key", self.store.control.public_text()), *self._boot_options(spec))
        key = self._member_key(spec.name)  # the member's own signing key: boot data only
        with self._provider_call():
            nodes, placement, _ = launch_site(self.db, self.run_id, spec, store_url=self.store.url,
                                              options=options, member_key=key.private_text(),
                                              home=self.home)
        return nodes, placement

    def _boot_options(self, spec: SiteSpec) -> tuple[tuple[str, str], ...]:
        """For a site with a cloud placement: what its nodes install, in the run store
        (uploaded once per store), with freshly signed URLs."""
        from geotrain import bundle

        if all(providers.capabilities_of(p.provider).runs_here for p in spec.placements()):
            return ()
        if self._bundle is None:
            self._bundle = bundle.prepare(self.recipe, self.recipe_path, self.home)
        bundle.publish(self.store, self._bundle)
        return bundle.boot_options(self.store, self._bundle)

    def _launch(self, name: str) -> None:
        nodes, placement = self._launch_spec(name, self._spec(name))
        self.nodes[name] = nodes
        self.launched_at[name] = time.time()
        self.db.update_site(self.run_id, name, state="starting", pid=nodes[0].pid)
        self.event("site-launched", f"site {name} launched on {placement.where()}",
                   site=name, instance=nodes[0].instance_id)

    def _adopt(self, name: str) -> bool:
        """On resume: keep a site whose agent still beats; clear what is left of
        one that does not (it is relaunched). True if nothing needs launching."""
        member = self.member[name]
        hb = self.store.heartbeat(member) or {}
        if hb.get("state") == "done":
            self.nodes[name] = []
            return True
        alive = self.store.liveness().get(member)
        fresh = alive and alive.get("state") in ("starting", "running") and \
            time.time() - alive["at"] <= self._liveness_s(name)
        live = [n for p in self._providers_of(name) for n in self._query(p, member)]
        if fresh and live:
            self.nodes[name] = live
            self.launched_at[name] = alive["at"]  # its beats are this incarnation's
            self.event("site-adopted", f"site {name} still running; adopted", site=name)
            return True
        for p in self._providers_of(name):
            leftovers = self._query(p, member)
            if leftovers:
                with self._provider_call():
                    providers.get(p).terminate(leftovers)
        return False

    def _query(self, provider: str, member: str) -> list[providers.Node]:
        """The provider's nodes of one member, searched only where the db says we
        launched it (a tick must not sweep every AWS region)."""
        from geotrain.cleanup import query_run

        return query_run(self.db, self.run_id, provider, member)

    def _providers_of(self, name: str) -> list[str]:
        return sorted({pl.provider for pl in self._spec(name).placements()})

    def _liveness_s(self, name: str) -> float:
        """The site's liveness limit where it runs now (its migration target included)."""
        return max(self.recipe.sync.liveness_for(p.provider) for p in self._spec(name).placements())

    def _supervise(self, name: str, hb: dict | None, alive: dict | None) -> None:
        """Declare a site lost — its own failure (its agent reported `failed`), a
        preemption notice, its node gone, its agent silent for longer than
        sync.liveness_timeout_s, or no beat at all within sync.boot_timeout_s of
        its launch — and replace it. (`watch` notes a rejoined site first, every tick.)"""
        state = (hb or {}).get("state")
        if state == "done" or (alive or {}).get("state") in ("done", "stopped"):
            return
        now, limit = time.time(), self._liveness_s(name)
        if name in self.migrating:
            return  # the migration watches both members until it is done
        if state == "failed" or (alive or {}).get("state") == "failed":
            # One bad site never ends the run: it is lost like any other. Declared
            # lost at once; replaced once its agent has left (its last liveness
            # write is `failed`, or its node is gone), so nothing the old agent
            # still writes lands over the marks `replace` leaves for the new one.
            if name not in self.failing:
                error = self._failure(name, hb)
                self.failing[name] = (now, error)
                self.lost_at[name] = now
                last = (alive or {}).get("at")
                self.event("site-lost", f"site {name} lost: failed: {error}", site=name,
                           reason=f"failed: {error}", last_seen=last,
                           since_last_seen_s=(now - last) if last else None)
            since, error = self.failing[name]
            if (alive or {}).get("state") != "failed" and now - since < DRAIN_WAIT_S \
                    and self._site_alive(name):
                return
            del self.failing[name]
            self.replace(name, f"failed: {error}", last_seen=(alive or {}).get("at"), announce=False)
            return
        if (alive or {}).get("state") == "preempting":
            # Declared lost at once; replaced once it has drained (published its
            # partial round) and left, so two agents never write as one member.
            if name not in self.draining:
                self.draining[name] = now
                self.lost_at[name] = now
                self.event("site-lost", f"site {name} lost: preempted (draining)", site=name,
                           reason="preempted", last_seen=alive.get("at"), since_last_seen_s=0.0)
            if self._site_alive(name) and now - self.draining[name] < DRAIN_WAIT_S:
                return
            del self.draining[name]
            self.replace(name, "preempted", announce=False)
            return
        # No beat yet from the agent now launched: none at all, only the mark `replace`
        # left over the previous incarnation's record, or a record older than this
        # launch (the incarnation before a `resume`).
        booting = (not alive and not hb) or (alive or {}).get("state") == "replaced" \
            or (alive or {}).get("at", 0.0) < self.launched_at.get(name, 0.0)
        if not self._site_alive(name):
            time.sleep(POLL_S)  # let a last heartbeat land before judging the exit
            if (self.store.heartbeat(self.member[name]) or {}).get("state") == "failed":
                return  # judged as a failure next tick
            reason = "node gone"
        elif booting:
            # A site that never beat is not stale, only slow to boot, until boot_timeout_s
            # (a cloud replacement takes minutes) — unless its node says on its console
            # why it cannot boot or reach the store.
            why = self._boot_failure(name, now)
            if why:
                reason = f"node failed to boot: {why}"
            elif now - self.launched_at.get(name, now) <= self.recipe.sync.boot_timeout_s:
                return
            else:
                reason = f"never booted: no beat {now - self.launched_at[name]:.0f} s after launch"
        elif alive and now - alive["at"] > limit and now - self.launched_at.get(name, 0) > limit:
            reason = f"no liveness beat for {now - alive['at']:.1f} s"
        else:
            return
        if self._finished_since(name, alive):
            return
        self.replace(name, reason, last_seen=(alive or {}).get("at"))

    def _finished_since(self, name: str, alive: dict | None) -> bool:
        """Whether the site, judged lost on this tick's records, has said `done` since: its
        agent can finish between the tick's reads and the verdict, and its last liveness
        writes can be lost to store errors. Replacing it would throw its work away."""
        member = self.member[name]
        if (self.store.heartbeat(member) or {}).get("state") != "done" and \
                (self.store.liveness().get(member) or {}).get("state") not in ("done", "stopped"):
            return False
        self.event("site-finished-late", f"site {name} said it is done as it was about to be "
                   "declared lost; kept", site=name, last_seen=(alive or {}).get("at"))
        return True

    def _boot_failure(self, name: str, now: float) -> str | None:
        """What a booting site's node printed as its fatal line on its serial console
        (read through the provider's console API, every CONSOLE_POLL_S), or None."""
        from geotrain.site.node_info import fatal_line

        if now - self.console_read.get(name, 0.0) < CONSOLE_POLL_S:
            return None
        self.console_read[name] = now
        for node in self.nodes.get(name, []):
            if not providers.capabilities_of(node.provider).console:
                continue
            try:
                why = fatal_line(providers.get(node.provider).console(node))
            except Exception as e:  # noqa: BLE001 - a console that cannot be read is no verdict
                log.debug("console of %s unreadable: %s", node.instance_id, e)
                continue
            if why:
                return why
        return None

    def _failure(self, name: str, hb: dict | None) -> str:
        """Why a site failed: its heartbeat's error, else its last `failed` event."""
        if (hb or {}).get("state") == "failed" and hb.get("error"):
            return str(hb["error"])
        try:
            failed = [e for e in self.store.events([self.member[name]])
                      if e.get("source") == self.member[name] and e.get("kind") == "failed"]
        except Exception:  # noqa: BLE001 - the reason is best effort; the replacement is not
            failed = []
        return str(failed[-1].get("message") or "?") if failed else "its agent reported failed"

    def _note_rejoined(self, name: str, hb: dict | None) -> None:
        """A lost site whose (new) agent has trained since the loss is back."""
        if name in self.lost_at and ((hb or {}).get("first_step_at") or 0) > self.lost_at[name]:
            lost = self.lost_at.pop(name)
            self.draining.pop(name, None)
            self.event("site-rejoined", f"site {name} trains again, {hb['first_step_at'] - lost:.1f} s "
                       "after it was lost", site=name, seconds=hb["first_step_at"] - lost)

    def replace(self, name: str, reason: str, last_seen: float | None = None,
                announce: bool = True) -> None:
        """Terminate what is left of a lost site and launch it again; it catches up
        from the newest committed round and joins the first open one."""
        count = self.replacements[name] = self.replacements.get(name, 0) + 1
        now = time.time()
        self.db.update_site(self.run_id, name, lost_reason=reason[:1000], lost_at=now)
        if announce:
            self.lost_at[name] = now
            self.event("site-lost", f"site {name} lost: {reason}", site=name, reason=reason,
                       last_seen=last_seen, since_last_seen_s=(now - last_seen) if last_seen else None)
        if count > self.recipe.sync.max_replacements:
            raise RunFailed(f"site {name} was lost {count} times; giving up ({reason})")
        member = self.member[name]
        # Our own record first (a dead agent means no grace period), then whatever
        # the provider still holds under the member's tags.
        with self._provider_call():
            if self.nodes.get(name):
                providers.get(self.nodes[name][0].provider).terminate(self.nodes[name])
            for p in self._providers_of(name):
                nodes = self._query(p, member)
                if nodes:
                    providers.get(p).terminate(nodes)
        for row in self.db.nodes(self.run_id):
            if row["site"] == member and row["state"] != "terminated":
                self.db.update_node(row["id"], state="terminated", terminated_at=now)
        # What the old agent last wrote (running, preempting, failed) must not be read
        # as the replacement's: mark the member replaced until the new agent beats.
        key = self._member_key(member)  # the controller speaks for a member it replaced
        self.store.alive(member, "replaced", signer=key, replacement=count)
        self.store.beat(member, {"state": "replaced", "replacement": count}, signer=key)
        self._launch(name)
        self.event("site-replaced", f"site {name} replaced (replacement {count})", site=name)

    def newest_decided(self) -> int:
        """The newest round whose members are decided (it may not be committed yet)."""
        decided = self.store.latest_global() or 0
        while self.store.members(decided + 1) is not None:
            decided += 1
        return decided

    def start_finish(self) -> None:
        """End the run early: the round after the one being trained now becomes
        the last, for every site (they read it from the store at each round's
        start); the run then finishes as usual, with its final model."""
        if self.rounds_total < self.recipe.train.rounds:
            self.event("finishing", f"already finishing at round {self.rounds_total}",
                       at_round=self.rounds_total)
            return
        at = min(self.newest_decided() + 2, self.rounds_total)
        self.store.request_finish(at)
        self.rounds_total = at
        self.db.update_run(self.run_id, rounds_total=at)
        self.event("finishing", f"asked to finish: round {at} is the run's last", at_round=at)

    def watch(self) -> str:
        seen_round = -1
        while True:
            self._poll_requests()
            self._guard_kept()
            self._advance_migrations()
            self._advance_store_migration()
            beats = {s.name: self.store.heartbeat(self.member[s.name]) for s in self.recipe.sites}
            for name, hb in beats.items():
                if hb:
                    self.db.update_site(self.run_id, name, state=hb["state"], round=hb.get("round"),
                                        step=hb.get("step"), loss=hb.get("loss"),
                                        tokens_per_s=hb.get("tokens_per_s"),
                                        bytes_sent=hb.get("bytes_sent"))
            latest = self.store.latest_global() or 0
            if latest != seen_round:
                evaluated = self.store.read_eval(latest)
                if evaluated or latest == 0:
                    seen_round = latest
                self.db.update_run(self.run_id, rounds_done=latest,
                                   eval_loss=(evaluated or {}).get("eval_loss"))
            firsts = [hb.get("first_step_at") if hb else None for hb in beats.values()]
            if all(firsts) and self.db.run(self.run_id)["first_step_at"] is None:
                self.db.update_run(self.run_id, first_step_at=max(firsts))
            self.on_tick(status(self.run_id, self.home))
            if over_budget(self.db, self.run_id, self.recipe, self.home, self.event):
                return "stopped"

            # A failed site is not the run's end: `_supervise` replaces it like a lost
            # one, and the run fails only once a site has used up its replacements.
            for name, hb in beats.items():  # before finishing: one may rejoin in the last round
                self._note_rejoined(name, hb)
            if latest >= self.rounds_total and all(hb and hb["state"] == "done" for hb in beats.values()):
                self.finish(latest)
                return "succeeded"
            alive = self.store.liveness()
            for name in beats:
                self._supervise(name, beats[name], alive.get(self.member[name]))
            time.sleep(POLL_S)

    def _site_alive(self, name: str) -> bool:
        """Whether the provider still holds the node we launched for the site."""
        nodes = self.nodes.get(name)
        provider = nodes[0].provider if nodes else self._spec(name).provider
        live = {n.instance_id for n in self._query(provider, self.member[name])}
        return any(n.instance_id in live for n in self.nodes.get(name, []))

    def finish(self, last_round: int) -> None:
        self._guard_kept(now=True)  # the store left behind holds what this controller signed
        try:
            model, summary = final_summary(self.store, self.recipe, self.db.run(self.run_id),
                                           last_round)
        except GeotrainError as e:
            raise RunFailed(str(e)) from None
        self.store.write_final(model, summary)
        eval_loss = summary["eval_loss"]
        self.db.update_run(self.run_id, rounds_done=last_round, eval_loss=eval_loss)
        loss = f", eval loss {eval_loss:.4f}" if eval_loss is not None else ""
        self.event("finished", f"run finished: {last_round} rounds{loss}")

    def teardown(self) -> None:
        """Stop every site of the run: by our records and by the provider's tags."""
        members = set(self.member.values()) | {m["new"] for m in self.migrating.values()}
        for member in sorted(members):
            hb = self.store.heartbeat(member)
            if hb and hb["state"] not in ("done", "failed"):
                self.store.send_command(member, "stop")
        terminated = terminate_run(self.db, self.run_id)
        for site in self.recipe.sites:
            hb = self.store.heartbeat(self.member[site.name])
            self.db.update_site(self.run_id, site.name, state=hb["state"] if hb else "stopped")
        if terminated:
            self.event("teardown", f"terminated {len(terminated)} node(s)")


if __name__ == "__main__":
    final = Controller(sys.argv[1]).run(resume="--resume" in sys.argv[2:])
    sys.exit(0 if final == "succeeded" else 1)
