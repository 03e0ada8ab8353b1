"""`geotrain migrate RUN --site S --to PROVIDER[:REGION[:INSTANCE]]` moves a site
of a live run, make-before-break; `geotrain migrate RUN --store URL` moves its
run store to another backend at a round boundary (see geotrain/migrate.py)."""

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
            store: Annotated[str | None, typer.Option(
                "--store", help="move the run store here instead: file://, s3://, gs://, az://")] = None,
            wait: Annotated[bool, typer.Option(help="follow the migration to its end")] = True,
            timeout: Annotated[float, typer.Option(help="seconds to follow it")] = 900,
            as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Move a site to another provider or region (the new site joins a round before
    the old one drains), or move the run store, while the run goes on."""
    from geotrain.runs import require_live_controller, status
    from geotrain.errors import GeotrainError
    from geotrain.migrate import request_site_migration, request_store_migration, target_problem
    from geotrain.recipe import default_home
    from geotrain.state import StateDB
    from geotrain.store import RunStore

    if not ((site and to) or store) or (store and (site or to)):
        raise GeotrainError("say what to move: --site S --to PROVIDER[:REGION[:INSTANCE]], "
                            "or --store URL")
    s = require_live_controller(run)
    problem = target_problem(_recipe(s["id"]), s["store"], site, to, store)
    if problem:
        raise GeotrainError(problem)
    if store:
        at = request_store_migration(StateDB(default_home()), s["id"], store)
        done_kinds, about = ("store-migrated", "migrate-failed"), None
    else:
        at = request_site_migration(StateDB(default_home()), s["id"], site, to)
        done_kinds, about = ("site-migrated", "migrate-failed"), site
    if not wait:
        request = {"run": s["id"], "site": site, "to": to, "store": store, "requested_at": at}
        print_json(request) if as_json else out.print(f"asked to migrate {site or 'the store'}")
        return
    deadline, seen = time.monotonic() + timeout, set()
    while time.monotonic() < deadline:
        now = status(s["id"])  # the store URL changes when the store moves
        for e in RunStore(now["store"]).events([]):
            if e["source"] != "controller" or e["at"] < at or e.get("site") != about \
                    or not (e["kind"].startswith("migrate") or e["kind"] in done_kinds):
                continue
            if (e["at"], e["kind"]) not in seen and not as_json:
                err.print(f"  {e['message']}", highlight=False)
            seen.add((e["at"], e["kind"]))
            if e["kind"] in done_kinds:
                if as_json:
                    print_json(e)
                if e["kind"] == "migrate-failed":
                    raise typer.Exit(1)
                return
        if now["state"] != "running":
            raise GeotrainError(f"run {s['id']} ended before the migration finished")
        time.sleep(1)
    raise GeotrainError(f"migration not finished within {timeout:g} s; see `geotrain logs {s['id']}`")


def _recipe(run_id: str):
    import json

    from geotrain.recipe import Recipe, default_home
    from geotrain.state import StateDB

    return Recipe.model_validate(json.loads(StateDB(default_home()).run(run_id)["recipe_json"]))
