"""Spend so far, and the budget stop.

Spend = Σ over sites of the site's catalog $/h (× nodes, recorded at launch by
`placement.launch_site`) × hours since it launched, plus the egress estimate of the
rounds done so far (geotrain/plan.py's model: the run's whole egress × rounds done /
rounds). It is an estimate from list prices, not a bill. The controller calls
`record_spend()` on every tick; once the spend crosses `budget.max_usd` it stops the run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from geotrain.plan import Catalogs, egress, param_count, resolve
from geotrain.recipe import Placement, Recipe
from geotrain.state import StateDB


def spend(db: StateDB, run_id: str, recipe: Recipe, home: Path | None = None,
          now: float | None = None) -> float:
    """Estimated USD spent by the run so far."""
    now = time.time() if now is None else now
    rows = db.sites(run_id)
    compute = sum((r["usd_per_hour"] or 0.0) * max(0.0, now - r["launched_at"]) / 3600
                  for r in rows if r["launched_at"])
    run = db.run(run_id)
    placed = {r["name"]: r["placement"] for r in rows if r["placement"]}
    if not placed or not run["rounds_done"]:
        return compute
    cats = Catalogs(home)
    sites = {s.name: s for s in recipe.sites}
    chosen = [resolve(Placement.model_validate(json.loads(p)), sites[name], cats)
              for name, p in placed.items()]
    _, egress_usd = egress(recipe, chosen, param_count(recipe), cats)
    return compute + egress_usd * run["rounds_done"] / recipe.train.rounds


def record_spend(db: StateDB, run_id: str, recipe: Recipe,
                 home: Path | None = None) -> tuple[float, bool]:
    """Store the spend so far on the run; (spend, whether it crossed budget.max_usd)."""
    spent = spend(db, run_id, recipe, home)
    db.update_run(run_id, spend_usd=round(spent, 6))
    return spent, recipe.budget is not None and spent > recipe.budget.max_usd


def over_budget(db: StateDB, run_id: str, recipe: Recipe, home: Path | None,
                event: Callable[..., None]) -> bool:
    """Record the spend so far; past `budget.max_usd`, a `budget` event and True."""
    spent, over = record_spend(db, run_id, recipe, home)
    if over:
        event("budget", f"estimated spend ${spent:,.2f} crossed the budget "
              f"${recipe.budget.max_usd:,.2f}; stopping the run", spend_usd=spent)
    return over
