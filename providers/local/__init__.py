"""The local provider: each site is a process tree on this machine.

A site is its agent process (a new session, so its process group is its own)
plus the Ray cluster the agent starts, bound to 127.0.0.1 with its own temp
dir and its own auth token. Every process of a site carries GEOTRAIN_RUN and
GEOTRAIN_SITE in its environment — Ray's workers inherit it — which is what
`query` and `terminate` look for in /proc: the local equivalent of cloud tags.
GEOTRAIN_OWNER carries the launching home's owner id (the `geotrain-owner` tag).
Nothing is ever killed by name; /proc is read through geotrain.procs only.

A site's temp dir is mkdtemp'ed under the owner-only /tmp/gt-<uid> (GEOTRAIN_TEMP_DIR
in its processes' environment; `terminate` removes it if the agent could not), and
its metadata stand-in takes control POSTs only with the site's GEOTRAIN_NOTICE_SECRET.

See providers/__init__.py for the contract.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from geotrain import procs
from providers import Capabilities, CredentialCheck, Node, SitePlan

HOST = "127.0.0.1"
TEMP_ROOT = Path("/tmp")  # not $TMPDIR: a long one would push Ray's socket paths over their limit
TEMP_MARKER = ".geotrain-site"  # {"run", "site"} in each site's temp dir
GRACE_S = 10.0
_children: dict[int, subprocess.Popen] = {}  # agents this process started, to reap


def capabilities() -> Capabilities:
    return Capabilities(spot=False, multi_node=False, preemption_notice=False, gpus=False,
                        runs_here=True, fault_seams=True)


def check() -> CredentialCheck:
    return CredentialCheck("local", True, f"processes on this machine ({os.cpu_count()} cores)")


def open_ports(plan: SitePlan) -> None:
    """Nothing to open: a local site binds only 127.0.0.1."""


def _instance_id(pid: int) -> str:
    # pid@start-time, so a recycled pid is never mistaken for our process.
    return f"{pid}@{procs.start_time(pid)}"


def _temp_base() -> Path:
    """TEMP_ROOT/gt-<uid>, owner-only (0700): where every local site's temp dir is made.
    Refused when it is not a plain directory of this user (someone else made it first)."""
    base = TEMP_ROOT / f"gt-{os.getuid()}"
    try:
        base.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        from geotrain.errors import ProviderError

        raise ProviderError(f"{base} is not a directory owned by you (uid {os.getuid()}); local "
                            "sites keep their temp dirs there: remove it and launch again")
    if st.st_mode & 0o077:
        os.chmod(base, 0o700)
    return base


def _make_temp_dir(run_id: str, site: str) -> str:
    """A fresh, unpredictable, owner-only temp dir for one site (Ray's sessions, the
    gloo rendezvous), marked with the run and site it belongs to so `terminate` can
    remove it when the agent could not (SIGKILL). Short on purpose: Ray's unix
    sockets live inside it and a socket path is limited to ~107 characters."""
    path = tempfile.mkdtemp(prefix="", dir=_temp_base())
    fd = os.open(os.path.join(path, TEMP_MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"run": run_id, "site": site}, f)
    return path


def _remove_temp_dirs(keys: set[tuple[str, str]]) -> list[str]:
    """Remove the temp dirs of these (run, site)s that no live process uses any more
    (GEOTRAIN_TEMP_DIR tags who uses which). The agent removes its own on exit; this
    catches an agent that was killed. Returns the dirs removed."""
    base = TEMP_ROOT / f"gt-{os.getuid()}"
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    in_use = {t.get("GEOTRAIN_TEMP_DIR") for p, t in procs.tagged() if procs.alive(p)}
    removed = []
    for d in entries:
        try:
            owner = json.loads((d / TEMP_MARKER).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(owner, dict) and (owner.get("run"), owner.get("site")) in keys \
                and str(d) not in in_use:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


def launch(plan: SitePlan) -> list[Node]:
    from geotrain.site.notice_server import SECRET_ENV
    from geotrain.state import open_private, private_dir

    # The controller's log dir for the run (owner-only); never chmod the cwd without one.
    log_dir = private_dir(Path(plan.option("log_dir"))) if plan.option("log_dir") else Path(".")
    temp_dir = _make_temp_dir(plan.run_id, plan.site)
    # GEOTRAIN_NOTICE_SECRET: what `preempt` must show the site's notice endpoint; only the
    # site's processes have it (in their environment, readable in /proc by this user only).
    env = dict(os.environ, GEOTRAIN_RUN=plan.run_id, GEOTRAIN_SITE=plan.site,
               GEOTRAIN_HOME=_home(), GEOTRAIN_TEMP_DIR=temp_dir,
               RAY_AUTH_TOKEN=secrets.token_hex(32), PYTHONUNBUFFERED="1",
               # Without this Ray swaps 127.0.0.1 for the machine's external
               # address and listens there; with it every Ray port is loopback.
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", GLOO_SOCKET_IFNAME="lo",
               NCCL_SOCKET_IFNAME="lo")
    env.pop("RAY_ADDRESS", None)
    env.pop("GEOTRAIN_PROVIDER", None)
    env.pop("GEOTRAIN_OWNER", None)
    # The public half of the run's control key: what the site checks the controller's
    # records with (geotrain/store/control.py). Never inherited from this process.
    env.pop("GEOTRAIN_CONTROL_KEY", None)
    env.pop("GEOTRAIN_MEMBER_KEY", None)
    if plan.option("control_key"):
        env["GEOTRAIN_CONTROL_KEY"] = plan.option("control_key")
    if plan.member_key:  # the site's own signing key: in its processes' environment only
        env["GEOTRAIN_MEMBER_KEY"] = plan.member_key
    env[SECRET_ENV] = secrets.token_hex(32)
    if plan.owner:
        env["GEOTRAIN_OWNER"] = plan.owner
    with open_private(log_dir / f"{plan.site}.log") as log:
        # The site's own instance-metadata stand-in: `preempt()` announces a notice
        # there and the agent's AWS-format watcher sees it, as on a spot node.
        notice = subprocess.Popen([sys.executable, "-m", "geotrain.site.notice_server",
                                   "--provider", "aws", "--port", "0"],
                                  env=dict(env, GEOTRAIN_ROLE="notice"), stdout=subprocess.PIPE,
                                  stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        _children[notice.pid] = notice
        env["GEOTRAIN_METADATA_ENDPOINT"] = notice.stdout.readline().decode().strip()
        cmd = [sys.executable, "-m", "geotrain.site.agent", "--store", plan.store_url,
               "--site", plan.site, "--host", HOST, "--temp-dir", temp_dir,
               "--data-site", plan.option("data_site") or plan.site]
        proc = subprocess.Popen(cmd, env=dict(env, GEOTRAIN_ROLE="agent"), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    _children[proc.pid] = proc
    return [Node(plan.run_id, plan.site, "local", _instance_id(proc.pid), "running",
                 private_ip=HOST, pid=proc.pid, region=plan.region or "local")]


def preempt(run_id: str, site: str, notice_s: float = 30.0) -> None:
    """Fault seam: announce a spot preemption to a local site through its own
    metadata endpoint, so the agent's real watcher code path sees it. The endpoint
    wants the site's notice secret, which this reads from the agent's environment."""
    import urllib.request

    from geotrain.site.notice_server import SECRET_ENV, SECRET_HEADER

    for node in query(run_id, site):
        tags = procs.tags(node.pid)
        endpoint = tags.get("GEOTRAIN_METADATA_ENDPOINT", "")
        req = urllib.request.Request(f"{endpoint}/_geotrain/preempt?in_s={notice_s:g}", method="POST",
                                     headers={SECRET_HEADER: tags.get(SECRET_ENV, "")})
        with urllib.request.urlopen(req, timeout=5):
            pass


def kill(run_id: str, site: str) -> list[int]:
    """Fault seam: the site's machine is gone — SIGKILL every process of it, no notice."""
    pids = [p for p, r, s, _ in _tagged() if r == run_id and s == site and _alive(p)]
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap()
    return pids


def _is_agent(pid: int) -> bool:
    return "geotrain.site.agent" in procs.cmdline(pid)


def _tagged() -> list[tuple[int, str, str, str]]:
    """(pid, run, site, role) of every process on this machine carrying our tags."""
    return [(pid, t["GEOTRAIN_RUN"], t["GEOTRAIN_SITE"], t.get("GEOTRAIN_ROLE", ""))
            for pid, t in procs.tagged() if t.get("GEOTRAIN_SITE")]


def _alive(pid: int) -> bool:
    _reap()
    return procs.alive(pid)


def processes(run_id: str) -> list[int]:
    """Every live process tagged with the run: agents, their Ray processes, workers."""
    return sorted(p for p, r, _, _ in _tagged() if r == run_id and _alive(p))


def query(run_id: str, site: str | None = None, regions: list[str] | None = None) -> list[Node]:
    """One node per site with a live process tagged for the run. Its pid is the
    site's agent: the oldest process of the site that is not its metadata
    stand-in (or that stand-in, if nothing else of the site is left)."""
    found = [(p, s, role) for p, r, s, role in _tagged()
             if r == run_id and (site is None or s == site) and _alive(p)]
    nodes = []
    for s in sorted({s for _, s, _ in found}):
        pids = sorted(p for p, s2, role in found if s2 == s and role != "notice") or \
            sorted(p for p, s2, _ in found if s2 == s)
        agent = min(pids, key=lambda p: procs.start_time(p) or 0)
        nodes.append(Node(run_id, s, "local", _instance_id(agent), "running",
                          private_ip=HOST, pid=agent, region="local"))
    return nodes


def _home() -> str:
    from geotrain.recipe import default_home

    return str(default_home())


def _home_of(pid: int) -> str | None:
    return procs.tags(pid).get("GEOTRAIN_HOME")


def query_all() -> list[Node]:
    """Every site of every run started from this machine's GEOTRAIN_HOME. Locally the
    GEOTRAIN_HOME plays the part of a cloud account: runs of other homes on the same
    machine (other users, other tests) are never listed, so never terminated as orphans."""
    from dataclasses import replace

    home = _home()
    runs = sorted({r for p, r, _, _ in _tagged() if _alive(p) and _home_of(p) == home})
    return [replace(n, owner=procs.tags(n.pid).get("GEOTRAIN_OWNER") or None)
            for r in runs for n in query(r) if _home_of(n.pid) == home]


def terminate(nodes: list[Node]) -> list[Node]:
    """SIGTERM each site's agent (it shuts its Ray cluster down), then after a
    grace period SIGKILL whatever is still tagged for that site."""
    if not nodes:
        return []
    done, signalled = [], False
    for node in nodes:
        pid_str, _, started = node.instance_id.partition("@")
        pid = int(pid_str)
        _reap()
        # Only the process recorded (pid and start time), through a pidfd: never a recycled pid.
        if started.isdigit() and procs.signal_if_same(pid, int(started), signal.SIGTERM):
            # Only a live agent shuts its Ray cluster down; anything else is a leftover.
            signalled |= _is_agent(pid)
        done.append(node)
    # Only a live agent shuts its Ray cluster down; without one, kill at once.
    deadline = time.monotonic() + (GRACE_S if signalled else 0)
    keys = {(n.run_id, n.site) for n in nodes}
    while time.monotonic() < deadline:
        if not any((r, s) in keys and _alive(p) for p, r, s, _ in _tagged()):
            break
        time.sleep(0.1)
    for p, r, s, _ in _tagged():
        if (r, s) in keys and _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # What an agent killed before it could clean up left: its temp dir (once its processes are gone).
    deadline = time.monotonic() + GRACE_S
    while any((r, s) in keys and _alive(p) for p, r, s, _ in _tagged()) and time.monotonic() < deadline:
        time.sleep(0.1)
    _remove_temp_dirs(keys)
    return [Node(n.run_id, n.site, n.provider, n.instance_id, "terminated", n.private_ip, n.pid,
                 n.region) for n in done]


def _reap() -> None:
    """Collect the agents this process started that have exited (no zombies)."""
    for pid, proc in list(_children.items()):
        if proc.poll() is not None:
            del _children[pid]
