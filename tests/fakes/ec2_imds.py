"""The instance metadata service (IMDSv2) of ONE stand-in EC2 instance, for tests.

`Imds` serves on 127.0.0.1:<free port> what a real instance's IMDS serves: session
tokens (PUT /latest/api/token), identity and placement, the instance profile's role
credentials (only when the instance was launched with a profile), spot interruption
notices and rebalance recommendations. tests/fakes/ec2_boot.py starts one per booted
instance; a test can also start one alone.

    imds = Imds("i-0123", "us-east-1", role="geotrain-node")
    imds.issue_credentials(); imds.notice("terminate")   # what the node will read
    imds.close()
"""

from __future__ import annotations

import base64
import json
import secrets
import string
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ACCOUNT_ID = "123456789012"
TOKEN_TTL_MAX_S = 21600
CREDENTIALS_TTL_S = 6 * 3600


def iso_time(t: float) -> str:
    """`t` (epoch seconds) as AWS writes times: 2026-01-02T03:04:05Z."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def serve_in_thread(server: ThreadingHTTPServer, name: str) -> threading.Thread:
    """Run `server` in a daemon thread (its request threads daemons too)."""
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    return thread


class Imds:
    """IMDSv2 of one instance, started on 127.0.0.1:<free port> by the constructor.

    `role` is the role of the instance profile the instance was launched with (None:
    no profile, so `iam/*` answers 404 as on a real instance without one). The role's
    credentials are issued by `issue_credentials()` (fresh keys each call)."""

    def __init__(self, instance_id: str, region: str, zone: str | None = None,
                 role: str | None = None, profile_arn: str | None = None,
                 private_ip: str = "127.0.0.1", account_id: str = ACCOUNT_ID):
        self.instance_id, self.region = instance_id, region
        self.zone = zone or f"{region}a"
        self.role, self.profile_arn, self.private_ip = role, profile_arn, private_ip
        self.account_id = account_id
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.credentials: dict | None = None
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self._action: dict | None = None
        self._rebalance: dict | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = serve_in_thread(self._server, f"imds-{instance_id}")
        self._closed = False

    # -- what the test (or the booter) does ----------------------------------------------

    def issue_credentials(self) -> dict:
        """New role credentials (what STS would give the instance profile's role)."""
        if self.role is None:
            raise ValueError(f"{self.instance_id} has no instance profile")
        now = time.time()
        creds = {
            "Code": "Success", "LastUpdated": iso_time(now), "Type": "AWS-HMAC",
            "AccessKeyId": "ASIA" + "".join(secrets.choice(string.ascii_uppercase + string.digits)
                                            for _ in range(16)),
            "SecretAccessKey": secrets.token_urlsafe(30)[:40],
            "Token": base64.b64encode(secrets.token_bytes(96)).decode(),
            "Expiration": iso_time(now + CREDENTIALS_TTL_S)}
        with self._lock:
            self.credentials = creds
        return creds

    def notice(self, action: str = "terminate", in_s: float = 120.0) -> None:
        """A spot interruption notice: `spot/instance-action` answers from now on."""
        with self._lock:
            self._action = {"action": action, "time": iso_time(time.time() + in_s)}

    def rebalance(self) -> None:
        with self._lock:
            self._rebalance = {"noticeTime": iso_time(time.time())}

    def clear(self) -> None:
        with self._lock:
            self._action = self._rebalance = None

    def expire_tokens(self) -> None:
        """Every session token issued so far now answers 401."""
        with self._lock:
            self._tokens.clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- the service -----------------------------------------------------------------------

    def _identity(self) -> dict:
        return {"accountId": self.account_id, "architecture": "x86_64",
                "availabilityZone": self.zone, "imageId": "ami-00000000", "instanceId": self.instance_id,
                "instanceType": "g5.xlarge", "pendingTime": iso_time(time.time()),
                "privateIp": self.private_ip, "region": self.region, "version": "2017-09-30"}

    def handle(self, method: str, path: str, headers) -> tuple[int, dict[str, str], bytes]:
        text = {"Content-Type": "text/plain"}
        not_found = (404, {"Content-Type": "text/html"},
                     b"<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n<html><body><h1>404 - Not Found</h1>"
                     b"</body></html>")
        if headers.get("X-Forwarded-For"):
            return 403, text, b"Forbidden"
        if path == "/latest/api/token":
            if method != "PUT":
                return 405, text, b"Method Not Allowed"
            ttl = headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= TOKEN_TTL_MAX_S:
                return 400, text, b"Bad Request"
            token = secrets.token_urlsafe(42)
            with self._lock:
                self._tokens[token] = time.monotonic() + int(ttl)
            return 200, dict(text, **{"X-aws-ec2-metadata-token-ttl-seconds": ttl}), token.encode()
        if method not in ("GET", "HEAD"):
            return 405, text, b"Method Not Allowed"
        token = headers.get("X-aws-ec2-metadata-token", "")
        with self._lock:
            if self._tokens.get(token, 0.0) <= time.monotonic():
                return 401, text, b"Unauthorized"
            action, rebalance, creds = self._action, self._rebalance, self.credentials
        md = "/latest/meta-data/"
        plain = {md + "instance-id": self.instance_id, md + "local-ipv4": self.private_ip,
                 md + "placement/region": self.region, md + "placement/availability-zone": self.zone,
                 md + "ami-id": "ami-00000000", md + "instance-type": "g5.xlarge"}
        if path in plain:
            return 200, text, plain[path].encode()
        if path in (md, md.rstrip("/")):
            items = ["ami-id", "events/", "instance-id", "instance-type", "local-ipv4", "placement/",
                     "spot/"] + (["iam/"] if self.role else [])
            return 200, text, "\n".join(items).encode()
        if path == "/latest/dynamic/instance-identity/document":
            return 200, text, json.dumps(self._identity(), indent=2).encode()
        if path == md + "spot/instance-action":
            return (200, text, json.dumps(action).encode()) if action else not_found
        if path == md + "events/recommendations/rebalance":
            return (200, text, json.dumps(rebalance).encode()) if rebalance else not_found
        if self.role is None or not path.startswith(md + "iam/"):
            return not_found
        if path == md + "iam/info":
            doc = {"Code": "Success", "LastUpdated": iso_time(time.time()),
                   "InstanceProfileArn": self.profile_arn or
                   f"arn:aws:iam::{self.account_id}:instance-profile/{self.role}",
                   "InstanceProfileId": "AIPA" + self.instance_id[2:].upper()}
            return 200, text, json.dumps(doc, indent=2).encode()
        if path in (md + "iam/security-credentials/", md + "iam/security-credentials"):
            return 200, text, self.role.encode()
        if path == md + f"iam/security-credentials/{self.role}" and creds is not None:
            return 200, text, json.dumps(creds, indent=2).encode()
        return not_found

    def _handler(self):
        imds = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: watchers poll often
                pass

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                path = urlsplit(self.path).path
                status, headers, body = imds.handle(self.command, path, self.headers)
                with imds._lock:
                    imds.requests.append((self.command, path, status))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _serve

        return Handler
