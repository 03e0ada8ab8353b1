"""`geotrain down RUN`: stop a run and leave nothing running."""

from typing import Annotated

import typer

from geotrain.cli.common import handle_errors, out, print_json


@handle_errors
def down(run: Annotated[str, typer.Argument(help="run id (a unique prefix is enough)")],
         as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Stop a run's controller and terminate every node it has, by the state db and by tags."""
    from geotrain.controller import down as stop_run

    result = stop_run(run)
    if as_json:
        print_json(result)
        return
    out.print(f"run [bold]{result['run']}[/] is {result['state']}; "
              f"terminated {len(result['terminated'])} node(s)", highlight=False)
    for node in result["terminated"]:
        out.print(f"  - {node}", highlight=False)
