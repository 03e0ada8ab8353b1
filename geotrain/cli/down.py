"""`geotrain down RUN` / `geotrain down --orphans`: stop a run, or sweep up what no run owns."""

from typing import Annotated, Optional

import typer

from geotrain.cli.common import handle_errors, out, print_json
from geotrain.errors import GeotrainError


@handle_errors
def down(run: Annotated[Optional[str], typer.Argument(help="run id (a unique prefix is enough)")] = None,
         orphans: Annotated[bool, typer.Option("--orphans", help="terminate every geotrain-tagged "
                                               "node whose run is over or unknown here")] = False,
         as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Stop a run's controller and terminate every node it has, by the state db and by tags;
    with --orphans, terminate across providers every tagged node no live run owns."""
    from rich.table import Table

    from geotrain.cleanup import down_orphans
    from geotrain.controller import down as stop_run

    if run is None and not orphans:
        raise GeotrainError("say which run to stop (geotrain down RUN) or pass --orphans")
    result: dict = {}
    if run is not None:
        result = stop_run(run)
    if orphans:
        result["orphans"] = down_orphans()
    if as_json:
        print_json(result)
        return
    if run is not None:
        out.print(f"run [bold]{result['run']}[/] is {result['state']}; "
                  f"terminated {len(result['terminated'])} node(s)", highlight=False)
        for node in result["terminated"]:
            out.print(f"  - {node}", highlight=False)
    if orphans:
        found = result["orphans"]
        table = Table("provider", "run", "site", "instance", "region", box=None, padding=(0, 2))
        for n in found["terminated"]:
            table.add_row(n["provider"], n["run_id"], n["site"], n["instance_id"], n["region"] or "-")
        out.print(f"terminated {len(found['terminated'])} orphaned node(s)", highlight=False)
        if found["terminated"]:
            out.print(table)
        for s in found["skipped"]:
            out.print(f"  [dim]skipped {s['provider']}: {s['reason']}[/]", highlight=False)
