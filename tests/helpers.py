"""Shared test helpers: run the CLI as a user would, wait for conditions,
find what a run left running, make raw HTTP requests to local servers."""

from __future__ import annotations

import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from geotrain import procs
from providers import local

T = TypeVar("T")


def geotrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "geotrain", *args]


def wait_for(predicate: Callable[[], T], timeout: float, every: float = 0.25) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"condition not met within {timeout} s")


def tagged_processes(run_id: str) -> list[int]:
    """Live processes on this machine tagged with the run (agents, Ray, workers)."""
    return local.processes(run_id)


def processes_of_home(home: Path) -> list[int]:
    """Live processes of this machine, other than this one, started with
    GEOTRAIN_HOME=home: a run's controller, its local sites, their Ray and workers."""
    want, me = str(home), os.getpid()
    return [pid for pid in (int(e) for e in os.listdir("/proc") if e.isdigit())
            if pid != me and procs.environ(pid).get("GEOTRAIN_HOME") == want and procs.alive(pid)]


@pytest.fixture
def geotrain_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A GEOTRAIN_HOME of the test's own. Whatever the test left running under it
    (a detached run of a test that failed half way) is killed at teardown, so one
    failure does not leave a run training beside every later test. Tests that
    promise no leftovers assert it themselves, before this."""
    home = tmp_path / "home"
    monkeypatch.setenv("GEOTRAIN_HOME", str(home))
    yield home
    for pid in processes_of_home(home):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy


def http(method: str, url: str, headers: dict | None = None, data: bytes | None = None,
         timeout: float = 10):
    """(status, headers, body) of a raw request, error statuses included."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with _direct.open(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state held by pids."""
    inodes: dict[str, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            addr_hex, port_hex = f[1].split(":")
            inodes[f[9]] = (_addr(addr_hex), int(port_hex, 16))
    out = []
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = fd.readlink().name
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                out.append((pid, *inodes[target[8:-1]]))
    return out


def _addr(hex_addr: str) -> str:
    import ipaddress

    raw = bytes.fromhex(hex_addr)
    # /proc/net prints each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def control_key_option(home: Path, run_id: str) -> tuple[str, str]:
    """The plan option that gives a site the public half of its run's control key, as
    the controller does (what a test passes when it launches a site itself)."""
    from geotrain.state import StateDB
    from geotrain.store.control import ControlKey

    key = ControlKey.from_private(StateDB(home).run(run_id)["control_key"])
    return ("control_key", key.public_text())


def member_key_of(home: Path, run_id: str, member: str) -> str:
    """A member's private signing key, as the controller gives it to the site it launches
    (what a test passes as SitePlan.member_key when it launches a site itself)."""
    import json

    from geotrain.state import StateDB

    return json.loads(StateDB(home).run(run_id)["member_keys"])[member]


def as_member(ctl, member: str):
    """The run store as a node of `member` writes it, signed with that member's key: how a
    test plays a site beside a real controller, which believes only signed site records."""
    from geotrain.store import RunStore

    return RunStore(ctl.store.url, control=ctl.store.control, site_key=None,
                    member_key=ctl._member_key(member))


def bundle_cache() -> dict[str, str]:
    """The session's shared cache of node bundles (tests/conftest.py), for a CLI
    environment built from scratch: a launch then reuses the wheel the session built."""
    key = "GEOTRAIN_BUNDLE_CACHE"
    return {key: os.environ[key]} if key in os.environ else {}
