"""The local provider: each site is a process tree on this machine.

A site is its agent process (a new session, so its process group is its own)
plus the Ray cluster the agent starts, bound to 127.0.0.1 with its own temp
dir and its own auth token. Every process of a site carries GEOTRAIN_RUN and
GEOTRAIN_SITE in its environment — Ray's workers inherit it — which is what
`query` and `terminate` look for in /proc: the local equivalent of cloud tags.
GEOTRAIN_OWNER carries the launching home's owner id (the `geotrain-owner` tag).
Nothing is ever killed by name.

See providers/__init__.py for the contract.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from providers import Capabilities, CredentialCheck, Node, SitePlan

HOST = "127.0.0.1"
GRACE_S = 10.0
_children: dict[int, subprocess.Popen] = {}  # agents this process started, to reap


def capabilities() -> Capabilities:
    return Capabilities(spot=False, multi_node=False, preemption_notice=False, gpus=False)


def check() -> CredentialCheck:
    return CredentialCheck("local", True, f"processes on this machine ({os.cpu_count()} cores)")


def open_ports(plan: SitePlan) -> None:
    """Nothing to open: a local site binds only 127.0.0.1."""


def _instance_id(pid: int) -> str:
    # pid@start-time, so a recycled pid is never mistaken for our process.
    return f"{pid}@{_start_time(pid)}"


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def launch(plan: SitePlan) -> list[Node]:
    log_dir = Path(plan.option("log_dir") or ".")
    log_dir.mkdir(parents=True, exist_ok=True)
    temp_dir = f"/tmp/gt-{plan.run_id[-8:]}-{plan.site}"
    env = dict(os.environ, GEOTRAIN_RUN=plan.run_id, GEOTRAIN_SITE=plan.site,
               GEOTRAIN_HOME=_home(), RAY_AUTH_TOKEN=secrets.token_hex(32), PYTHONUNBUFFERED="1",
               # Without this Ray swaps 127.0.0.1 for the machine's external
               # address and listens there; with it every Ray port is loopback.
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", GLOO_SOCKET_IFNAME="lo")
    env.pop("RAY_ADDRESS", None)
    env.pop("GEOTRAIN_PROVIDER", None)
    env.pop("GEOTRAIN_OWNER", None)
    if plan.owner:
        env["GEOTRAIN_OWNER"] = plan.owner
    with open(log_dir / f"{plan.site}.log", "ab") as log:
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
    metadata endpoint, so the agent's real watcher code path sees it."""
    import urllib.request

    for node in query(run_id, site):
        endpoint = _environ(node.pid).get(b"GEOTRAIN_METADATA_ENDPOINT", b"").decode()
        req = urllib.request.Request(f"{endpoint}/_geotrain/preempt?in_s={notice_s:g}", method="POST")
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
    try:
        return b"geotrain.site.agent" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _environ(pid: int) -> dict[bytes, bytes]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split(b"=", 1) for kv in raw.split(b"\0") if b"=" in kv)


def _tagged() -> list[tuple[int, str, str, str]]:
    """(pid, run, site, role) of every process on this machine carrying our tags."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if b"GEOTRAIN_RUN=" not in environ:
            continue
        tags = dict(kv.split(b"=", 1) for kv in environ.split(b"\0") if b"=" in kv)
        run, site = tags.get(b"GEOTRAIN_RUN"), tags.get(b"GEOTRAIN_SITE")
        if run and site:
            out.append((int(entry), run.decode(), site.decode(),
                        tags.get(b"GEOTRAIN_ROLE", b"").decode()))
    return out


def _alive(pid: int) -> bool:
    _reap()
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def processes(run_id: str) -> list[int]:
    """Every live process tagged with the run: agents, their Ray processes, workers."""
    return sorted(p for p, r, _, _ in _tagged() if r == run_id and _alive(p))


def query(run_id: str, site: str | None = None, regions: list[str] | None = None) -> list[Node]:
    """One node per site with a live process tagged for the run. Its pid is the
    site's agent: the oldest process of the site that is not its metadata
    stand-in (or that stand-in, if nothing else of the site is left)."""
    procs = [(p, s, role) for p, r, s, role in _tagged()
             if r == run_id and (site is None or s == site) and _alive(p)]
    nodes = []
    for s in sorted({s for _, s, _ in procs}):
        pids = sorted(p for p, s2, role in procs if s2 == s and role != "notice") or \
            sorted(p for p, s2, _ in procs if s2 == s)
        agent = min(pids, key=lambda p: int(_start_time(p) or 0))
        nodes.append(Node(run_id, s, "local", _instance_id(agent), "running",
                          private_ip=HOST, pid=agent, region="local"))
    return nodes


def _home() -> str:
    from geotrain.recipe import default_home

    return str(default_home())


def _home_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for kv in environ.split(b"\0"):
        if kv.startswith(b"GEOTRAIN_HOME="):
            return kv.split(b"=", 1)[1].decode()
    return None


def query_all() -> list[Node]:
    """Every site of every run started from this machine's GEOTRAIN_HOME. Locally the
    GEOTRAIN_HOME plays the part of a cloud account: runs of other homes on the same
    machine (other users, other tests) are never listed, so never terminated as orphans."""
    from dataclasses import replace

    home = _home()
    runs = sorted({r for p, r, _, _ in _tagged() if _alive(p) and _home_of(p) == home})
    return [replace(n, owner=_environ(n.pid).get(b"GEOTRAIN_OWNER", b"").decode() or None)
            for r in runs for n in query(r) if _home_of(n.pid) == home]


def terminate(nodes: list[Node]) -> list[Node]:
    """SIGTERM each site's agent (it shuts its Ray cluster down), then after a
    grace period SIGKILL whatever is still tagged for that site."""
    done, signalled = [], False
    for node in nodes:
        pid_str, _, started = node.instance_id.partition("@")
        pid = int(pid_str)
        if _start_time(pid) == started and _alive(pid):
            try:
                os.kill(pid, signal.SIGTERM)
                # Only a live agent shuts its Ray cluster down; anything else is a leftover.
                signalled |= _is_agent(pid)
            except ProcessLookupError:
                pass
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
    _reap()
    return [Node(n.run_id, n.site, n.provider, n.instance_id, "terminated", n.private_ip, n.pid,
                 n.region) for n in done]


def _reap() -> None:
    """Collect the agents this process started that have exited (no zombies)."""
    for pid, proc in list(_children.items()):
        if proc.poll() is not None:
            del _children[pid]
