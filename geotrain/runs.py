"""Runs on this machine: create one, read its status, stop it, resume it.

`create_run()` writes everything a run needs to the run store (run.json,
signed with the run's new control key, and the round-0 global model) and the
state db. `detach()` starts its controller (geotrain/controller.py) as its own
process; `status()` reads the state db; `down()` stops a run wherever its
controller is and leaves nothing running; `prepare_resume()` checks that a
run can be taken over here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import providers
from geotrain import __version__, procs
from geotrain.errors import GeotrainError
from geotrain.recipe import Recipe, default_home
from geotrain.state import StateDB, iso, open_private, private_dir
from geotrain.store import RunStore, round_key, run_url
from geotrain.store.control import ControlKey, ForgedRecord
from geotrain.store.roster import KEY as ROSTER

DOWN_WAIT_S = 90.0  # how long `down` waits for the controller to stop its own sites
FINAL_STATES = ("succeeded", "failed", "stopped")
KEPT_CHECK_S = 10.0  # how often the controller checks that run.json and the roster are its own


def new_run_id(name: str) -> str:
    return f"{name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def preflight(recipe: Recipe, recipe_path: str) -> None:
    """What must hold before anything is created: every provider usable, the
    data there, the run store's root writable. Raises a GeotrainError that says
    what to fix."""
    from geotrain.checks import data_access, store_access
    from geotrain.errors import ProviderError, RecipeError
    from geotrain.train.data import glob_files

    for check_ in (store_access, data_access):  # before any provider is called
        if (problem := check_(recipe)) is not None:
            raise RecipeError(recipe_path, None, "", problem)
    for name in sorted({s.provider for s in recipe.sites}):
        check = providers.get(name).check()
        if not check.ok:
            raise ProviderError(f"provider {name} is not usable here: {check.detail}")
    if recipe.train.entrypoint and any(providers.capabilities_of(s.provider).runs_here
                                        for s in recipe.sites):
        import importlib.util

        module = recipe.train.entrypoint.partition(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            raise RecipeError(recipe_path, None, "train.entrypoint",
                              f"module '{module}' is not importable here (install it, or add its "
                              "folder to PYTHONPATH)")
    if recipe.data.source == "files":
        try:
            glob_files(recipe.data.paths)
        except ValueError as e:
            raise RecipeError(recipe_path, None, "data.paths", str(e)) from None
    from geotrain.store_check import check_writable

    check_writable(recipe.store_root())  # the store's bucket/folder exists and takes writes
    from geotrain import bundle

    if bundle.needs_bundle(recipe):  # what cloud nodes will install: built (and cached) now
        bundle.prepare(recipe, recipe_path)


def run_info(run_id: str, recipe: Recipe, url: str, created_at: float,
             initial: str | None) -> dict:
    """What run.json holds: the sites read their recipe (roster, data, code) from it, and
    the hash of round 0's model (the built-in trainer's; a user's entrypoint commits its
    own), so that round 0 too is what the operator signed."""
    return {"id": run_id, "name": recipe.name, "created_at": created_at, "version": __version__,
            "recipe": recipe.to_dict(), "members": [s.name for s in recipe.sites], "store": url,
            "initial_hash": initial}


def initial_hash(recipe: Recipe) -> str | None:
    """The params hash of the built-in trainer's round-0 model (None with an entrypoint)."""
    if recipe.train.entrypoint:
        return None
    from geotrain.sync.diloco import params_hash
    from geotrain.train.trainer import initial_state

    return params_hash(initial_state(recipe))


def create_run(recipe: Recipe, recipe_path: str, home: Path | None = None) -> str:
    """Write run.json and the round-0 global state; record the run. Returns its id."""
    from geotrain.sync.diloco import encode, params_hash
    from geotrain.train.trainer import initial_state

    home = home or default_home()
    run_id = new_run_id(recipe.name)
    url = run_url(recipe.store_root(), run_id)
    # The run's control key signs run.json and every later control record; only this
    # machine's state db holds it (nodes get the public half in their boot data).
    key = ControlKey.generate()
    store = RunStore(url, control=key, site_key=None)
    members = [s.name for s in recipe.sites]
    params = None if recipe.train.entrypoint else initial_state(recipe)  # a user's model:
    digest = None if params is None else params_hash(params)  # the sites commit round 0
    store.write_run(run_info(run_id, recipe, url, time.time(), digest))
    if params is not None:
        store.commit_global(0, {"model.safetensors": encode(params)},
                            {"hash": digest, "members": members})
    db = StateDB(home)
    db.add_run(run_id, recipe.name, recipe_path, recipe.to_dict(), url, recipe.train.rounds,
               [{"name": s.name, "provider": s.provider, "region": s.region} for s in recipe.sites])
    db.update_run(run_id, control_key=key.private_text())
    for name in members:  # each site's own signing key, and the signed roster of them
        member_key(db, store, run_id, name)
    store.event("controller", "created", f"run {run_id} created", store=url)
    return run_id


def member_key(db: StateDB, store: RunStore, run_id: str, member: str) -> ControlKey:
    """The signing key of one member of a run (geotrain/store/roster.py), from the state
    db; a member without one (a new run, a migrated member `name~k`) gets one, and the
    roster in the store (signed with `store`'s control key) is rewritten to hold it."""
    keys = json.loads(db.run(run_id).get("member_keys") or "{}")
    if member not in keys:
        keys[member] = ControlKey.generate().private_text()
        db.update_run(run_id, member_keys=json.dumps(keys))
        write_roster(db, store, run_id)
    return ControlKey.from_private(keys[member])


def write_roster(db: StateDB, store: RunStore, run_id: str) -> None:
    """control/roster.json: every member of the run with its public key, signed."""
    keys = json.loads(db.run(run_id).get("member_keys") or "{}")
    store.write_roster({m: ControlKey.from_private(k).public_text() for m, k in sorted(keys.items())})


def control_key(db: StateDB, row: dict) -> ControlKey:
    """A run's control key, from the state db; a run created before runs had one gets one
    now (the nodes launched from then on get its public half)."""
    if row.get("control_key"):
        return ControlKey.from_private(row["control_key"])
    key = ControlKey.generate()
    db.update_run(row["id"], control_key=key.private_text())
    return key


def signed_run_json(store: RunStore, info: Callable[[], dict]) -> bytes | None:
    """run.json's bytes if the store's control key signed them; else None, after writing
    `info()` there, signed (run.json was changed in the store, or is from before runs
    were signed)."""
    try:
        raw = store.get("run.json")
        store.control.open(json.loads(raw), "run")
        return raw
    except (FileNotFoundError, ValueError, ForgedRecord):
        store.write_run(info())
        return None


def _site_ranks(store: RunStore, recipe: Recipe) -> dict[str, int]:
    """Ranks per site as its agent counted them (its last `group` event: `workers: auto`
    is known only there), for the summary's token estimate. Site-written, so only a
    whole number within what the site could run counts; anything else is ignored."""
    bound = {s.name: s.most_workers() * s.nodes for s in recipe.sites}
    ranks: dict[str, int] = {}
    for e in store.events(list(bound)):
        site, world = e.get("source"), e.get("world")
        if e.get("kind") == "group" and site in bound and type(world) is int \
                and 1 <= world <= bound[site]:
            ranks[site] = world
    return ranks


def final_summary(store: RunStore, recipe: Recipe, run: dict, last_round: int) -> tuple[bytes, dict]:
    """(the final model's bytes, final/summary.json) of a run that ended at `last_round`:
    its committed state, once it checks against what the sites ended that round with
    (geotrain/sync/joining.py); a GeotrainError if it does not."""
    from geotrain.sync.diloco import decode, params_hash
    from geotrain.sync.joining import state_problem
    from geotrain.sync.rounds import member_base

    files, manifest = store.read_global(last_round)
    if "model.safetensors" not in files:  # the sites commit the state of the last round
        raise GeotrainError(f"round {last_round} was committed without its global state")
    members = {s.name for s in recipe.sites}
    why = state_problem(store, last_round, params_hash(decode(files["model.safetensors"])),
                        manifest, lambda s: member_base(s) in members)
    if why:
        raise GeotrainError(f"round {last_round}'s committed state is not the run's: {why}")
    history = []
    for r in store.committed_rounds():
        m = store.global_manifest(r)
        history.append({"round": r, "eval_loss": (store.read_eval(r) or {}).get("eval_loss"),
                        "hash": m["hash"], "members": m.get("members"),
                        "results": {s: v.get("hash") for s, v in store.results(r).items()}})
    t = recipe.train
    ranks = _site_ranks(store, recipe)
    per_round = sum(ranks.get(s.name, (1 if s.workers == "auto" else s.workers) * s.nodes)
                    for s in recipe.sites)
    tokens = last_round * t.inner_steps * t.batch_size * t.seq_len * per_round
    summary = {"run": run["id"], "rounds": last_round,
               "eval_loss": (store.read_eval(last_round) or {}).get("eval_loss"),
               "hash": manifest["hash"], "tokens": tokens, "wall_s": time.time() - run["started_at"],
               "first_step_s": (run["first_step_at"] - run["started_at"]) if run["first_step_at"] else None,
               "history": history, "global_round": round_key(last_round)}
    return files["model.safetensors"], summary


def log_dir(home: Path, run_id: str) -> Path:
    """Where this machine keeps a run's process logs (not in the run store)."""
    return home / "logs" / run_id


def pid_alive(pid: int | None) -> bool:
    """Some process has this pid and is not a zombie. Whether it is the run's controller
    is `controller_alive`'s question."""
    return procs.alive(pid)


def controller_alive(run: dict) -> bool:
    """The run's recorded controller (state db `controller_pid`) still runs: that pid is
    alive *and* started when recorded (`controller_started`), so a recycled pid is never
    taken for it. A pid recorded without a start time (a row from a release before it
    was recorded) counts only while its command line is geotrain's (`_legacy_controller`)."""
    pid, started = run.get("controller_pid"), run.get("controller_started")
    if started is None:
        return procs.alive(pid) and _legacy_controller(pid, run.get("id", ""))
    return procs.same(pid, started)


def _legacy_controller(pid: int, run_id: str) -> bool:
    """Whether PID could be a controller recorded without its start time: the detached
    `python -m geotrain.controller RUN`, or a foreground `geotrain launch|resume` (whose
    command line names a recipe or a run, not always this run's id). Anything else (an
    editor, a shell that got the recycled pid) is not it."""
    args = procs.cmdline(pid)
    if "geotrain.controller" in args:
        return run_id in args
    return any(a == "geotrain" or a.endswith("/geotrain") for a in args) \
        and any(a in ("launch", "resume") for a in args)


def record_controller(db: StateDB, run_id: str, pid: int, **values) -> None:
    """Record `pid` as the run's controller, with its start time."""
    db.update_run(run_id, controller_pid=pid, controller_started=procs.start_time(pid), **values)


def status(run_id: str, home: Path | None = None) -> dict:
    """The run as `geotrain status --json` shows it."""
    db = StateDB(home or default_home())
    run = db.run(run_id)
    return _status_of(db, run)


def require_live_controller(run_id: str, home: Path | None = None, *, suggest_down: bool = False) -> dict:
    """The run's status, if its controller is running; else a GeotrainError saying to
    `geotrain resume` it first (and, with `suggest_down`, that `geotrain down` is the
    other way out). For commands the controller carries out (finish, migrate)."""
    s = status(run_id, home)
    if s["state"] != "running" or not pid_alive(s["controller_pid"]):
        raise GeotrainError(f"run {s['id']} has no running controller (state {s['state']}); "
                            f"`geotrain resume {s['id']}` first"
                            + (f", or `geotrain down {s['id']}`" if suggest_down else ""))
    return s


def _status_of(db: StateDB, run: dict) -> dict:
    alive = run["state"] == "running" and controller_alive(run)
    return {
        "id": run["id"], "name": run["name"], "state": run["state"],
        "rounds_done": run["rounds_done"], "rounds_total": run["rounds_total"],
        "eval_loss": run["eval_loss"], "store": run["store"],
        "started_at": iso(run["started_at"]), "first_step_at": iso(run["first_step_at"]),
        "finished_at": iso(run["finished_at"]),
        "controller_pid": run["controller_pid"] if alive else None,
        "error": run["error"], "spend_usd": run.get("spend_usd"),
        "sites": [{"name": s["name"], "provider": s["provider"], "region": s["region"],
                   "state": s["state"], "pid": s["pid"], "round": s["round"], "step": s["step"],
                   "loss": s["loss"], "tokens_per_s": s["tokens_per_s"],
                   "bytes_sent": s["bytes_sent"], "usd_per_hour": s.get("usd_per_hour"),
                   "placements_tried": json.loads(s.get("placements_tried") or "[]"),
                   "lost": ({"reason": s["lost_reason"], "at": iso(s.get("lost_at"))}
                            if s.get("lost_reason") else None)}
                  for s in db.sites(run["id"])],
    }


def statuses(home: Path | None = None) -> list[dict]:
    db = StateDB(home or default_home())
    return [_status_of(db, r) for r in db.runs()]


def terminate_run(db: StateDB, run_id: str) -> list[providers.Node]:
    """Terminate every node of a run the state db or the providers know of."""
    from geotrain.cleanup import terminate_run as by_db_and_tags

    return by_db_and_tags(db, run_id)


def down(run_id: str, home: Path | None = None) -> dict:
    """Stop a run wherever its controller is, and leave nothing running.
    Reports every node that was live when called and is terminated now."""
    db = StateDB(home or default_home())
    run = db.run(run_id)
    live = [r for r in db.nodes(run["id"]) if r["state"] != "terminated"]
    pid = run["controller_pid"]
    if run["state"] == "running" and controller_alive(run) and pid != os.getpid():
        # Only the recorded process: with its start time (through a pidfd, so a pid
        # recycled meanwhile is never signalled); a row without one, with the start time
        # of the geotrain process `controller_alive` just found there.
        started = run.get("controller_started") or procs.start_time(pid)
        if started is not None:
            procs.signal_if_same(pid, started, signal.SIGTERM)
        # It finishes a provider call in flight, then tears its sites down itself.
        deadline = time.monotonic() + DOWN_WAIT_S
        while controller_alive(run) and time.monotonic() < deadline:
            time.sleep(0.2)
    gone = terminate_run(db, run["id"])
    if db.run(run["id"])["state"] == "running":
        db.update_run(run["id"], state="stopped", finished_at=time.time())
    ids = list(dict.fromkeys([r["instance_id"] for r in live if r["instance_id"]]
                             + [n.instance_id for n in gone]))
    # A controller still inside a provider call after DOWN_WAIT_S stops once it returns
    # and tears down what that call made; said, so nobody takes the run for cleaned up.
    still = db.run(run["id"])
    return {"run": run["id"], "terminated": ids, "state": still["state"],
            "controller_running": still["controller_pid"] if pid != os.getpid()
            and controller_alive(still) else None,
            "nodes": [{"provider": n.provider, "site": n.site, "instance_id": n.instance_id,
                       "region": n.region} for n in gone]}


def prepare_resume(run_id: str, home: Path | None = None) -> str:
    """Check that a run can be resumed here; returns its full id."""
    db = StateDB(home or default_home())
    run = db.run(run_id)
    if run["state"] == "succeeded":
        raise GeotrainError(f"run {run['id']} already succeeded; nothing to resume")
    if controller_alive(run) and run["controller_pid"] != os.getpid() \
            and run["state"] == "running":
        raise GeotrainError(f"run {run['id']} is still controlled by pid {run['controller_pid']}; "
                            f"follow it with `geotrain status {run['id']}`")
    return run["id"]


def detach(run_id: str, home: Path | None = None, resume: bool = False) -> int:
    """Start the controller for run_id as its own background process."""
    home = home or default_home()
    logs = private_dir(log_dir(home, run_id))
    with open_private(logs / "controller.log") as log:
        proc = subprocess.Popen([sys.executable, "-m", "geotrain.controller", run_id]
                                + (["--resume"] if resume else []),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=dict(os.environ, GEOTRAIN_HOME=str(home)))
    record_controller(StateDB(home), run_id, proc.pid)
    return proc.pid


class Kept:
    """What a controller signed and keeps in the run store (mixed into Controller):
    run.json and the roster, put back every KEPT_CHECK_S if a writer of the store
    changed or removed them; and each member's signing key."""

    def _guard_kept(self, now: bool = False) -> None:
        """Every KEPT_CHECK_S (and `now`, at the run's end): put back run.json and the roster
        if the store no longer holds the bytes this controller signed (a writer of the store
        replaced or removed them: sites would refuse run.json, a replacement could not
        check its peers, and a resume would find them so)."""
        if not now and time.monotonic() - self._kept_checked < KEPT_CHECK_S:
            return
        self._kept_checked = time.monotonic()
        for key, data in self._kept.items():
            with contextlib.suppress(FileNotFoundError):  # removed: put back below
                if self.store.get(key) == data:
                    continue
            self.store.put(key, data)
            self.event("restored", f"{key} in the run store was not the one this controller "
                       "signed; put it back", key=key)

    def _verified_run_json(self, row: dict) -> bytes:
        raw = signed_run_json(self.store, lambda: run_info(
            self.run_id, self.recipe, row["store"], row["created_at"], initial_hash(self.recipe)))
        if raw is None:
            self.event("restored", "run.json in the run store was not signed with this run's "
                       "control key; rewrote it from the state db", key="run.json")
            raw = self.store.get("run.json")
        return raw

    def _member_key(self, member: str):
        key = member_key(self.db, self.store, self.run_id, member)  # a new one: a new roster
        self._kept[ROSTER] = self.store.get(ROSTER)
        return key
