"""Booting for the GCE stand-in (tests/fakes/gce_server.py): a per-instance metadata
server and the instance's `startup-script` run as a `BootedNode`.

Also the pieces the Azure stand-in shares (`BootConfig`, `serve`, `stop_servers`,
`stop_nodes`).

Per instance, `GceInstanceMetadata` serves on 127.0.0.1:<free port> what the real
metadata server serves a VM (every request must carry `Metadata-Flavor: Google`, and
one carrying `X-Forwarded-For` is refused, like the real one; every answer carries
`Metadata-Flavor: Google` and an `ETag`):

    /computeMetadata/v1/instance/name | id | hostname | zone (projects/<num>/zones/<zone>)
    /computeMetadata/v1/instance/machine-type | preempted (FALSE / TRUE) | maintenance-event
    /computeMetadata/v1/instance/network-interfaces/0/ip (its node's private address)
    /computeMetadata/v1/instance/attributes/<key>      the instance's metadata items
    /computeMetadata/v1/instance/service-accounts/...  only with a serviceAccounts entry
        ( /, default/, default/email, default/aliases, default/scopes, default/token,
          default/identity?audience=A: an identity token whose claims `claims_of` gives )
        the token is the fixed `token`, or, with `mint`, one from mint() handed out
        again until it has under TOKEN_REUSE_S left (how FakeGCE gives each instance its own)
    /computeMetadata/v1/project/project-id | numeric-project-id
    /computeMetadata/v1/universe/universe-domain

Directories list their children; `?recursive=true` answers JSON (camelCase keys, like
the real server); `?alt=json` / `?alt=text` are honoured. `?wait_for_change=true`
(with `last_etag` and `timeout_sec`) is a hanging GET: it answers at once when the value's
ETag differs from `last_etag`, else when the value changes or `timeout_sec` runs out
(with the unchanged value, as GCE does). `preempt()` flips `preempted` to TRUE and wakes
every hanging GET.

Where nodes get networks of their own (tests/fakes/netns.py), `Booter.boot(..., nic=)`
puts the node on its cloud network's private side at the address the cloud assigned
(GCE: the instance's `networkIP`, on its VPC network; Azure: its NIC's private address,
on its virtual network; `Booter.networks` holds them), and the metadata server answers
that address (`private_ip`); else 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tests.fakes import netns
from tests.fakes.node import BootedNode

FLAVOR = {"Metadata-Flavor": "Google"}
MAX_HANG_S = 600.0  # a hanging GET without timeout_sec is bounded anyway
TOKEN_REUSE_S = 300.0  # GCE hands out its cached token until it has 5 minutes left


@dataclass
class BootConfig:
    """How a stand-in cloud boots what it creates.

    image_bin  the node image's bin directory (tests.fakes.node.node_image)
    workdir    each node gets its own root directory under it
    node_env   extra environment for every node (e.g. the store emulator's address)
    grace_s    SIGTERM -> SIGKILL grace when an instance is deleted
    """
    image_bin: Path
    workdir: Path
    node_env: dict[str, str] = field(default_factory=dict)
    grace_s: float = 5.0


def serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A threaded HTTP server for `handler` on 127.0.0.1:<free port>, already serving."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True,
                     name=f"standin-{server.server_address[1]}").start()
    return server


def stop_servers(*servers: ThreadingHTTPServer | None) -> None:
    for server in servers:
        if server is not None:
            server.shutdown()
            server.server_close()


def stop_nodes(nodes: list[BootedNode], grace_s: float) -> None:
    """Stop several nodes at once (each takes up to its grace period)."""
    threads = [threading.Thread(target=n.stop, args=(grace_s,), daemon=True) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _etag(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _camel(key: str) -> str:
    head, *rest = key.split("-")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


class GceInstanceMetadata:
    """The metadata server one booted GCE instance sees."""

    def __init__(self, *, name: str, instance_id: str, zone: str, project: str,
                 project_number: str, machine_type: str, attributes: dict[str, str],
                 service_account: str | None, scopes: list[str], token: str | None,
                 mint: Callable[[], tuple[str, float]] | None = None):
        self.name, self.instance_id, self.zone = name, instance_id, zone
        self.project, self.project_number = project, project_number
        self.machine_type = machine_type
        self.attributes = dict(attributes)
        self.service_account, self.scopes, self.token = service_account, scopes, token
        self.mint = mint  # () -> (token, expires_at): a fresh access token
        self.token_expires_at = 0.0  # of the token mint() gave last
        self.preempted = False
        self.private_ip = "127.0.0.1"  # its node's (Booter.boot sets it)
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, query)
        self.token_requests = 0
        self.identity_tokens: dict[str, dict] = {}  # issued OIDC token -> its claims
        self._cond = threading.Condition()
        self._closed = False
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> GceInstanceMetadata:
        self._server = serve(type("Handler", (_GceMetadataHandler,), {"md": self}))
        return self

    def stop(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        stop_servers(self._server)
        self._server = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def preempt(self) -> None:
        with self._cond:
            self.preempted = True
            self._cond.notify_all()

    def waiting(self, path_suffix: str = "instance/preempted") -> bool:
        """Whether a hanging GET on `path_suffix` has been received."""
        with self._cond:
            return any(p.endswith(path_suffix) and q.get("wait_for_change") == "true"
                       for _, p, q in self.requests)

    # -- content -----------------------------------------------------------
    def tree(self) -> dict:
        instance = {
            "name": self.name, "id": self.instance_id,
            "hostname": f"{self.name}.{self.zone}.c.{self.project}.internal",
            "zone": f"projects/{self.project_number}/zones/{self.zone}",
            "machine-type": f"projects/{self.project_number}/machineTypes/{self.machine_type}",
            "preempted": "TRUE" if self.preempted else "FALSE",
            "maintenance-event": "NONE",
            "network-interfaces": {"0": {
                "ip": self.private_ip,
                "network": f"projects/{self.project_number}/networks/default"}},
            "attributes": dict(self.attributes),
        }
        if self.service_account:
            account = {"aliases": ["default"], "email": self.service_account,
                       "scopes": list(self.scopes)}
            instance["service-accounts"] = {"default": account, self.service_account: account}
        return {"instance": instance,
                "project": {"project-id": self.project,
                            "numeric-project-id": self.project_number},
                "universe": {"universe-domain": "googleapis.com"}}

    def lookup(self, parts: list[str]):
        node = self.tree()
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node


def _render(node, recursive: bool, alt: str | None, is_dir: bool) -> tuple[str, str]:
    """(content type, body) of a tree node as the metadata server prints it."""
    if isinstance(node, dict):
        if recursive or alt == "json":
            def conv(n):
                return {_camel(k): conv(v) for k, v in n.items()} if isinstance(n, dict) else n
            return "application/json", json.dumps(conv(node) if recursive else
                                                  [k + ("/" if isinstance(v, dict) else "")
                                                   for k, v in node.items()])
        return "application/text", "".join(
            k + ("/" if isinstance(v, dict) else "") + "\n" for k, v in node.items())
    if alt == "json":
        return "application/json", json.dumps(node)
    if isinstance(node, list):
        return "application/text", "".join(f"{v}\n" for v in node)
    return "application/text", str(node)


class _GceMetadataHandler(BaseHTTPRequestHandler):
    md: GceInstanceMetadata
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: str, ctype: str = "application/text",
              etag: str | None = None) -> None:
        data = body.encode()
        try:
            self.send_response(status)
            self.send_header("Metadata-Flavor", "Google")
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            if etag:
                self.send_header("ETag", etag)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # a hanging GET's caller went away
            self.close_connection = True

    def do_POST(self):  # google-auth POSTs for a bound token when it holds a certificate
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.do_GET()

    def do_GET(self):
        md = self.md
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with md._cond:
            md.requests.append((self.command, url.path, query))
        if url.path == "/":
            return self._send(200, "computeMetadata/\n")
        if self.headers.get("X-Forwarded-For"):
            return self._send(403, "Request forbidden: X-Forwarded-For header present.")
        if self.headers.get("Metadata-Flavor") != "Google":
            return self._send(403, "Missing Metadata-Flavor:Google header.")
        prefix = "/computeMetadata/v1/"
        if url.path.rstrip("/") + "/" == prefix:
            return self._send(200, "instance/\nproject/\nuniverse/\n")
        if not url.path.startswith(prefix):
            return self._send(404, "not found")
        rest = url.path[len(prefix):]
        is_dir = rest.endswith("/")
        parts = [p for p in rest.split("/") if p]
        if parts[:2] == ["instance", "service-accounts"] and parts[-1:] == ["token"]:
            return self._token(parts)
        if parts[:2] == ["instance", "service-accounts"] and parts[-1:] == ["identity"]:
            return self._identity(parts, query)
        status, ctype, body = self._value(parts, query, is_dir)
        if status != 200 or query.get("wait_for_change") != "true":
            return self._send(status, body, ctype, _etag(body) if status == 200 else None)
        # A hanging GET: answer when the value's ETag differs from last_etag.
        last = query.get("last_etag") or _etag(body)
        try:
            timeout_s = min(float(query.get("timeout_sec") or MAX_HANG_S), MAX_HANG_S)
        except ValueError:
            return self._send(400, "invalid timeout_sec")
        deadline = time.monotonic() + timeout_s
        with md._cond:
            while True:
                status, ctype, body = self._value(parts, query, is_dir)
                left = deadline - time.monotonic()
                if status != 200 or _etag(body) != last or left <= 0 or md._closed:
                    break
                md._cond.wait(left)
        self._send(status, body, ctype, _etag(body) if status == 200 else None)

    def _value(self, parts: list[str], query: dict, is_dir: bool) -> tuple[int, str, str]:
        node = self.md.lookup(parts)
        if node is None:
            return 404, "text/html", "not found"
        ctype, body = _render(node, query.get("recursive") == "true", query.get("alt"), is_dir)
        return 200, ctype, body

    def _identity(self, parts: list[str], query: dict) -> None:
        """An OIDC identity token of the instance's service account for `audience` (what
        AWS STS takes by web identity); its claims are kept here for a verifier."""
        md = self.md
        if md.lookup(parts[:-1]) is None:
            return self._send(404, "not found", "text/html")
        if not query.get("audience"):
            return self._send(400, "non-empty audience parameter required", "text/html")
        token = f"gce-oidc.{secrets.token_urlsafe(24)}"
        with md._cond:
            md.identity_tokens[token] = {"email": md.service_account, "aud": query["audience"],
                                         "sub": f"sa-{md.service_account}", "exp": time.time() + 3600}
        self._send(200, token, "application/text")

    def _token(self, parts: list[str]) -> None:
        md = self.md
        if md.lookup(parts[:-1]) is None:  # no service account attached (or not this one)
            return self._send(404, "not found", "text/html")
        with md._cond:
            md.token_requests += 1
            if md.mint is None:  # a fixed token, always fresh
                token, left = md.token, 3599
            else:
                if md.token is None or md.token_expires_at - time.time() < TOKEN_REUSE_S:
                    md.token, md.token_expires_at = md.mint()
                token, left = md.token, int(md.token_expires_at - time.time())
        self._send(200, json.dumps({"access_token": token, "expires_in": max(left, 0),
                                    "token_type": "Bearer"}), "application/json")


class Booter:
    """The booted instances of one stand-in cloud: a metadata server and a node each.

    Keys are the cloud's own (GCE: (zone, name); Azure: the VM's lowercase id). A
    metadata server is anything with start() / stop()."""

    def __init__(self, config: BootConfig):
        self.config = config
        self.metadata: dict = {}
        self.history: list[BootedNode] = []  # every node ever booted, gone ones too
        self.nodes: dict[object, BootedNode] = {}
        self.networks = netns.Networks()  # the cloud's networks' private sides, by network
        self._lock = threading.Lock()
        self._stoppers: list[threading.Thread] = []

    def nic(self, network: str, address: str | None, prefix: int) -> netns.Nic | None:
        """The instance's interface at `address` on `network`'s private side; None where
        nodes share this machine's network (or the cloud gave it no address)."""
        if not address or not netns.use_isolated():
            return None
        return self.networks.nic(network, address, prefix)

    def boot(self, key, md, script: str | None, tag: str, root_name: str,
             env: Callable[[object], dict[str, str]], nic: netns.Nic | None = None
             ) -> BootedNode | None:
        """Start the instance's metadata server, then its boot script (if any) as a node
        tagged `tag` under workdir/root_name, with `env(md)` and the config's node_env,
        on `nic` (its private address, which `md.private_ip` answers) where it has one."""
        md.start()
        node = None
        if script is not None:
            root = Path(self.config.workdir) / root_name
            node = BootedNode(tag, script, root, Path(self.config.image_bin),
                              {**env(md), **self.config.node_env}, nic=nic)
            md.private_ip = node.private_ip
        with self._lock:
            self.metadata[key] = md
            if node is not None:
                self.nodes[key] = node
                self.history.append(node)
        if node is not None:
            node.start()
        return node

    def halt(self, key, wait: bool = False) -> None:
        """Stop the instance's node (its whole tree), then its metadata server; in the
        background unless `wait`."""
        with self._lock:
            md = self.metadata.pop(key, None)
            node = self.nodes.pop(key, None)
        if md is None and node is None:
            return

        def run():
            if node is not None:
                node.stop(self.config.grace_s)
            if md is not None:
                md.stop()
        if wait:
            return run()
        t = threading.Thread(target=run, daemon=True, name=f"halt-{key}")
        with self._lock:
            self._stoppers = [s for s in self._stoppers if s.is_alive()] + [t]
        t.start()

    def stop(self) -> None:
        """Stop every node and metadata server; returns when they are all gone."""
        with self._lock:
            nodes, mds = list(self.nodes.values()), list(self.metadata.values())
            self.nodes.clear()
            self.metadata.clear()
            stoppers = list(self._stoppers)
        stop_nodes(nodes, self.config.grace_s)
        for md in mds:
            md.stop()
        for t in stoppers:
            t.join()
        self.networks.close()


def gce_env(md: GceInstanceMetadata) -> dict[str, str]:
    """What a booted GCE instance's environment says about its metadata server."""
    return {"GCE_METADATA_HOST": md.host, "GCE_METADATA_IP": md.host,
            "GEOTRAIN_METADATA_ENDPOINT": md.url, "NO_PROXY": "127.0.0.1,localhost"}
