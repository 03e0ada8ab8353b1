"""The Ray actor that runs one worker of a site's data-parallel group.

The site agent creates `workers` of these in its site's Ray cluster, each with
one of the node's GPUs when it has some (`.options(num_gpus=1)`), and forms their
group: NCCL when every rank has a usable CUDA device, gloo otherwise
(geotrain/site/devices.py choose_backend). A worker trains on `cuda:N` for the GPU
Ray assigned it, else on the CPU. The group's rendezvous is a FileStore in the site's own temp
dir when all workers share one node, so it opens no port at all; gloo itself
binds the interface the provider names (GLOO_SOCKET_IFNAME, and NCCL_SOCKET_IFNAME
for NCCL), the site's private one, so the group never leaves the site. A multi-node site's group
(geotrain/site/cluster.py) meets through a TCPStore that rank 0 opens on its
node's private address (never all interfaces).
"""

from __future__ import annotations

import os

import ray

from geotrain.site import devices


@ray.remote(num_cpus=1)
class TrainWorker:
    def __init__(self, store_url: str, site: str, rank: int, world: int, data_site: str | None = None):
        self.store_url, self.site, self.rank, self.world = store_url, site, rank, world
        self.data_site = data_site or site
        self._tcp_store = None
        self.device = devices.actor_device()
        if self.device != "cpu":
            import torch

            torch.cuda.set_device(self.device)

    def join(self, rendezvous_file: str, backend: str = "gloo") -> int:
        """Join the group of one node's workers through a FileStore; returns the
        group's size as counted by an all-reduce over it."""
        import torch.distributed as dist

        if self.world == 1:
            return 1
        store = dist.FileStore(rendezvous_file, self.world)
        return self._init_group(store, backend)

    def _init_group(self, store, backend: str) -> int:
        import torch
        import torch.distributed as dist

        # Under NCCL, gloo still carries the few CPU tensors of the sync's control
        # broadcasts (geotrain/sync/diloco.py); NCCL takes every CUDA tensor.
        spec = "cpu:gloo,cuda:nccl" if backend == "nccl" else backend
        dist.init_process_group(spec, store=store, rank=self.rank, world_size=self.world)
        # NCCL reduces only tensors on the rank's own GPU.
        ones = torch.ones(1, device=self.device if backend == "nccl" else "cpu")
        dist.all_reduce(ones)
        return int(ones.item())

    def open_rendezvous(self) -> tuple[str, int]:
        """Rank 0 of a multi-node group: open the group's TCPStore on this
        node's private address, on a free port, and say where it is."""
        import socket

        import ray
        import torch.distributed as dist

        host = ray.util.get_node_ip_address()
        # A TCPStore given only a port listens on every interface; handing it a
        # socket bound to the private address keeps it inside the site.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        self._tcp_store = dist.TCPStore(host, port, self.world, True, master_listen_fd=sock.fileno(),
                                        use_libuv=False, wait_for_workers=False)
        self._listen_socket = sock
        return host, port

    def join_tcp(self, host: str, port: int, backend: str = "gloo") -> int:
        """Join the group through rank 0's TCPStore; returns the group's size as
        counted by an all-reduce over it."""
        import torch.distributed as dist

        store = self._tcp_store or dist.TCPStore(host, port, self.world, False)
        return self._init_group(store, backend)

    def where(self) -> dict:
        """This worker's rank, node, process and device (its GPUs from Ray, whether
        CUDA and NCCL are usable), for the backend choice and the site's events."""
        import ray

        ctx = ray.get_runtime_context()
        return {"rank": self.rank, "world": self.world, "node_id": ctx.get_node_id(),
                "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                **devices.describe_rank(self.device)}

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
        place = WorkerPlace(self.site, names.index(self.data_site), len(names), self.rank, self.world,
                            device=self.device)
        if recipe.train.entrypoint:
            from geotrain.train.entry import SiteContext, run_entrypoint

            return run_entrypoint(SiteContext(recipe, store, self.site, place.site_index,
                                              place.n_sites, self.rank, self.world,
                                              device=self.device))
        return train_site(recipe, store, place, drain_requested=_commanded(store, self.site, "drain"))


def _commanded(store, site: str, command: str, every_s: float = 1.0):
    """A cheap check, at most once per `every_s`, for a command sent after now."""
    import time

    since, state = time.time(), {"at": 0.0, "seen": False}

    def check() -> bool:
        if not state["seen"] and time.monotonic() - state["at"] >= every_s:
            state["at"] = time.monotonic()
            state["seen"] = store.commanded(site, command, since=since)
        return state["seen"]
    return check
