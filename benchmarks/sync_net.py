"""Thin links for the sync benchmark: one network namespace per site, joined by a
bridge in the root namespace, every veth rate-limited with `tc tbf` both ways.

    with Links(n_sites=3, mbit=100) as links:      # needs root and iproute2
        links.site_ip(0), links.hub_ip               # the store listens on hub_ip
        links.wrap(0, [python, ...])                 # a command run inside site 0
        links.wire_bytes(0)                          # bytes site 0 moved on its link

Each site's link is `rate` up (tbf on the site's end of its veth) and `rate` down
(tbf on the root end). Site-to-site traffic (gloo) crosses two links, so it is
limited by the slower of sender's upload and receiver's download, as between
two cloud regions. netem is not available on this kernel, so there is no delay
here: callers model latency themselves (see benchmarks/sync_site.py).

Everything created is named `gtb<pid>…` and removed on exit, by `close()`,
`atexit`, or the next `Links` of the same pid.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


class LinksUnavailable(RuntimeError):
    """Namespaces or tc cannot be used here (not root, no iproute2, no tbf)."""


def _run(*cmd: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise LinksUnavailable(f"{' '.join(cmd)}: {p.stderr.strip() or p.returncode}")


def unavailable_reason() -> str | None:
    """Why thin links cannot be built here, or None if they can."""
    if os.geteuid() != 0:
        return "not root: network namespaces need CAP_NET_ADMIN"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    return None


class Links:
    """n sites, each in its own namespace behind a `mbit` Mbit/s link."""

    def __init__(self, n_sites: int, mbit: float, burst_kbit: int = 64):
        reason = unavailable_reason()
        if reason:
            raise LinksUnavailable(reason)
        self.n, self.mbit, self.burst_kbit = n_sites, mbit, burst_kbit
        self.prefix = f"gtb{os.getpid()}"
        pid = os.getpid()
        # A private /24 per benchmark process, so concurrent runs do not collide.
        self.net = f"10.{200 + pid % 50}.{(pid // 50) % 250}"
        self.hub_ip = f"{self.net}.1"
        atexit.register(self.close)

    def ns(self, i: int) -> str:
        return f"{self.prefix}s{i}"

    def site_ip(self, i: int) -> str:
        return f"{self.net}.{10 + i}"

    def site_dev(self, i: int) -> str:
        return f"{self.prefix}n{i}"

    def root_dev(self, i: int) -> str:
        return f"{self.prefix}r{i}"

    def __enter__(self) -> Links:
        self.close()  # leftovers of a crashed run of this pid
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        br = f"{self.prefix}br"
        _run("ip", "link", "add", br, "type", "bridge")
        _run("ip", "addr", "add", f"{self.hub_ip}/24", "dev", br)
        _run("ip", "link", "set", br, "up")
        tbf = ["tbf", "rate", f"{self.mbit}mbit", "burst", f"{self.burst_kbit}kbit", "latency", "50ms"]
        for i in range(self.n):
            ns, r, s = self.ns(i), self.root_dev(i), self.site_dev(i)
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", r, "type", "veth", "peer", "name", s)
            _run("ip", "link", "set", s, "netns", ns)
            _run("ip", "link", "set", r, "master", br, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.site_ip(i)}/24", "dev", s)
            _run("ip", "-n", ns, "link", "set", s, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("tc", "qdisc", "add", "dev", r, "root", *tbf)                       # down
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", s, "root", *tbf)  # up

    def close(self) -> None:
        """Remove every namespace and link of this pid (idempotent)."""
        for i in range(getattr(self, "n", 0)):
            subprocess.run(["ip", "netns", "del", self.ns(i)], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{self.prefix}br"], capture_output=True)

    def wrap(self, i: int, cmd: list[str]) -> list[str]:
        """`cmd` run inside site i's namespace."""
        return ["ip", "netns", "exec", self.ns(i), *cmd]

    def wire_bytes(self, i: int) -> int:
        """Bytes (both directions, with TCP/IP headers) on site i's link so far."""
        stats = Path(f"/sys/class/net/{self.root_dev(i)}/statistics")
        return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())


def start_moto(host: str) -> tuple[subprocess.Popen, str]:
    """A moto S3 server on host:free port; returns (process, endpoint URL)."""
    moto = Path(sys.executable).with_name("moto_server")
    if not moto.exists():
        raise LinksUnavailable(f"moto_server not found next to {sys.executable} "
                               f"(pip install -e '.[test]')")
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    # moto with S3's conditional writes atomic (tests/atomic_moto.py), as the tests run it
    atomic = Path(__file__).resolve().parent.parent / "tests" / "atomic_moto.py"
    proc = subprocess.Popen([sys.executable, str(atomic), "-H", host, "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(lambda: proc.poll() is None and proc.kill())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return proc, f"http://{host}:{port}"
        except OSError:
            if proc.poll() is not None:
                raise LinksUnavailable(f"moto_server exited with {proc.returncode}") from None
            time.sleep(0.1)
    proc.kill()
    raise LinksUnavailable(f"moto_server did not answer on {host}:{port}")
