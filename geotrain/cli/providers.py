"""`geotrain providers`: where sites can be put, what each can do, and whether
this machine can use it."""

from typing import Annotated

import typer
from rich.table import Table

from geotrain.cli.common import out, print_json


def providers(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List the providers, their capabilities and whether credentials are usable."""
    from dataclasses import asdict

    import providers as registry

    rows = []
    for name in registry.PROVIDERS:
        try:
            mod = registry.get(name)
        except ImportError:
            rows.append({"name": name, "available": False, "detail": "not implemented yet"})
            continue
        check = mod.check()
        rows.append({"name": name, "available": check.ok, "detail": check.detail,
                     "capabilities": asdict(mod.capabilities())})
    if as_json:
        print_json(rows)
        return
    from rich.markup import escape

    table = Table("provider", "usable", "capabilities", "detail")
    for r in rows:
        caps = ", ".join(k for k, v in r.get("capabilities", {}).items() if v) or "-"
        table.add_row(r["name"], "[green]yes[/]" if r["available"] else "[red]no[/]", caps, escape(r["detail"]))
    out.print(table)
