"""`geotrain catalog show|refresh`: which price files are used, and fetching fresh ones."""

from typing import Annotated, Optional

import typer

from geotrain.cli.common import handle_errors, out, print_json

app = typer.Typer(no_args_is_help=True, help="The price catalog: show it, refresh it.")


@app.command("show")
@handle_errors
def show(provider: Annotated[Optional[str], typer.Option("--provider", "-p",
                                                         help="one provider's instance types")] = None,
         as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Which catalog file each provider uses (shipped or refreshed) and its date."""
    from rich.table import Table

    from geotrain import catalog

    if provider:
        c = catalog.load(provider)
        data = {**catalog.to_json(c), "file": c.path, "shipped": c.shipped}
        if as_json:
            print_json(data)
            return
        out.print(f"[bold]{provider}[/]: {c.path} ({'shipped' if c.shipped else 'refreshed'}, "
                  f"retrieved {c.retrieved})\n{c.note}", highlight=False)
        table = Table("instance type", "GPUs", "vCPUs", "GiB", "region", "on-demand $/h",
                      "spot $/h", box=None, padding=(0, 2))
        for name, it in sorted(c.instances.items()):
            for i, (region, p) in enumerate(sorted(it.regions.items())):
                table.add_row(name if i == 0 else "", f"{it.gpus}x {it.gpu}" if i == 0 else "",
                              str(it.vcpus) if i == 0 else "", f"{it.memory_gib:g}" if i == 0 else "",
                              region, _usd(p.on_demand), _usd(p.spot))
        out.print(table)
        return
    rows = catalog.summary()
    if as_json:
        print_json(rows)
        return
    table = Table("provider", "file", "kind", "retrieved", "types", "regions", box=None,
                  padding=(0, 2))
    for r in rows:
        table.add_row(r["provider"], r["file"], "shipped" if r["shipped"] else "refreshed",
                      r["retrieved"] or "-", str(r["instance_types"]), ", ".join(r["regions"]))
    out.print(table)
    out.print("shipped prices are list prices written down on the date shown; "
              "`geotrain catalog refresh` fetches current ones", highlight=False)


def _usd(v: float | None) -> str:
    return "-" if v is None else f"{v:,.4f}"


@app.command("refresh")
@handle_errors
def refresh(provider: Annotated[Optional[str], typer.Option("--provider", "-p",
                                                            help="aws, gcp or azure")] = None,
            as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Fetch current prices from the providers' public price sources (no account needed)
    into $GEOTRAIN_HOME/catalog/. Base URLs can be overridden: GEOTRAIN_AWS_PRICING_URL,
    GEOTRAIN_AWS_SPOT_URL, GEOTRAIN_AZURE_PRICES_URL. GCP has no such source."""
    from dataclasses import asdict

    from geotrain.catalog.refresh import refresh as do_refresh

    results = do_refresh(provider)
    if as_json:
        print_json([asdict(r) for r in results])
        return
    for r in results:
        mark = "[green]✓[/]" if r.refreshed else "[yellow]–[/]"
        out.print(f"{mark} [bold]{r.provider}[/]: {r.detail}", highlight=False, soft_wrap=True)
        for url in r.urls:
            out.print(f"    from {url}", highlight=False)
        if r.refreshed:
            out.print(f"    wrote {r.path} (retrieved {r.retrieved})", highlight=False)
