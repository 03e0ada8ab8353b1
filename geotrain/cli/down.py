"""`geotrain down RUN` / `geotrain down --orphans`: stop a run, or sweep up what no run owns."""

import sys
from typing import Annotated, Optional

import typer

from geotrain.cli.common import err, handle_errors, out, print_json
from geotrain.errors import GeotrainError


@handle_errors
def down(run: Annotated[Optional[str], typer.Argument(help="run id (a unique prefix is enough)")] = None,
         orphans: Annotated[bool, typer.Option("--orphans", help="terminate every node tagged with "
                                               "this operator's owner id whose run is over or "
                                               "unknown here")] = False,
         dry_run: Annotated[bool, typer.Option("--dry-run", help="with --orphans: list what would "
                                               "be terminated, terminate nothing")] = False,
         yes: Annotated[bool, typer.Option("--yes", "-y", help="with --orphans: do not ask before "
                                           "terminating")] = False,
         as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Stop a run's controller and terminate every node it has, by the state db and by tags;
    with --orphans, terminate across providers every node launched from this GEOTRAIN_HOME
    (its owner id tag) that no live run owns, after asking (or --yes; --dry-run only lists)."""
    from rich.table import Table

    from geotrain.cleanup import down_orphans
    from geotrain.runs import down as stop_run

    if run is None and not orphans:
        raise GeotrainError("say which run to stop (geotrain down RUN) or pass --orphans")
    if dry_run and not orphans:
        raise GeotrainError("--dry-run applies to --orphans (geotrain down --orphans --dry-run)")
    if orphans and not (yes or dry_run or interactive()):
        raise GeotrainError("down --orphans asks before terminating and there is no terminal to "
                            "ask: pass --yes (or --dry-run to only list the nodes)")

    def confirm(nodes) -> bool:
        table = Table("provider", "run", "site", "instance", "region", box=None, padding=(0, 2))
        for n in nodes:
            table.add_row(n.provider, n.run_id, n.site, n.instance_id, n.region or "-")
        err.print(table)
        return typer.confirm(f"terminate these {len(nodes)} orphaned node(s)?", default=False, err=True)

    result: dict = {}
    if run is not None:
        result = stop_run(run)
    if orphans:
        result["orphans"] = down_orphans(dry_run=dry_run, confirm=None if yes else confirm)
    if as_json:
        print_json(result)
        return
    if run is not None:
        out.print(f"run [bold]{result['run']}[/] is {result['state']}; "
                  f"terminated {len(result['terminated'])} node(s)", highlight=False)
        for node in result["terminated"]:
            out.print(f"  - {node}", highlight=False)
        if result.get("controller_running"):
            err.print(f"warning: the run's controller (pid {result['controller_running']}) has "
                      "not stopped yet; it tears down what it is launching as it stops: run "
                      f"`geotrain down {result['run']}` again once it has", highlight=False)
    if orphans:
        found = result["orphans"]
        shown = found["found"] if dry_run else found["terminated"]
        table = Table("provider", "run", "site", "instance", "region", box=None, padding=(0, 2))
        for n in shown:
            table.add_row(n["provider"], n["run_id"], n["site"], n["instance_id"], n["region"] or "-")
        if dry_run:
            out.print(f"would terminate {len(shown)} orphaned node(s) (dry run: nothing terminated)",
                      highlight=False)
        elif found["declined"]:
            out.print("nothing terminated", highlight=False)
        else:
            out.print(f"terminated {len(shown)} orphaned node(s)", highlight=False)
        if shown:
            out.print(table)
        gone = found["leftovers"] if dry_run else found["removed"]
        if gone:
            out.print(f"{'would remove' if dry_run else 'removed'} {len(gone)} resource(s) made for "
                      "those runs beside their nodes: " + ", ".join(
                          f"{x['provider']} {x['kind']} {x['name']} ({x['run_id']}/{x['site']})"
                          for x in gone), highlight=False)
        if found["others"]:
            out.print(f"  [dim]left {found['others']} node(s) of runs not known here alone: tagged "
                      "with another owner id, or none[/]", highlight=False)
        for s in found["skipped"]:
            out.print(f"  [dim]skipped {s['provider']}: {s['reason']}[/]", highlight=False)


def interactive() -> bool:
    """Whether someone can be asked: stdin is a terminal."""
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):  # closed or replaced stdin
        return False
