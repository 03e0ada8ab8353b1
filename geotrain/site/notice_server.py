"""A local instance-metadata server that can be told to preempt: geotrain's fault seam.

It speaks, on 127.0.0.1, the documented preemption endpoints of the three
clouds, with their handshakes, headers and error codes, so the very same
watcher code (`geotrain.site.preemption`) runs against it as against a real
VM's metadata service:

- ``aws``   IMDSv2: ``PUT /latest/api/token`` (TTL header 1–21600 s, else 400)
  gives a session token; every ``GET`` needs ``X-aws-ec2-metadata-token``
  (missing, unknown or expired → 401). ``/latest/meta-data/spot/instance-action``
  and ``/latest/meta-data/events/recommendations/rebalance`` answer 404 until
  a notice is set.
- ``gcp``   ``/computeMetadata/v1/instance/preempted`` → ``TRUE``/``FALSE`` with
  an ``ETag``; ``wait_for_change=true`` (+ ``last_etag``, ``timeout_sec``) is a
  hanging GET that returns on change. No ``Metadata-Flavor: Google`` → 403.
- ``azure`` ``/metadata/scheduledevents?api-version=…`` → the Scheduled Events
  document; ``POST`` of ``{"StartRequests": [{"EventId": …}]}`` acknowledges
  (recorded in `acknowledged`). No ``Metadata: true`` → 400.

Every provider rejects requests carrying ``X-Forwarded-For`` as the real ones do.
Tests drive it in-process (`preempt`, `rebalance`, `clear`); another process can
``POST /_geotrain/preempt?in_s=30`` (or ``/_geotrain/rebalance``,
``/_geotrain/clear``) with the server's control secret in the
``X-Geotrain-Secret`` header — without it, or with a wrong one, 403 and nothing
changes. The secret is ``GEOTRAIN_NOTICE_SECRET`` from the environment (the
local provider generates one per site and gives it only to the site's
processes), else a random one, printed to stderr. The GET/PUT metadata
endpoints need no secret, as on a real VM. Run one with

    python -m geotrain.site.notice_server --provider aws --port 8999
"""

from __future__ import annotations

import argparse
import email.utils
import hmac
import json
import os
import secrets
import signal
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PROVIDERS = ("aws", "gcp", "azure")
SECRET_HEADER = "X-Geotrain-Secret"
SECRET_ENV = "GEOTRAIN_NOTICE_SECRET"
AWS_TOKEN_TTL_MAX = 21600
GCE_WAIT_MAX_S = 3600.0


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class NoticeServer:
    """One provider's metadata service on 127.0.0.1; `start()` returns its base URL."""

    def __init__(self, provider: str, vm_name: str = "geotrain-vm", host: str = "127.0.0.1",
                 port: int = 0, control_secret: str | None = None):
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; valid: {', '.join(PROVIDERS)}")
        self.provider, self.vm_name, self.host, self.port = provider, vm_name, host, port
        # What a POST to /_geotrain/* must carry in SECRET_HEADER (random unless given).
        self.control_secret = control_secret or secrets.token_hex(32)
        self.acknowledged: list[str] = []       # Azure EventIds POSTed in StartRequests
        self.requests: dict[str, int] = {}      # "METHOD /path" -> count, for tests
        self._cond = threading.Condition()
        self._tokens: dict[str, float] = {}     # AWS token -> expiry (monotonic)
        self._action: dict | None = None        # AWS instance-action document
        self._rebalance: dict | None = None     # AWS rebalance document
        self._preempted = False                 # GCE
        self._etag = secrets.token_hex(8)       # GCE
        self._events: list[dict] = []           # Azure
        self._incarnation = 1                   # Azure
        self._closing = False
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> str:
        handler = type("Handler", (_Handler,), {"server_state": self})
        self._httpd = ThreadingHTTPServer((self.host, self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="notice-server",
                                        daemon=True)
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()  # release hanging GETs
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> NoticeServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- faults ----------------------------------------------------------------------

    def preempt(self, in_s: float = 30.0, action: str = "terminate",
                resources: list[str] | None = None, event_type: str = "Preempt") -> None:
        """Announce a preemption `in_s` seconds from now (AWS: `action`; Azure: an
        event of `event_type` for `resources`, default this VM)."""
        at = time.time() + in_s
        with self._cond:
            if self.provider == "aws":
                self._action = {"action": action, "time": _iso(at)}
            elif self.provider == "gcp":
                if not self._preempted:
                    self._preempted, self._etag = True, secrets.token_hex(8)
            else:
                self._events.append({
                    "EventId": str(uuid.uuid4()).upper(), "EventType": event_type,
                    "ResourceType": "VirtualMachine", "Resources": resources or [self.vm_name],
                    "EventStatus": "Scheduled", "NotBefore": email.utils.formatdate(at, usegmt=True),
                    "Description": "Virtual machine is being evicted from Azure." if event_type == "Preempt"
                    else f"{event_type} scheduled.",
                    "EventSource": "Platform", "DurationInSeconds": -1})
                self._incarnation += 1
            self._cond.notify_all()

    def rebalance(self) -> None:
        """AWS only: post a rebalance recommendation (GCE and Azure have no such item)."""
        if self.provider != "aws":
            raise ValueError(f"{self.provider} has no rebalance recommendation; only aws does")
        with self._cond:
            self._rebalance = {"noticeTime": _iso(time.time())}

    def clear(self) -> None:
        """Back to no notice at all."""
        with self._cond:
            self._action = self._rebalance = None
            if self._preempted:
                self._preempted, self._etag = False, secrets.token_hex(8)
            if self._events:
                self._events, self._incarnation = [], self._incarnation + 1
            self._cond.notify_all()

    def expire_tokens(self) -> None:
        """AWS: every session token issued so far now answers 401."""
        with self._cond:
            self._tokens.clear()

    # -- request handling (called from the handler threads) --------------------------

    def _count(self, method: str, path: str) -> None:
        with self._cond:
            key = f"{method} {path}"
            self.requests[key] = self.requests.get(key, 0) + 1

    def handle(self, method: str, path: str, query: dict[str, str], headers, body: bytes):
        """-> (status, headers, body)."""
        self._count(method, path)
        if path.startswith("/_geotrain/"):
            given = headers.get(SECRET_HEADER) or ""
            if not hmac.compare_digest(given.encode(), self.control_secret.encode()):
                return 403, {}, b"Forbidden: the control endpoints need the server's secret"
            return self._control(method, path, query)
        if headers.get("X-Forwarded-For"):
            return (403 if self.provider != "azure" else 400), {}, b"Forbidden"
        return getattr(self, f"_{self.provider}")(method, path, query, headers, body)

    def _control(self, method, path, query):
        if method != "POST":
            return 405, {}, b"use POST"
        if path == "/_geotrain/preempt":
            self.preempt(float(query.get("in_s", 30)), action=query.get("action", "terminate"))
        elif path == "/_geotrain/rebalance":
            try:
                self.rebalance()
            except ValueError as e:
                return 400, {}, str(e).encode()
        elif path == "/_geotrain/clear":
            self.clear()
        else:
            return 404, {}, b"Not Found"
        return 200, {}, b"ok"

    def _aws(self, method, path, query, headers, body):
        text = {"Content-Type": "text/plain"}
        if path == "/latest/api/token":
            if method != "PUT":
                return 405, text, b"Method Not Allowed"
            ttl = headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= AWS_TOKEN_TTL_MAX:
                return 400, text, b"Bad Request"
            token = secrets.token_urlsafe(42)
            with self._cond:
                self._tokens[token] = time.monotonic() + int(ttl)
            return 200, dict(text, **{"X-aws-ec2-metadata-token-ttl-seconds": ttl}), token.encode()
        if method != "GET":
            return 405, text, b"Method Not Allowed"
        token = headers.get("X-aws-ec2-metadata-token", "")
        with self._cond:
            if self._tokens.get(token, 0.0) <= time.monotonic():
                return 401, text, b"Unauthorized"
            doc = {"/latest/meta-data/spot/instance-action": self._action,
                   "/latest/meta-data/events/recommendations/rebalance": self._rebalance}.get(path)
        if path == "/latest/meta-data/instance-id":
            return 200, text, f"i-{self.vm_name.encode().hex()[:17]:0<17}".encode()
        if doc is None:
            return 404, {"Content-Type": "text/html"}, b"<html><body><h1>404 - Not Found</h1></body></html>"
        return 200, text, json.dumps(doc).encode()

    def _gcp(self, method, path, query, headers, body):
        if headers.get("Metadata-Flavor") != "Google":
            return 403, {"Content-Type": "text/html"}, (
                b"Your client does not have permission to get URL from this server. "
                b"Missing Metadata-Flavor:Google header.")
        base = {"Metadata-Flavor": "Google", "Content-Type": "application/text"}
        if method != "GET":
            return 405, base, b"Method Not Allowed"
        if path == "/computeMetadata/v1/instance/name":
            return 200, base, self.vm_name.encode()
        if path != "/computeMetadata/v1/instance/preempted":
            return 404, base, b"Not Found"
        if query.get("wait_for_change") == "true":
            last = query.get("last_etag")
            timeout = min(float(query.get("timeout_sec", GCE_WAIT_MAX_S)), GCE_WAIT_MAX_S)
            with self._cond:
                start_etag = self._etag
                if last in (None, start_etag):  # nothing new yet: hang until a change
                    self._cond.wait_for(lambda: self._etag != start_etag or self._closing, timeout)
        with self._cond:
            value, etag = ("TRUE" if self._preempted else "FALSE"), self._etag
        return 200, dict(base, ETag=etag), value.encode()

    def _azure(self, method, path, query, headers, body):
        js = {"Content-Type": "application/json; charset=utf-8"}
        if headers.get("Metadata") != "true":
            error = "Bad request. Required metadata header not specified"
            return 400, js, json.dumps({"error": error}).encode()
        if "api-version" not in query:
            return 400, js, json.dumps({"error": "Bad request. api-version was not specified in the request. "
                                        "For more information refer to aka.ms/azureimds",
                                        "newest-versions": ["2020-07-01"]}).encode()
        if path == "/metadata/instance/compute/name" and method == "GET":
            return 200, {"Content-Type": "text/plain"}, self.vm_name.encode()
        if path != "/metadata/scheduledevents":
            return 404, js, json.dumps({"error": "Not found"}).encode()
        with self._cond:
            if method == "GET":
                doc = {"DocumentIncarnation": self._incarnation, "Events": self._events}
                return 200, js, json.dumps(doc).encode()
            if method != "POST":
                return 405, js, b"{}"
            try:
                ids = [r["EventId"] for r in json.loads(body)["StartRequests"]]
            except (ValueError, KeyError, TypeError):
                return 400, js, json.dumps({"error": "Bad request. Invalid StartRequests body"}).encode()
            known = {e["EventId"]: e for e in self._events}
            if not ids or any(i not in known for i in ids):
                return 400, js, json.dumps({"error": "Bad request. Unknown EventId"}).encode()
            for i in ids:
                self.acknowledged.append(i)
                known[i]["EventStatus"], known[i]["NotBefore"] = "Started", ""
            self._incarnation += 1
        return 200, js, b""


class _Handler(BaseHTTPRequestHandler):
    server_state: NoticeServer
    protocol_version = "HTTP/1.1"

    def _serve(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, headers, payload = self.server_state.handle(method, parts.path, query, self.headers, body)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_POST(self) -> None:
        self._serve("POST")

    def log_message(self, format: str, *args) -> None:  # quiet: tests poll many times a second
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m geotrain.site.notice_server",
                                description=__doc__.splitlines()[0])
    p.add_argument("--provider", choices=PROVIDERS, required=True)
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--vm-name", default="geotrain-vm", help="this VM's name (Azure Resources, GCE name)")
    p.add_argument("--preempt-after", type=float, default=None, metavar="S",
                   help="announce a preemption S seconds after start")
    p.add_argument("--notice-s", type=float, default=30.0, help="seconds of warning a notice gives")
    a = p.parse_args(argv)
    secret = os.environ.get(SECRET_ENV)
    server = NoticeServer(a.provider, vm_name=a.vm_name, port=a.port, control_secret=secret)
    if not secret:  # a standalone demo: say it, once, to whoever started it
        print(f"control secret ({SECRET_HEADER} header): {server.control_secret}", file=sys.stderr,
              flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop cleanly on SIGTERM too
    print(server.start(), flush=True)
    try:
        if a.preempt_after is not None:
            time.sleep(a.preempt_after)
            server.preempt(a.notice_s)
            print(f"preemption announced, {a.notice_s:.0f} s notice", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
