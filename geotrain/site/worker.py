"""The Ray actor that runs one worker of a site's data-parallel group.

The site agent creates `workers` of these in its site's Ray cluster and forms
their gloo group. The group's rendezvous is a FileStore in the site's own temp
dir when all workers share one node, so it opens no port at all; gloo itself
binds the interface the provider names (GLOO_SOCKET_IFNAME), the site's private
one, so the group never leaves the site.
"""

from __future__ import annotations

import os

import ray


@ray.remote(num_cpus=1)
class TrainWorker:
    def __init__(self, store_url: str, site: str, rank: int, world: int, data_site: str | None = None):
        self.store_url, self.site, self.rank, self.world = store_url, site, rank, world
        self.data_site = data_site or site
        self._tcp_store = None

    def join(self, rendezvous_file: str) -> None:
        import torch.distributed as dist

        if self.world == 1:
            return
        store = dist.FileStore(rendezvous_file, self.world)
        dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.world)

    def pid(self) -> int:
        return os.getpid()

    def train(self) -> dict:
        from geotrain.recipe import Recipe
        from geotrain.store import RunStore
        from geotrain.train.trainer import WorkerPlace, train_site

        store = RunStore(self.store_url)
        run = store.read_run()
        recipe = Recipe.model_validate(run["recipe"])
        names = [s.name for s in recipe.sites]
        place = WorkerPlace(self.site, names.index(self.data_site), len(names), self.rank, self.world)
        if recipe.train.entrypoint:
            from geotrain.train.entry import SiteContext, run_entrypoint

            return run_entrypoint(SiteContext(recipe, store, self.site, place.site_index,
                                              place.n_sites, self.rank, self.world))
        return train_site(recipe, store, place, drain_requested=_commanded(store, self.site, "drain"))


def _commanded(store, site: str, command: str, every_s: float = 1.0):
    """A cheap check, at most once per `every_s`, for a command sent after now."""
    import time

    since, state = time.time(), {"at": 0.0, "seen": False}

    def check() -> bool:
        if not state["seen"] and time.monotonic() - state["at"] >= every_s:
            state["at"] = time.monotonic()
            state["seen"] = any(c["command"] == command and c["at"] >= since
                                for c in store.commands(site))
        return state["seen"]
    return check
