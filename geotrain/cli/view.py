"""The rich views of a run: the live table `launch` shows and `status` prints."""

from __future__ import annotations

import time
from datetime import datetime

from rich.console import Group
from rich.table import Table
from rich.text import Text

from geotrain.cli.common import fmt, human_bytes

STATE_STYLE = {"running": "yellow", "succeeded": "green", "failed": "red", "stopped": "magenta",
               "training": "green", "syncing": "cyan", "starting": "yellow", "done": "green",
               "pending": "dim"}


def _elapsed(s: dict) -> str:
    start = datetime.fromisoformat(s["started_at"]).timestamp()
    end = datetime.fromisoformat(s["finished_at"]).timestamp() if s["finished_at"] else time.time()
    return f"{end - start:.0f} s"


def run_view(s: dict) -> Group:
    style = STATE_STYLE.get(s["state"], "white")
    head = Text.assemble(
        (s["id"], "bold"), "  ", (s["state"], style),
        f"  round {s['rounds_done']}/{s['rounds_total']}",
        f"  eval loss {fmt(s['eval_loss'])}", f"  {_elapsed(s)}",
        f"  spent ${s['spend_usd']:,.2f}" if s.get("spend_usd") else "")
    table = Table("site", "provider", "state", "round", "step", "loss", "tokens/s", "bytes sent",
                  box=None, padding=(0, 2))
    for site in s["sites"]:
        table.add_row(site["name"], site["provider"],
                      Text(site["state"] or "-", STATE_STYLE.get(site["state"], "white")),
                      fmt(site["round"], "d"), fmt(site["step"], "d"), fmt(site["loss"]),
                      fmt(site["tokens_per_s"], ",.0f"), human_bytes(site["bytes_sent"]))
    parts = [head, table]
    for site in s["sites"]:
        for t in site.get("placements_tried") or []:
            zones = f"[{','.join(t['zones'])}]" if t.get("zones") else ""
            parts.append(Text(f"{site['name']}: tried {t['provider']}/{t['region'] or '*'}{zones} "
                              f"{t['instance_type'] or '-'}{' spot' if t['spot'] else ''}: "
                              f"{t['error']}", "yellow"))
        if site.get("lost"):
            parts.append(Text(f"{site['name']}: last lost {(site['lost']['at'] or '')[11:19]}: "
                              f"{site['lost']['reason']}", "yellow"))
    if s.get("error"):
        parts.append(Text(f"error: {s['error']}", "red"))
    return Group(*parts)


def runs_table(runs: list[dict]) -> Table:
    table = Table("run", "state", "rounds", "eval loss", "sites", "started", box=None, padding=(0, 2))
    table.columns[0].no_wrap = True
    for s in runs:
        table.add_row(s["id"], Text(s["state"], STATE_STYLE.get(s["state"], "white")),
                      f"{s['rounds_done']}/{s['rounds_total']}", fmt(s["eval_loss"]),
                      ",".join(x["name"] for x in s["sites"]), (s["started_at"] or "")[:16].replace("T", " "))
    return table
