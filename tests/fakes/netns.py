"""A stand-in node's own network: a Linux network namespace whose only way out is a
shaped link to the stand-in services it was given.

A real VM reaches its cloud's metadata service and the run store over a network, and
nothing else on the operator's machine. A `BootedNode` (tests/fakes/node.py) in
`isolated` mode gets the same: its process tree runs in a network namespace of its own
(only a loopback interface), so

- it cannot reach any port of this machine it was not given — a test's other servers,
  another node's Ray, the operator's services — and nothing outside reaches its ports;
- each service it was given (every `127.0.0.1:PORT` / `localhost:PORT` its boot data
  names: metadata service, store endpoint, identity proxy, a signed URL's host) is
  listened for on the namespace's loopback, at the same address and port, and relayed
  to the real one through a `Link`: one-way `delay_s` per chunk and `rate_bps` each
  way, shared by all the node's connections (its NIC), the shape of a link from a
  cloud region to an object store.

The namespace is made by `unshare(CLONE_NEWNET)` in a short-lived thread of this
process (a network namespace is per thread, so nothing else here moves), which also
brings its loopback up and binds the relay's listening sockets there (a socket stays in
the namespace it was made in). A file descriptor of the namespace is kept; the node's
boot is started through `nsenter --net=/proc/self/fd/N`. `close()` stops every relay.

A node of a cloud network also gets that network's private side: a `PrivateNetwork` is
the network's switch, a bridge in a namespace of its own (nothing is added to this
machine's own namespace), and `Namespace(..., nic=Nic(network, "172.31.5.9", 16))`
gives the node an `eth0` with that address, one end of a veth pair whose other end is
on the bridge. The nodes of one network reach each other at their private addresses
(a site's Ray cluster); nodes of different networks, and this machine, do not. The
stand-in clouds group their instances into networks (tests/fakes/ec2_boot.py: a VPC
and the security groups that admit their own members) and make each node's metadata
service answer its private address. A namespace here is never named (no /run/netns
entry): it is gone when its last file descriptor and process are, and its veth pairs
with it.

Where the machine does not allow it (no CAP_SYS_ADMIN, no nsenter, no `ip`),
`available()` says why and nodes run on this machine's network as before (their
private address is then 127.0.0.1). GEOTRAIN_STANDIN_NETWORK selects:
`auto` (the default: isolated where available), `isolated` (required: an error where
not available) or `host`. GEOTRAIN_STANDIN_LINK shapes the link, e.g.
`delay_ms=25,rate_mbit=100` (default DEFAULT_LINK: mild, so tests do not slow down).
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import itertools
import os
import queue
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
DEFAULT_LINK = "delay_ms=2,rate_mbit=1000"
LOCAL = re.compile(r"(?:127\.0\.0\.1|localhost):(\d{2,5})\b")
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Link:
    """One way's shape: every chunk arrives `delay_s` after it was sent, at most
    `rate_bps` bytes per second (0: unlimited)."""

    delay_s: float = 0.0
    rate_bps: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Link:
        """`delay_ms=25,rate_mbit=100` (either may be left out)."""
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            if key not in ("delay_ms", "rate_mbit"):
                raise ValueError(f"GEOTRAIN_STANDIN_LINK: unknown key {key!r}; valid: delay_ms, rate_mbit")
            values[key] = float(value)
        return cls(values.get("delay_ms", 0.0) / 1000, values.get("rate_mbit", 0.0) * 1e6 / 8)


def mode() -> str:
    """GEOTRAIN_STANDIN_NETWORK: auto, isolated or host."""
    value = os.environ.get("GEOTRAIN_STANDIN_NETWORK", "auto")
    if value not in ("auto", "isolated", "host"):
        raise ValueError(f"GEOTRAIN_STANDIN_NETWORK={value!r}; valid: auto, isolated, host")
    return value


def link_from_env() -> Link:
    return Link.parse(os.environ.get("GEOTRAIN_STANDIN_LINK", DEFAULT_LINK))


def ports_named(*texts: str) -> list[int]:
    """The loopback ports named in these texts (boot script, environment values)."""
    return sorted({int(p) for text in texts for p in LOCAL.findall(text) if 0 < int(p) < 65536})


def _lo_up() -> None:
    """Bring up the calling thread's loopback interface (a new namespace's is down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def _in_new_namespace(ports: list[int]) -> tuple[int, list[socket.socket]]:
    """(fd of a new network namespace, listening sockets on its 127.0.0.1:port for
    each port), made in a thread of its own. OSError if the kernel refuses."""
    out: dict = {}

    def body():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
            fd = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
            out["fd"] = fd
            _lo_up()
            listeners = []
            out["listeners"] = listeners
            for port in ports:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listeners.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen(64)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["error"] = e
    t = threading.Thread(target=body, name="netns-setup")
    t.start()
    t.join()
    if "error" in out:
        for s in out.get("listeners", []):
            s.close()
        if "fd" in out:
            os.close(out["fd"])
        raise out["error"]
    return out["fd"], out["listeners"]


@lru_cache(maxsize=1)
def available() -> str | None:
    """None when nodes can have their own network here; else why not."""
    if not shutil.which("nsenter"):
        return "nsenter (util-linux) is not installed"
    if not shutil.which("ip"):
        return "ip (iproute2) is not installed"
    try:
        fd, _ = _in_new_namespace([])
    except OSError as e:
        return f"cannot make a network namespace: {e.strerror or e}"
    os.close(fd)
    return None


def use_isolated() -> bool:
    """Whether a node should get its own network, per GEOTRAIN_STANDIN_NETWORK."""
    chosen = mode()
    if chosen == "host":
        return False
    why = available()
    if why and chosen == "isolated":
        raise RuntimeError(f"GEOTRAIN_STANDIN_NETWORK=isolated, but {why}")
    return why is None


@dataclass
class Stats:
    connections: int = 0
    refused: int = 0  # connections to a given port that nothing on this machine answered
    bytes_out: int = 0  # node -> service
    bytes_in: int = 0   # service -> node
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)


def live_namespaces() -> set[int]:
    """Inodes of the network namespaces that some process of this machine is in or holds
    open (a namespace without a name lives exactly as long as that)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            fds = []
        for path in [f"/proc/{pid}/ns/net", *fds]:
            try:
                target = os.readlink(path)
            except OSError:
                continue
            if target.startswith("net:["):
                found.add(int(target[5:-1]))
    return found


def _ip(fd: int, *args: str, extra_fds: tuple[int, ...] = ()) -> None:
    """Run `ip ARGS` in the network namespace open as `fd`."""
    p = subprocess.run(["nsenter", f"--net=/proc/self/fd/{fd}", "--", "ip", *args],
                       pass_fds=(fd, *extra_fds), capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {p.stderr.strip() or p.returncode}")


class PrivateNetwork:
    """One cloud network's switch: a bridge `br0` in a namespace of its own, to which
    `Namespace(nic=...)` attaches nodes. `close()` drops it (and so every veth on it)."""

    def __init__(self, name: str):
        self.name = name
        self.fd, _ = _in_new_namespace([])
        self.inode = os.fstat(self.fd).st_ino
        self._ports = itertools.count()
        self._lock = threading.Lock()
        try:
            _ip(self.fd, "link", "add", "br0", "type", "bridge")
            _ip(self.fd, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def attach(self, node_fd: int, address: str, prefix: int) -> None:
        """Give the namespace open as `node_fd` an `eth0` with `address`/`prefix`, wired
        to this network's bridge."""
        with self._lock:
            if self.fd < 0:
                raise RuntimeError(f"private network {self.name} is closed")
            port = f"p{next(self._ports)}"
        _ip(self.fd, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", f"/proc/self/fd/{node_fd}", extra_fds=(node_fd,))
        _ip(self.fd, "link", "set", port, "master", "br0", "up")
        _ip(node_fd, "addr", "add", f"{address}/{prefix}", "dev", "eth0")
        _ip(node_fd, "link", "set", "eth0", "up")

    def close(self) -> None:
        with self._lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


@dataclass(frozen=True)
class Nic:
    """A node's interface on a private network: its address and the network's prefix
    length (every address of the network is on the link, as a VPC's router makes it)."""

    network: PrivateNetwork
    address: str
    prefix: int

    def __post_init__(self):
        ipaddress.ip_interface(f"{self.address}/{self.prefix}")  # ValueError if not an address


class Networks:
    """The private networks of one stand-in cloud, made on first use by key (e.g. a VPC
    and its security groups); `close()` drops them all."""

    def __init__(self):
        self._lock = threading.Lock()
        self._made: dict = {}

    def nic(self, key, address: str, prefix: int) -> Nic:
        with self._lock:
            if key not in self._made:
                self._made[key] = PrivateNetwork(str(key))
            return Nic(self._made[key], address, prefix)

    def __len__(self) -> int:
        with self._lock:
            return len(self._made)

    def inodes(self) -> set[int]:
        """The switches' namespaces (see live_namespaces)."""
        with self._lock:
            return {net.inode for net in self._made.values()}

    def close(self) -> None:
        with self._lock:
            made, self._made = list(self._made.values()), {}
        for net in made:
            net.close()


class Namespace:
    """A node's network namespace and the shaped relays out of it; with `nic`, also an
    interface on that private network."""

    def __init__(self, ports: list[int], link: Link | None = None, nic: Nic | None = None):
        self.ports, self.link, self.nic = list(ports), link or link_from_env(), nic
        self.fd, self._listeners = _in_new_namespace(self.ports)
        self.inode = os.fstat(self.fd).st_ino  # the namespace's (see live_namespaces)
        if nic is not None:
            try:
                nic.network.attach(self.fd, nic.address, nic.prefix)
            except BaseException:
                for s in self._listeners:
                    s.close()
                os.close(self.fd)
                raise
        self.stats = Stats()
        self._closed = threading.Event()
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._busy_until: dict[str, float] = {}  # per way: when the link is free again
        self._threads = [threading.Thread(target=self._accept, args=(s, p), daemon=True,
                                          name=f"netns-relay-{p}")
                         for s, p in zip(self._listeners, self.ports)]
        for t in self._threads:
            t.start()

    def command(self, argv: list[str]) -> tuple[list[str], tuple[int, ...]]:
        """(argv, pass_fds) that run `argv` inside the namespace."""
        return ["nsenter", f"--net=/proc/self/fd/{self.fd}", "--", *argv], (self.fd,)

    def _track(self, s: socket.socket) -> bool:
        with self._lock:
            if self._closed.is_set():
                return False
            self._socks.add(s)
            return True

    def _accept(self, listener: socket.socket, port: int) -> None:
        while not self._closed.is_set():
            try:
                inside, _ = listener.accept()
            except OSError:
                return
            if not self._track(inside):
                inside.close()
                return
            try:
                outside = socket.create_connection(("127.0.0.1", port), timeout=10)
                outside.settimeout(None)
            except OSError:
                self.stats.add(refused=1)
                self._drop(inside)
                continue
            if not self._track(outside):
                outside.close()
                self._drop(inside)
                return
            self.stats.add(connections=1)
            ends = []  # the directions that ended; the second one closes both sockets

            def finished(clean: bool, inside=inside, outside=outside, ends=ends) -> None:
                with self._lock:
                    ends.append(clean)
                    last = len(ends) == 2
                if last or not clean:
                    self._drop(inside)
                    self._drop(outside)
            for src, dst, counter in ((inside, outside, "bytes_out"), (outside, inside, "bytes_in")):
                threading.Thread(target=self._pump, args=(src, dst, counter, finished),
                                 daemon=True, name=f"netns-pump-{port}").start()

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._socks.discard(s)
        try:
            s.close()
        except OSError:
            pass

    def _reserve(self, way: str, seconds: float) -> float:
        """Book `seconds` of the link one way (after what is booked already); how long
        to wait until the booking ends."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._busy_until.get(way, 0.0))
            self._busy_until[way] = start + seconds
        return start + seconds - now

    def _pump(self, src: socket.socket, dst: socket.socket, counter: str, finished) -> None:
        """src -> dst through the link: a reader stamps each chunk with when it is due,
        a writer sends it then, no faster than the link's rate. An EOF is passed on
        (half-close); an error on either side ends the connection."""
        due: queue.Queue = queue.Queue()
        delay, rate = self.link.delay_s, self.link.rate_bps

        def writer():
            clean = False
            try:
                while True:
                    at, data = due.get()
                    if data is False:  # the source failed: end the connection
                        return
                    if data is None:
                        dst.shutdown(socket.SHUT_WR)
                        clean = True
                        return
                    wait = at - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    if rate:  # the node's link, shared by all its connections
                        time.sleep(self._reserve(counter, len(data) / rate))
                    dst.sendall(data)
                    self.stats.add(**{counter: len(data)})
            except OSError:
                pass
            finally:
                finished(clean)
        w = threading.Thread(target=writer, daemon=True, name="netns-writer")
        w.start()
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    due.put((time.monotonic() + delay, None))
                    break
                due.put((time.monotonic() + delay, data))
        except OSError:
            due.put((0.0, False))
        w.join()

    def close(self) -> None:
        """Stop relaying: the listeners and every open connection are closed."""
        self._closed.set()
        with self._lock:
            socks, self._socks = list(self._socks), set()
        for s in self._listeners + socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(timeout=5)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
