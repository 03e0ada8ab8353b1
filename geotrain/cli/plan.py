"""`geotrain plan RECIPE`: each site's candidates with prices, and what the run will cost.

Offline: everything comes from the catalog (`geotrain catalog show` says which files and
their dates). How hours and egress are estimated is described in geotrain/plan.py.
"""

from pathlib import Path
from typing import Annotated

import typer

from geotrain.cli.common import fmt, handle_errors, human_bytes, out, print_json


@handle_errors
def plan(recipe: Annotated[Path, typer.Argument(help="the recipe YAML")],
         as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Show each site's placements in order with $/h and their provider options (those not at
    their defaults), the run's $/h, hours, total and egress."""
    from rich.table import Table

    from geotrain.plan import make_plan
    from geotrain.recipe import load

    p = make_plan(load(recipe))
    if as_json:
        print_json(p.to_dict())
        return
    table = Table("site", "workers", "#", "provider", "region", "instance type", "GPUs", "spot", "$/h",
                  "available", "options", box=None, padding=(0, 2))
    for col in table.columns[3:6]:
        col.no_wrap = True
    for site in p.sites:
        chosen = site.chosen()
        for i, c in enumerate(site.candidates):
            gpus = f"{c.gpus * site.nodes}x {c.gpu}" if c.gpu else "-"
            mark = "[green]yes ◀[/]" if c is chosen else ("yes" if c.available else
                                                           f"[red]no[/] {c.reason}")
            first = i == 0
            table.add_row(site.name if first else "", str(site.workers) if first else "",
                          str(i + 1), c.provider, c.region or "-",
                          c.instance_type or "-", gpus, "yes" if c.spot else "no",
                          fmt(c.usd_per_hour, ",.2f"), mark, c.options_text() or "-")
    out.print(table)
    dates = ", ".join(f"{k} {v}" for k, v in p.catalog.items()) or "-"
    out.print(f"run: [bold]${p.usd_per_hour:,.2f}/h[/] × {p.hours:,.2f} h ({p.hours_from}) "
              f"+ egress ${p.egress_usd:,.2f} ({human_bytes(p.egress_bytes)}) "
              f"= [bold]${p.usd_total:,.2f}[/]   model ≈ {p.params / 1e6:,.1f} M params\n"
              f"catalog: {dates} — list prices; `geotrain catalog refresh` updates them",
              highlight=False)
