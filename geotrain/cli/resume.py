"""`geotrain resume RUN`: take a run up again after its controller (and maybe
every site) died: adopt the sites still running, relaunch the others, go on
from the newest committed round."""

from __future__ import annotations

from typing import Annotated

import typer

from geotrain.cli.common import handle_errors
from geotrain.cli.launch import drive


@handle_errors
def resume(run: Annotated[str, typer.Argument(help="run id (or a unique prefix)")],
           detach: Annotated[bool, typer.Option("--detach", "-d",
                                                help="run the controller in the background")] = False,
           as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Resume a run from its run store and state db; foreground to the end, or --detach."""
    from geotrain.runs import prepare_resume

    drive(prepare_resume(run), detach, as_json, resume=True)
