"""A controller driven tick by tick, without a site, for the tests of its
judgement (tests/test_supervise.py, tests/test_controller_paths.py): a small run
of tiny-model local sites, and a `Controller` whose `tick` does for one site what
one tick of `watch` does. Each test file subclasses `Ticked` to fake what it
does not want done (launches, provider calls)."""

from __future__ import annotations

from pathlib import Path

from geotrain.controller import Controller
from geotrain.runs import create_run
from geotrain.recipe import Recipe


def tiny_run(home: Path, tmp_path: Path, name: str, sites: tuple[str, ...] = ("a", "b"),
             **sync) -> str:
    """Create a run of 3 short rounds of a one-layer tiny model on local `sites`;
    `sync` settings (e.g. liveness_timeout_s=1) go into the recipe's `sync:`.
    Returns its id."""
    recipe = {
        "name": name, "model": {"preset": "tiny", "n_layer": 1, "d_model": 32, "n_head": 2},
        "train": {"rounds": 3, "inner_steps": 2, "batch_size": 2, "seq_len": 16},
        "sites": [{"name": s, "provider": "local"} for s in sites]}
    if sync:
        recipe["sync"] = sync
    return create_run(Recipe.model_validate(recipe), str(tmp_path / "r.yaml"), home)


class Ticked(Controller):
    """A controller stepped by the test instead of by `watch`."""

    def tick(self, name: str = "a") -> None:
        """What one tick of `watch` does for one site."""
        member = self.member[name]
        hb = self.store.heartbeat(member)
        self._note_rejoined(name, hb)
        self._supervise(name, hb, self.store.liveness().get(member))
