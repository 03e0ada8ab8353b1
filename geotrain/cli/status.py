"""`geotrain status [RUN]`: the runs this machine knows, or one run in detail."""

from typing import Annotated, Optional

import typer

from geotrain.cli.common import handle_errors, out, print_json


@handle_errors
def status(run: Annotated[Optional[str], typer.Argument(help="run id (a unique prefix is enough)")] = None,
           as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Show every run (or one run with its sites): state, rounds, eval loss."""
    from geotrain import runs
    from geotrain.cli.view import run_view, runs_table

    if run:
        s = runs.status(run)
        print_json(s) if as_json else out.print(run_view(s))
    else:
        runs = runs.statuses()
        print_json(runs) if as_json else out.print(runs_table(runs) if runs else "no runs yet")
