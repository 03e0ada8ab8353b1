"""The site agent: what runs on a site's head node.

It starts the site's own Ray cluster (bound to the site's private address,
token authentication on, with the node's GPUs), creates one TrainWorker per
worker (`workers: auto`: one per GPU, each actor holding one; 1 on a node without
GPUs), forms their group inside the site (NCCL when every rank has a usable CUDA
device, else gloo: geotrain/site/devices.py), runs the trainer, and watches the run store for
commands from the controller. It exits 0 when its share of the run is done
(or it was told to stop, or the cloud announced a preemption: then it marks
itself `preempting` and leaves at once), non-zero when training failed.

A site of several nodes (`--nodes N`) runs one agent per node: node 0 is
the head and does all of the above across every node's workers; the others
only join its Ray cluster (geotrain/site/cluster.py).

    python -m geotrain.site.agent --store file:///.../runs/RUN --site a
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback

import geotrain
from geotrain.errors import GeotrainError
from geotrain.recipe import Recipe
from geotrain.site import cluster, devices
from geotrain.site.preemption import Notice, watch_from_env
from geotrain.store import RunStore

OBJECT_STORE_BYTES = 80 * 1024 * 1024
DRAIN_S = 20.0  # at most this long to publish a partial round on a preemption notice
log = logging.getLogger("geotrain.site")


class Stopped(Exception):
    pass


LAST_BEAT_S = 30.0  # how long a site's last liveness write is retried


class Liveness:
    """Beats `sites/<site>/alive` every `every_s` from a thread, so the other
    sites and the controller can tell a live site from a lost one no matter
    how long a training step or a Ray start takes."""

    def __init__(self, store: RunStore, site: str, every_s: float = 1.0):
        self.store, self.site, self.every_s = store, site, every_s
        self.state = "starting"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)

    def start(self) -> Liveness:
        self._beat()
        self._thread.start()
        return self

    def _beat(self) -> bool:
        try:
            self.store.alive(self.site, self.state, pid=os.getpid())
            return True
        except Exception as e:  # noqa: BLE001 - a missed beat must not kill the site
            log.warning("liveness beat failed: %s", e)
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._beat()

    def stop(self, state: str, patience_s: float = LAST_BEAT_S) -> None:
        """Write the site's last state. A missed periodic beat is followed by the next
        one; the last has none after it, so it is retried (each try is already a
        store call with its own retries) for up to `patience_s`."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.state = state
        deadline = time.monotonic() + patience_s
        while not self._beat() and time.monotonic() < deadline:
            time.sleep(1.0)


class Preempted(Exception):
    def __init__(self, notice: Notice):
        super().__init__(notice)
        self.notice = notice


# A node that cannot report through the run store says why on its console
# (geotrain/site/node_info.py FATAL_PREFIX); the controller reads it from there.
FATAL_EXIT = 3


def fatal(message: str) -> None:
    line = " ".join(message.split())[:1000]
    from geotrain.site.node_info import FATAL_PREFIX

    print(FATAL_PREFIX + line, file=sys.stderr, flush=True)
    log.error("%s", line)


def _on_sigterm(signum, frame):
    raise Stopped(f"signal {signum}")


def start_ray(workers: int, host: str, temp_dir: str | None, gpus: int = 0) -> None:
    """A one-node site's Ray: a CPU per worker and the node's `gpus`."""
    import ray

    ray.init(address="local", num_cpus=workers, num_gpus=gpus, include_dashboard=False,
             object_store_memory=OBJECT_STORE_BYTES, _node_ip_address=host,
             _temp_dir=temp_dir, log_to_driver=True, configure_logging=False)


def form_local_group(store_url: str, site: str, data_site: str, workers: int, gpus: int,
                     temp_dir: str) -> cluster.Group:
    """`workers` TrainWorkers on this one node, each with one of its GPUs when it
    has `gpus`, in one group whose rendezvous is a FileStore under `temp_dir`."""
    import ray

    from geotrain.site.worker import TrainWorker

    actors = [TrainWorker.options(num_gpus=1 if gpus else 0).remote(
        store_url, site, rank, workers, data_site) for rank in range(workers)]
    ranks = ray.get([a.where.remote() for a in actors])
    backend, reason = devices.choose_backend(ranks)
    rendezvous = os.path.join(temp_dir, "group-rendezvous")
    sizes = ray.get([a.join.remote(rendezvous, backend) for a in actors])
    assert sizes == [workers] * workers, sizes
    return cluster.Group(tuple(actors), tuple(ranks), backend, reason)


def run_agent(store_url: str, site: str, host: str = "127.0.0.1", temp_dir: str | None = None,
              data_site: str | None = None, node_index: int = 0, nodes: int = 1,
              ray_port: int = cluster.DEFAULT_BASE_PORT, gpus: int | None = None) -> int:
    """Run one site. `site` is this member's name in the store; `data_site` the
    recipe site whose data shard it trains (they differ for a migrated site's
    replacement, which runs beside the old member until that one drains).
    With `nodes` > 1 this is node `node_index` of the site; node 0 leads.
    `gpus` is the node's GPU count for Ray; None: what torch sees here."""
    import ray

    temp_dir = temp_dir or tempfile.mkdtemp(prefix="gt-site-")
    if node_index > 0:
        gpus = devices.gpus_on_this_node() if gpus is None else gpus
        return run_node(store_url, site, host, temp_dir, data_site, node_index, ray_port, gpus)
    try:  # the first reads and the first write: what this node's identity must allow
        store = RunStore(store_url)
        recipe = Recipe.model_validate(store.read_run()["recipe"])
        data_site = data_site or site
        spec = next(s for s in recipe.sites if s.name == data_site)
        store.beat(site, {"state": "starting", "pid": os.getpid()})
    except Exception as e:  # noqa: BLE001 - nothing to report to but the console
        fatal(f"cannot use the run store {store_url}: {type(e).__name__}: {e}; this node's "
              "identity must be able to read and write it (see infra/<cloud>/README.md)")
        return FATAL_EXIT
    started = time.time()
    liveness = Liveness(store, site).start()
    store.event(site, "starting", f"site agent started (pid {os.getpid()})", pid=os.getpid(),
                store_settings=store.settings(),  # where retry/fault/endpoint settings came from
                geotrain=os.path.dirname(geotrain.__file__), version=geotrain.__version__)
    signal.signal(signal.SIGTERM, _on_sigterm)
    code, final = 1, "failed"
    notices, pending, head = None, [], None
    try:
        # GEOTRAIN_PROVIDER / GEOTRAIN_METADATA_ENDPOINT say where to watch; `notices.fired`
        # is the hook a drain step reads.
        notices = watch_from_env()
        # After the first beat: counting GPUs imports torch, which takes seconds.
        gpus = devices.gpus_on_this_node() if gpus is None else gpus
        per_node = devices.resolve_workers(spec.workers, gpus, f"site {data_site!r}: this node")
        t0 = time.time()
        if nodes > 1:
            head = cluster.start_head(host, ray_port, per_node, temp_dir, gpus)
            cluster.lead(store, site, host, ray_port, nodes)
        else:
            start_ray(per_node, host, temp_dir, gpus)
        store.event(site, "ray", f"Ray cluster up in {time.time() - t0:.1f} s ({nodes} node(s), "
                    f"{gpus} GPU(s) per node)", seconds=time.time() - t0, nodes=nodes, gpus=gpus)
        if nodes > 1:
            group = cluster.form_group(store_url, site, data_site, per_node, nodes, gpus)
        else:
            group = form_local_group(store_url, site, data_site, per_node, gpus, temp_dir)
        workers = group.actors
        store.event(site, "group", f"{group.backend} group of {len(workers)} rank(s) on {nodes} "
                    f"node(s): {group.reason}", world=len(workers), nodes=nodes,
                    backend=group.backend, reason=group.reason, ranks=list(group.ranks))
        pending = [w.train.remote() for w in workers]
        liveness.state = "running"
        results = []
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            results += ray.get(done)
            # Commands from before this agent started were for an earlier incarnation.
            if store.commanded(site, "stop", since=started):
                raise Stopped("stop command")
            store.follow_switch()  # the run store moved (geotrain migrate --store)
            if notices and notices.fired.is_set():
                raise Preempted(notices.notice)
        summary = next(r for r in results if r["rank"] == 0)
        store.event(site, "done", f"finished at round {summary['round']}", ranks_done=len(results), **{
            k: summary[k] for k in ("round", "bytes_sent", "bytes_received")},
            store_faults_injected=store.injected_faults())
        code, final = 0, "done"
    except Preempted as e:
        # Publish what we can: the trainer sends this round's progress so far as an
        # early contribution (bounded by the notice's deadline), then stops.
        liveness.state = "preempting"
        n = e.notice
        store.send_command(site, "drain")
        budget = DRAIN_S if n.deadline is None else max(0.0, min(DRAIN_S, n.deadline - time.time() - 5))
        ray.wait(pending, num_returns=len(pending), timeout=budget)
        ray.shutdown()
        store.beat(site, {"state": "preempting", "pid": os.getpid(), "notice": n.kind,
                          "deadline": n.deadline})
        store.event(site, "preempting", f"{n.provider} {n.kind} notice: {n.detail}",
                    provider=n.provider, notice=n.kind, deadline=n.deadline)
        notices.acknowledge()
        code, final = 0, "preempting"
    except (Stopped, KeyboardInterrupt) as e:
        store.beat(site, {"state": "stopped", "pid": os.getpid()})
        store.event(site, "stopped", f"stopped: {e}")
        code, final = 0, "stopped"
    except Exception as e:  # noqa: BLE001 - the agent reports every failure to the store
        cause = getattr(e, "cause", None) or e
        store.beat(site, {"state": "failed", "pid": os.getpid(), "error": str(cause)[:2000]})
        store.event(site, "failed", f"{type(cause).__name__}: {str(cause)[:500]}",
                    traceback=traceback.format_exc()[-4000:])
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if notices:
            notices.stop()
        liveness.stop(final)
        ray.shutdown()
        if head is not None:
            cluster.head_down(store, site)
            cluster.stop_node(head)
            cluster.reap_leftovers()
        shutil.rmtree(temp_dir, ignore_errors=True)
    return code


def run_node(store_url: str, site: str, host: str, temp_dir: str, data_site: str | None,
             node_index: int, ray_port: int, gpus: int = 0) -> int:
    """Node `node_index` > 0 of a multi-node site: join the head's Ray cluster
    and stay until the head goes away, the site is done, or a stop (command or
    SIGTERM). Its workers are placed and driven by node 0."""
    store = RunStore(store_url)
    recipe = Recipe.model_validate(store.read_run()["recipe"])
    spec = next(s for s in recipe.sites if s.name == (data_site or site))
    started = time.time()
    signal.signal(signal.SIGTERM, _on_sigterm)
    stop = lambda: store.commanded(site, "stop", since=started)  # noqa: E731
    try:
        per_node = devices.resolve_workers(spec.workers, gpus, f"site {spec.name!r}: node {node_index}")
        why = cluster.run_member(store, site, host, ray_port, node_index, per_node, temp_dir, stop,
                                 gpus=gpus)
        log.info("node %d left: %s", node_index, why)
        return 0
    except (Stopped, KeyboardInterrupt) as e:
        log.info("node %d stopped: %s", node_index, e)
        return 0
    except Exception as e:  # noqa: BLE001 - say why in the node's log, exit non-zero
        log.error("node %d failed: %s", node_index, e)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.reap_leftovers()
        shutil.rmtree(temp_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="geotrain-site-agent", description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="the run store URL")
    p.add_argument("--site", required=True, help="this site's name in the recipe")
    p.add_argument("--host", default="127.0.0.1", help="the site's private address Ray binds to; "
                   "'metadata': ask the cloud's metadata service")
    p.add_argument("--temp-dir", default=None, help="Ray's session directory for this site")
    p.add_argument("--data-site", default=None, help="the recipe site whose data this member "
                   "trains (default: --site)")
    p.add_argument("--node-index", type=int, default=0, help="this node's index in the site")
    p.add_argument("--nodes", type=int, default=1, help="nodes in the site")
    p.add_argument("--ray-port", type=int, default=cluster.DEFAULT_BASE_PORT,
                   help="a multi-node site's base Ray port (geotrain/site/cluster.py)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.host == "metadata":  # a cloud node: its private address, from its metadata service
        from geotrain.site.node_info import private_ip

        try:
            a.host = private_ip()
        except GeotrainError as e:
            fatal(str(e))
            return FATAL_EXIT
        log.info("private address from the metadata service: %s", a.host)
    from geotrain.store.control import CONTROL_KEY_ENV, MEMBER_KEY_ENV, SITE_SECRET_ENV

    # What this node checks the controller's records with, what it signs its own with,
    # and the secret its site's nodes share: all in the boot data, never in the store.
    missing = [n for n in (CONTROL_KEY_ENV, MEMBER_KEY_ENV, SITE_SECRET_ENV)
               if not os.environ.get(n)]
    if missing:
        fatal(f"{' and '.join(missing)} not set: a site agent runs only as launched by "
              "geotrain (its boot data carries them)")
        return FATAL_EXIT
    from geotrain.site import store_identity

    try:  # a store on another cloud: this node's own identity, exchanged for that cloud's
        store_identity.setup(a.store, a.site)
    except (GeotrainError, OSError) as e:
        fatal(f"cannot get credentials for the run store {a.store}: {e}")
        return FATAL_EXIT
    return run_agent(a.store, a.site, a.host, a.temp_dir, a.data_site, a.node_index, a.nodes,
                     a.ray_port)


if __name__ == "__main__":
    sys.exit(main())
