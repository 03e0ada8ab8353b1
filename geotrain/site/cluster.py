"""A site's Ray cluster across its nodes, for sites with `nodes: N > 1`.

Node 0 starts the Ray head bound to its private address with explicit ports,
the dashboard off and token authentication on (the token comes from
RAY_AUTH_TOKEN in the node's boot environment and is never written anywhere),
then publishes `IP:PORT` of the head — not the token — to the run store
(`sites/<site>/head.json`, MAC'ed under a key derived from the token, and
naming a private address: geotrain/store/control.py; a record any other
writer of the store forges is ignored). Nodes 1..N-1 wait for that record, join the head
with the same token, and stay until the head goes away, the site's run is over
or they are told to stop. Node 0 waits (bounded) until all N nodes have joined,
places `workers` TrainWorker actors on each node (a custom resource
`geotrain_node_<i>` per node pins them; on nodes with GPUs each also takes one of
Ray's GPUs, so the nodes are assumed alike: one instance type) and forms one group
across all of them — NCCL when every rank has a usable CUDA device, else gloo
(geotrain/site/devices.py) — through a TCPStore that rank 0 opens on its node's
private address. GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME name the interface that
holds that address, so the group's traffic stays on the site's private network.

Ports, node i of a site with base port B (the plan option `ray_port`, default
6379): GCS B on the head; node manager, object manager, metrics export,
metrics agent, dashboard agent, runtime-env agent at B+100i+1..6; worker
processes B+100i+20..99. Offsetting by node index lets several nodes share one
machine (the tests); on a cloud every node has its own address anyway.

The nodes are started through `ray._private.node.Node` — the calls `ray start`
makes — because the CLI refuses to join a node to a head on 127.0.0.1 (the
tests' private address, where RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every
Ray port on loopback), and because the agent then owns its Ray processes and
stops exactly those (never `ray stop`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass

from geotrain import procs
from geotrain.errors import GeotrainError
from geotrain.site import devices
from geotrain.store import RunStore
from geotrain.store.records import SiteState

log = logging.getLogger("geotrain.site")

DEFAULT_BASE_PORT = 6379
JOIN_TIMEOUT_S = 300.0  # how long nodes wait for each other at boot
HEAD_LOST_S = 5.0  # a member leaves once the head's GCS has refused connections this long
OBJECT_STORE_BYTES = 80 * 1024 * 1024
TERMINAL = tuple(s.value for s in SiteState.terminal())


class ClusterError(GeotrainError):
    """The site's nodes could not form one Ray cluster."""


@dataclass(frozen=True)
class RayPorts:
    """Every port one node of a site's Ray cluster listens on."""

    gcs: int
    node_manager: int
    object_manager: int
    metrics_export: int
    metrics_agent: int
    dashboard_agent: int
    runtime_env_agent: int
    min_worker: int
    max_worker: int

    @classmethod
    def for_node(cls, base: int, index: int) -> RayPorts:
        o = base + 100 * index
        return cls(gcs=base, node_manager=o + 1, object_manager=o + 2, metrics_export=o + 3,
                   metrics_agent=o + 4, dashboard_agent=o + 5, runtime_env_agent=o + 6,
                   min_worker=o + 20, max_worker=o + 99)


@dataclass(frozen=True)
class Group:
    """A site's TrainWorkers, in rank order, and how their process group was formed."""

    actors: tuple
    ranks: tuple[dict, ...]  # each rank's TrainWorker.where(): node, pid, device
    backend: str  # "nccl" or "gloo"
    reason: str  # why that backend (devices.choose_backend)


def node_resource(index: int) -> str:
    return f"geotrain_node_{index}"


def interface_for(ip: str) -> str | None:
    """The network interface that holds `ip`, so gloo binds only there."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:  # SIOCGIFADDR
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == ip:
                return name
    return None


def _secure_env(host: str) -> None:
    if not os.environ.get("RAY_AUTH_TOKEN"):
        raise ClusterError("RAY_AUTH_TOKEN is not set: a multi-node site's Ray cluster needs the "
                           "token from the node's boot script (infra/boot.sh.tmpl)")
    if os.environ.get("RAY_AUTH_MODE") != "token":  # explicit: never fall back to an open cluster
        from ray._raylet import Config

        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # Ray read its config at import; make this process see it too
    ifname = interface_for(host)
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if not os.environ.get(name) and ifname:
            os.environ[name] = ifname  # Ray's workers inherit it


def start_node(host: str, ports: RayPorts, index: int, cpus: int, temp_dir: str,
               head_address: str | None = None, gpus: int = 0):
    """Start this node's Ray processes, with `gpus` GPUs for its workers: the head
    when `head_address` is None, else a node joining it. Returns the
    `ray._private.node.Node` that owns them."""
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    _secure_env(host)
    params = RayParams(
        node_ip_address=host, node_manager_port=ports.node_manager,
        object_manager_port=ports.object_manager, metrics_export_port=ports.metrics_export,
        metrics_agent_port=ports.metrics_agent, dashboard_agent_listen_port=ports.dashboard_agent,
        runtime_env_agent_port=ports.runtime_env_agent, min_worker_port=ports.min_worker,
        max_worker_port=ports.max_worker, num_cpus=cpus, num_gpus=gpus,
        object_store_memory=OBJECT_STORE_BYTES,
        resources={node_resource(index): float(cpus)}, temp_dir=temp_dir, include_dashboard=False,
        gcs_server_port=ports.gcs if head_address is None else None, gcs_address=head_address)
    # shutdown_at_exit=False keeps the agent's own SIGTERM handling; the reaper
    # still takes the Ray processes down if the agent itself dies.
    return Node(params, head=head_address is None, shutdown_at_exit=False, spawn_reaper=True)


def stop_node(node) -> None:
    if node is not None:
        node.kill_all_processes(check_alive=False, allow_graceful=True)


def reap_leftovers(grace_s: float = 10.0) -> list[int]:
    """After this node's Ray is stopped: wait up to `grace_s` for the processes
    it left (Ray workers notice their raylet is gone only on their next read),
    then SIGKILL what remains. Only processes carrying this node's tags
    (GEOTRAIN_RUN, _SITE, _NODE_INDEX from the boot script), never this process,
    its parents or the metadata stand-in. Returns the pids killed."""
    me = {k: os.environ.get(k, "") for k in ("GEOTRAIN_RUN", "GEOTRAIN_SITE", "GEOTRAIN_NODE_INDEX")}
    if not all(me.values()):
        return []
    mine = procs.ancestry()  # this process and its ancestors (the boot script's shell)

    def leftovers() -> list[int]:
        return [pid for pid, tags in procs.tagged()
                if pid not in mine and all(tags.get(k) == v for k, v in me.items())
                and tags.get("GEOTRAIN_ROLE") != "notice" and procs.alive(pid)]

    deadline = time.monotonic() + grace_s
    while (left := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    names = []
    for p in left:
        names.append((procs.cmdline(p) or [""])[0][-60:])
        try:
            os.kill(p, 9)
        except (OSError, ProcessLookupError):
            pass
    if left:
        log.warning("killed %d process(es) Ray left behind on this node after %.0f s: %s",
                    len(left), grace_s, ", ".join(f"{p} {n}" for p, n in zip(left, names)))
    return left


def reachable(address: str, timeout: float = 1.0) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_nodes(n: int, timeout_s: float = JOIN_TIMEOUT_S, site: str = "",
                   address: str = "") -> list[int]:
    """Block (bounded) until nodes 0..n-1 are alive in the connected cluster."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        seen = sorted(i for node in ray.nodes() if node["Alive"] for i in range(n)
                      if node_resource(i) in node["Resources"])
        if len(seen) == n:
            return seen
        if time.monotonic() > deadline:
            missing = sorted(set(range(n)) - set(seen))
            raise ClusterError(f"site {site}: {len(seen)} of {n} nodes joined the Ray cluster within "
                               f"{timeout_s:.0f} s (missing node indexes {missing}); check that those "
                               f"nodes booted and can reach {address} inside the site")
        time.sleep(0.5)


def form_group(store_url: str, site: str, data_site: str, workers: int, nodes: int,
               gpus: int = 0) -> Group:
    """`workers` TrainWorkers on each of `nodes` nodes, ranks node-major, each
    with one GPU when the nodes have `gpus`, in one group whose rendezvous is a
    TCPStore on rank 0's private address."""
    import ray

    from geotrain.site.worker import TrainWorker

    world = workers * nodes
    actors = [TrainWorker.options(resources={node_resource(r // workers): 1},
                                  num_gpus=1 if gpus else 0).remote(
        store_url, site, r, world, data_site) for r in range(world)]
    ranks = ray.get([a.where.remote() for a in actors])
    backend, reason = devices.choose_backend(ranks)
    host, port = ray.get(actors[0].open_rendezvous.remote())
    sizes = ray.get([a.join_tcp.remote(host, port, backend) for a in actors])
    assert sizes == [world] * world, sizes
    return Group(tuple(actors), tuple(ranks), backend, reason)


def start_head(host: str, base_port: int, workers: int, temp_dir: str, gpus: int = 0):
    """Node 0: start the head's Ray processes. Stop them with `stop_node`."""
    return start_node(host, RayPorts.for_node(base_port, 0), 0, workers, temp_dir, gpus=gpus)


def lead(store: RunStore, site: str, host: str, base_port: int, nodes: int,
         timeout_s: float = JOIN_TIMEOUT_S) -> None:
    """Node 0, once its head is up: connect this process as the cluster's
    driver, publish the head's address, wait until every node has joined."""
    import ray

    address = f"{host}:{base_port}"
    ray.init(address=address, log_to_driver=True, configure_logging=False)
    store.put_head(site, address, "up")
    wait_for_nodes(nodes, timeout_s, site, address)


def head_down(store: RunStore, site: str) -> None:
    rec = store.head(site)
    if rec is not None:
        store.put_head(site, rec.address, "down")


def run_member(store: RunStore, site: str, host: str, base_port: int, index: int, workers: int,
               temp_dir: str, should_stop=lambda: False, timeout_s: float = JOIN_TIMEOUT_S,
               gpus: int = 0) -> str:
    """Node `index` > 0: wait for the head's record, join it, stay until the
    head goes away, the site is finished or `should_stop()`. Returns why it left."""
    deadline = time.monotonic() + timeout_s
    while True:
        # Only a record MAC'ed with the site's secret, naming a private address, counts
        # (store.head): a forged one cannot send this node's Ray token elsewhere.
        rec = store.head(site)
        if rec is not None and rec.state == "up" and reachable(rec.address):
            break
        if should_stop():
            return "stopped"
        if time.monotonic() > deadline:
            raise ClusterError(f"site {site}: node {index} found no reachable Ray head in the run "
                               f"store (sites/{site}/head.json) within {timeout_s:.0f} s; check "
                               "that node 0 booted")
        time.sleep(0.5)
    address = rec.address
    node = start_node(host, RayPorts.for_node(base_port, index), index, workers, temp_dir, address,
                      gpus)
    log.info("node %d joined the site's Ray head at %s", index, address)
    lost_since = None
    try:
        while True:
            time.sleep(1.0)
            if should_stop():
                return "stopped"
            if node.dead_processes():
                return "ray processes exited"
            now = store.head(site)
            if now is None or now.address != address or now.state != "up":
                return "head went down"
            if (store.liveness().get(site) or {}).get("state") in TERMINAL:
                return "site finished"
            if reachable(address):
                lost_since = None
                continue
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > HEAD_LOST_S:
                return "head unreachable"
    finally:
        stop_node(node)
