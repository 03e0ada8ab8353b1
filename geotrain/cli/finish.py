"""`geotrain finish RUN`: end a live run early, at the next round boundary,
with its final model (see geotrain/finish.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from geotrain.cli.common import err, handle_errors, out, print_json


@handle_errors
def finish(run: Annotated[str, typer.Argument(help="run id (or a unique prefix)")],
           wait: Annotated[bool, typer.Option(help="follow the run to its end")] = True,
           timeout: Annotated[float, typer.Option(help="seconds to follow it")] = 3600,
           as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """End a run early, keeping what it learned: every site trains the round after
    the current one, the final model is written and the run succeeds."""
    from geotrain.finish import follow_finish, request_finish

    asked = request_finish(run)
    show = (lambda e: None) if as_json else \
        (lambda e: err.print(f"  {e['message']}", highlight=False))
    result = follow_finish(asked["run"], asked["requested_at"], until_end=wait, timeout_s=timeout,
                           on_event=show)
    if as_json:
        print_json(result)
    else:
        out.print(f"run [bold]{result['run']}[/] ends at round {result['at_round']}"
                  + (f": {result['state']}" if wait else ""), highlight=False)
    if wait and result["state"] != "succeeded":
        raise typer.Exit(1)
