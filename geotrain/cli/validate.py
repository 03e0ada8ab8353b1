"""`geotrain validate RECIPE`: check a recipe and print it as resolved."""

from pathlib import Path
from typing import Annotated

import typer
import yaml

from geotrain.cli.common import handle_errors, out, print_json


@handle_errors
def validate(recipe: Annotated[Path, typer.Argument(help="the recipe YAML")],
             as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Validate a recipe; print it with every default filled in, or say what is wrong."""
    from geotrain.recipe import load

    r = load(recipe)
    if as_json:
        print_json(r.to_dict())
    else:
        out.print(f"[green]✓[/] {recipe} is valid", highlight=False)
        out.print(yaml.safe_dump(r.to_dict(), sort_keys=False), highlight=False, markup=False)
