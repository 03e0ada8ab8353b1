"""Ending a run early, keeping what it learned: `geotrain finish RUN`.

The CLI asks the run's controller (a request in the state db on this machine,
as `migrate` does; never through the run store); the controller picks the last round — the one after the
round being trained now, so that no site has started past it — records it in
the state db and in the store (`control/finish.json`, signed with the run's control key), and the run ends there as if
the recipe had said so: every site trains and publishes that round, its full
global state is committed, the final model and summary are written, and the
run succeeds. A run that is finishing already keeps the round it was given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from geotrain.errors import GeotrainError


def request_finish(run_id: str, home: Path | None = None) -> dict:
    """Ask a run's controller to finish it early; returns {"run", "requested_at"}."""
    from geotrain.runs import require_live_controller
    from geotrain.recipe import default_home
    from geotrain.state import StateDB

    s = require_live_controller(run_id, home, suggest_down=True)
    at = StateDB(home or default_home()).add_request(s["id"], "finish")
    return {"run": s["id"], "requested_at": at}


def follow_finish(run_id: str, requested_at: float, home: Path | None = None, *,
                  until_end: bool = True, timeout_s: float = 3600,
                  on_event: Callable[[dict], None] = lambda e: None) -> dict:
    """Wait for the controller to choose the last round (and, with `until_end`,
    for the run to end). Returns {"run", "at_round", "state"}."""
    from geotrain.runs import status
    from geotrain.store import RunStore

    deadline, at_round, seen = time.monotonic() + timeout_s, None, set()
    while time.monotonic() < deadline:
        s = status(run_id, home)
        for e in RunStore(s["store"]).events([]):
            key = (e["at"], e["kind"])
            if e["source"] != "controller" or e["at"] < requested_at or key in seen \
                    or e["kind"] not in ("finishing", "finished", "failed", "stopped"):
                continue
            seen.add(key)
            on_event(e)
            if e["kind"] == "finishing":
                at_round = e.get("at_round")
        if at_round is not None and (not until_end or s["state"] != "running"):
            return {"run": s["id"], "at_round": at_round, "state": s["state"],
                    "rounds_done": s["rounds_done"]}
        if s["state"] != "running":
            raise GeotrainError(f"run {s['id']} ended ({s['state']}) before it was asked to finish")
        time.sleep(0.5)
    raise GeotrainError(f"run {run_id} did not {'end' if until_end else 'answer'} within "
                        f"{timeout_s:g} s; see `geotrain logs {run_id}`")
