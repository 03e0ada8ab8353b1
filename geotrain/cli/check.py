"""`geotrain check`: can this machine use each provider? Never raises, never shows a secret."""

from typing import Annotated

import typer

from geotrain.cli.common import out, print_json


def check(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
          strict: Annotated[bool, typer.Option("--strict",
                                               help="exit 1 unless every provider is ok")] = False) -> None:
    """Check each provider's credentials and reach, and show the endpoint settings in use
    (AWS_ENDPOINT_URL, GEOTRAIN_GCE_ENDPOINT, GEOTRAIN_ARM_ENDPOINT, ...); exit 0 unless
    --strict and one fails."""
    from dataclasses import asdict

    from rich.table import Table

    from geotrain.checks import check_providers

    rows = check_providers()
    if as_json:
        print_json([asdict(r) for r in rows])
    else:
        from rich.markup import escape

        table = Table("provider", "ok", "detail", "settings", box=None, padding=(0, 2))
        for r in rows:
            ok = "[green]yes[/]" if r.ok else ("[dim]n/a[/]" if not r.implemented else "[red]no[/]")
            settings = "\n".join(f"{k}={v}" for k, v in r.settings.items()) or "-"
            table.add_row(r.provider, ok, escape(r.detail), escape(settings))
        out.print(table)
    if strict and not all(r.ok for r in rows):
        raise typer.Exit(1)
