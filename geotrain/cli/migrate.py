"""`geotrain migrate RUN --site S --to PROVIDER[:REGION[:INSTANCE]]`: move a site
of a live run, make-before-break (see geotrain/migrate.py)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from geotrain.cli.common import err, handle_errors, out, print_json


@handle_errors
def migrate(run: Annotated[str, typer.Argument(help="run id (or a unique prefix)")],
            site: Annotated[str | None, typer.Option("--site", help="the site to move")] = None,
            to: Annotated[str | None, typer.Option(
                "--to", help="PROVIDER[:REGION[:INSTANCE]], e.g. aws:us-west-2:g5.xlarge")] = None,
            wait: Annotated[bool, typer.Option(help="follow the migration to its end")] = True,
            timeout: Annotated[float, typer.Option(help="seconds to follow it")] = 900,
            as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Move a site to another provider or region while the run goes on: the new
    site joins a round before the old one drains."""
    from geotrain.controller import pid_alive, status
    from geotrain.errors import GeotrainError
    from geotrain.migrate import request_site_migration
    from geotrain.store import RunStore

    if not (site and to):
        raise GeotrainError("say what to move: --site S --to PROVIDER[:REGION[:INSTANCE]]")
    s = status(run)
    if s["state"] != "running" or not pid_alive(s["controller_pid"]):
        raise GeotrainError(f"run {s['id']} has no running controller (state {s['state']}); "
                            f"`geotrain resume {s['id']}` first")
    store = RunStore(s["store"])
    at = request_site_migration(store, site, to)
    if not wait:
        (print_json if as_json else lambda d: out.print(f"asked to migrate {site} to {to}"))(
            {"run": s["id"], "site": site, "to": to, "requested_at": at})
        return
    deadline = time.monotonic() + timeout
    seen = set()
    while time.monotonic() < deadline:
        for e in store.events([]):
            if e["source"] != "controller" or e["at"] < at or e.get("site") != site:
                continue
            if e["kind"].startswith("migrate") or e["kind"] == "site-migrated":
                if (e["at"], e["kind"]) not in seen and not as_json:
                    err.print(f"  {e['message']}", highlight=False)
                seen.add((e["at"], e["kind"]))
            if e["kind"] in ("site-migrated", "migrate-failed"):
                if as_json:
                    print_json(e)
                if e["kind"] == "migrate-failed":
                    raise typer.Exit(1)
                return
        if status(s["id"])["state"] != "running":
            raise GeotrainError(f"run {s['id']} ended before the migration of {site} finished")
        time.sleep(1)
    raise GeotrainError(f"migration of {site} not finished within {timeout:g} s; "
                        f"see `geotrain logs {s['id']}`")
