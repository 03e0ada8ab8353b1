"""`geotrain launch RECIPE`: create a run and drive it to the end."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geotrain.cli.common import err, handle_errors, out, print_json

EXIT = {"succeeded": 0, "failed": 1, "stopped": 130}


@handle_errors
def launch(recipe: Annotated[Path, typer.Argument(help="the recipe YAML")],
           detach: Annotated[bool, typer.Option("--detach", "-d",
                                                help="run the controller in the background")] = False,
           as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Provision the recipe's sites, train across them, and tear everything down at the end.

    In the foreground a live view shows each site; Ctrl-C stops the run cleanly.
    """
    from geotrain.runs import create_run, preflight
    from geotrain.recipe import load

    r = load(recipe)
    preflight(r, str(recipe))
    run_id = create_run(r, str(recipe.resolve()))
    drive(run_id, detach, as_json)


def drive(run_id: str, detach: bool, as_json: bool, resume: bool = False) -> None:
    """Run the controller for run_id — in the background, or here with a live
    view (or JSON at the end) — and exit with the run's outcome."""
    from rich.live import Live

    from geotrain.cli.view import run_view
    from geotrain.controller import Controller
    from geotrain.runs import detach as start_detached, status
    from geotrain.store import RunStore

    if detach:
        pid = start_detached(run_id, resume=resume)
        if as_json:
            print_json({"run": run_id})
        else:
            out.print(f"run [bold]{run_id}[/] {'resumed' if resume else 'started'} in the "
                      f"background (controller pid {pid})\n"
                      f"  geotrain status {run_id}\n  geotrain logs {run_id} --follow\n"
                      f"  geotrain down {run_id}", highlight=False)
        return
    if as_json:
        state = Controller(run_id).run(resume=resume)
        print_json(status(run_id))
    else:
        err.print(f"run [bold]{run_id}[/] — Ctrl-C stops it cleanly", highlight=False)
        if out.is_terminal:
            with Live(console=out, refresh_per_second=4, transient=False) as live:
                state = Controller(run_id, on_tick=lambda s: live.update(run_view(s))).run(resume=resume)
            final = status(run_id)
        else:  # a pipe or a file: Live prints only its last view there, with no line end after it
            state = Controller(run_id).run(resume=resume)
            final = status(run_id)
            out.print(run_view(final))
        if state == "succeeded":
            loss = f"eval loss {final['eval_loss']:.4f}; " if final["eval_loss"] is not None else ""
            out.print(f"[green]✓[/] finished: {loss}model at "
                      f"{RunStore(final['store']).final_model_url()}", highlight=False)
        elif final.get("error"):
            err.print(f"[bold red]error:[/] {final['error']}", highlight=False)
    raise typer.Exit(EXIT[state])
