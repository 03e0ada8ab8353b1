"""The geotrain command line: wires one module per command into one Typer app.

Each command parses, calls one library function and renders the result with
rich (or as JSON with --json). Heavy libraries are imported inside commands
so that `geotrain --help` stays fast.
"""

import typer

from geotrain.cli import (catalog, check, down, finish, launch, logs, migrate, plan, providers, resume,
                          schema, status, validate)

app = typer.Typer(name="geotrain", no_args_is_help=True, add_completion=False,
                  help="Train one model across clouds; sites meet rarely, through object storage.")
app.command("launch")(launch.launch)
app.command("resume")(resume.resume)
app.command("migrate")(migrate.migrate)
app.command("finish")(finish.finish)
app.command("validate")(validate.validate)
app.command("status")(status.status)
app.command("logs")(logs.logs)
app.command("down")(down.down)
app.command("providers")(providers.providers)
app.command("schema")(schema.schema)
app.command("plan")(plan.plan)
app.command("check")(check.check)
app.add_typer(catalog.app, name="catalog")


def main() -> None:
    app()
