"""The Ray actor that runs one worker of a site's data-parallel group.

The site agent creates `workers` of these in its site's Ray cluster; rank 0
opens a torch.distributed TCPStore on a free port of the site's private
address and the others join it, so the gloo group never leaves the site.
"""

from __future__ import annotations

import os

import ray


@ray.remote(num_cpus=1)
class TrainWorker:
    def __init__(self, store_url: str, site: str, rank: int, world: int):
        self.store_url, self.site, self.rank, self.world = store_url, site, rank, world
        self._tcp_store = None

    def rendezvous(self, host: str) -> int:
        """Rank 0 only: open the group's TCPStore on port 0 and return its port."""
        import torch.distributed as dist

        self._tcp_store = dist.TCPStore(host, 0, self.world, is_master=True, wait_for_workers=False)
        return self._tcp_store.port

    def join(self, host: str, port: int) -> None:
        import torch.distributed as dist

        if self.world == 1:
            return
        store = self._tcp_store or dist.TCPStore(host, port, self.world, is_master=False)
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
        place = WorkerPlace(self.site, names.index(self.site), len(names), self.rank, self.world)
        return train_site(recipe, store, place, members=run["members"])
