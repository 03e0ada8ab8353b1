"""What every command shares: the consoles, JSON output, and turning a user's
mistake into one red line and exit code 1 — never a traceback."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from geotrain.errors import GeotrainError

# On a terminal, rich fits tables to its width. Anywhere else (a pipe, a file) a
# narrow default would elide or wrap values ("…"), so there every value is printed
# whole: a width no table reaches (a table takes only the width it needs).
UNBOUNDED_WIDTH = 1 << 16
out = Console() if sys.stdout.isatty() else Console(width=UNBOUNDED_WIDTH)
err = Console(stderr=True)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def handle_errors(fn: Callable) -> Callable:
    """Wrap a command: GeotrainError -> one line on stderr (or {"error": ...} with --json)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GeotrainError as e:
            if kwargs.get("as_json"):
                data = e.to_dict() if hasattr(e, "to_dict") else {"message": str(e)}
                print_json({"error": data})
            else:
                err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)
