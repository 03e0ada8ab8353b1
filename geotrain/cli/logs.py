"""`geotrain logs RUN`: what happened in a run, from its store's event logs."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Optional

import typer

from geotrain.cli.common import handle_errors, out


def _line(e: dict) -> str:
    at = datetime.fromtimestamp(e["at"]).strftime("%H:%M:%S")
    return f"{at}  {e['source']:<10} {e['kind']:<14} {e['message']}"


@handle_errors
def logs(run: Annotated[str, typer.Argument(help="run id (a unique prefix is enough)")],
         site: Annotated[Optional[str], typer.Option("--site", "-s", help="only this site's events")] = None,
         follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the run ends")] = False,
         as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False) -> None:
    """Print the run's events (controller and sites), oldest first."""
    import json

    from geotrain.runs import FINAL_STATES
    from geotrain.recipe import default_home
    from geotrain.state import StateDB
    from geotrain.store import RunStore

    db = StateDB(default_home())
    row = db.run(run)
    store = RunStore(row["store"])
    seen: set[tuple] = set()
    while True:
        # The state first: the controller writes its last events before it ends the
        # run, so a run seen ended here has every event in the read below.
        over = not follow or db.run(row["id"])["state"] in FINAL_STATES
        # Every member that ever wrote: a migrated site's new member is `site~k`.
        members = [m for m in store.listdir("sites") if m != "controller"]
        events = [e for e in store.events(members)
                  if site is None or e["source"].split("~")[0] == site]
        fresh = [e for e in events if (e["at"], e["source"], e["kind"]) not in seen]
        for e in fresh:
            seen.add((e["at"], e["source"], e["kind"]))
            if as_json:
                typer.echo(json.dumps(e, default=str))
            else:
                out.print(_line(e), highlight=False, markup=False)
        if over:
            break
        time.sleep(1.0)
