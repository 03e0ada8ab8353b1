"""An AWS stand-in cloud that boots what it creates.

moto server plays EC2, IAM and S3 but never boots an instance and never checks a
credential. This module adds what a real AWS account does around an instance:

- `Imds`: the instance metadata service (IMDSv2) of ONE instance, on
  127.0.0.1:<free port>: session tokens, identity, placement, the instance
  profile's role credentials (only when the instance was launched with a
  profile), spot interruption notices and rebalance recommendations.
- `S3IdentityProxy`: an HTTP proxy in front of moto's S3 that forwards a request,
  unchanged and streamed, only when its SigV4 access key id is in `allowed_keys`;
  otherwise S3's own `AccessDenied` error document, so botocore raises a genuine
  ClientError. This is how "the store accepts a node's requests only with the
  credentials its identity gives it".
- `Ec2Booter`: a thread that polls moto's EC2 and boots every pending/running
  instance once, as a `tests.fakes.node.BootedNode` running its user data, with
  its own `Imds`; it stops the node and its Imds when the instance goes.

    proxy = S3IdentityProxy(moto_url)
    booter = Ec2Booter(moto_url, node_image(tmp / "image"), tmp / "nodes", {},
                       s3_proxy=proxy, store_roles={"geotrain-node"})
    ... ec2.run_instances(..., UserData=script, IamInstanceProfile={"Name": "geotrain-node"})
    booter.wait_booted(1, timeout=60)
    booter.notice(instance_id)          # spot instance-action at that instance's Imds
    booter.close(); proxy.close()
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import secrets
import string
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tests.fakes.node import BootedNode

log = logging.getLogger("tests.fakes.ec2_boot")

ACCOUNT_ID = "123456789012"
TOKEN_TTL_MAX_S = 21600
CREDENTIALS_TTL_S = 6 * 3600
HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te",
                         "upgrade", "expect", "proxy-authorization", "proxy-authenticate", "trailer"})
BLOCK = 64 * 1024
LIVE_STATES = ("pending", "running")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _serve(server: ThreadingHTTPServer, name: str) -> threading.Thread:
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    return thread


# --------------------------------------------------------------------------------------
# IMDSv2
# --------------------------------------------------------------------------------------

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
        self._thread = _serve(self._server, f"imds-{instance_id}")
        self._closed = False

    # -- what the test (or the booter) does ----------------------------------------------

    def issue_credentials(self) -> dict:
        """New role credentials (what STS would give the instance profile's role)."""
        if self.role is None:
            raise ValueError(f"{self.instance_id} has no instance profile")
        now = time.time()
        creds = {
            "Code": "Success", "LastUpdated": _iso(now), "Type": "AWS-HMAC",
            "AccessKeyId": "ASIA" + "".join(secrets.choice(string.ascii_uppercase + string.digits)
                                            for _ in range(16)),
            "SecretAccessKey": secrets.token_urlsafe(30)[:40],
            "Token": base64.b64encode(secrets.token_bytes(96)).decode(),
            "Expiration": _iso(now + CREDENTIALS_TTL_S)}
        with self._lock:
            self.credentials = creds
        return creds

    def notice(self, action: str = "terminate", in_s: float = 120.0) -> None:
        """A spot interruption notice: `spot/instance-action` answers from now on."""
        with self._lock:
            self._action = {"action": action, "time": _iso(time.time() + in_s)}

    def rebalance(self) -> None:
        with self._lock:
            self._rebalance = {"noticeTime": _iso(time.time())}

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
                "instanceType": "g5.xlarge", "pendingTime": _iso(time.time()),
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
            doc = {"Code": "Success", "LastUpdated": _iso(time.time()),
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


# --------------------------------------------------------------------------------------
# S3 behind an identity check
# --------------------------------------------------------------------------------------

def sigv4_key_id(headers, query: str) -> str | None:
    """The access key id a request is signed with: SigV4 (`Authorization:
    AWS4-HMAC-SHA256 Credential=AKID/...` or a presigned URL's `X-Amz-Credential`),
    or, as S3 still accepts, SigV2 (`Authorization: AWS AKID:sig` or a presigned
    URL's `AWSAccessKeyId`, what boto3's generate_presigned_url makes by default)."""
    auth = headers.get("Authorization") or ""
    if auth.startswith("AWS4-HMAC-SHA256"):
        for part in auth[len("AWS4-HMAC-SHA256"):].split(","):
            name, _, value = part.strip().partition("=")
            if name == "Credential":
                return value.split("/", 1)[0] or None
        return None
    if auth.startswith("AWS "):
        return auth[4:].rpartition(":")[0].strip() or None
    params = parse_qs(query)
    if params.get("X-Amz-Credential"):
        return params["X-Amz-Credential"][0].split("/", 1)[0] or None
    if params.get("AWSAccessKeyId"):
        return params["AWSAccessKeyId"][0] or None
    return None


def s3_error_xml(code: str, message: str, resource: str = "") -> bytes:
    request_id = uuid.uuid4().hex[:16].upper()
    host_id = base64.b64encode(secrets.token_bytes(48)).decode()
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><Resource>{resource}</Resource>"
            f"<RequestId>{request_id}</RequestId><HostId>{host_id}</HostId></Error>").encode()


class S3IdentityProxy:
    """Forwards S3 requests to `upstream_url` only when signed by a key in `allowed_keys`
    (the signature itself is not verified: the key id is what an identity is).

    Everything else is answered 403 AccessDenied with S3's error document (the
    request body is read and dropped first, so the client reads the answer). Bodies
    are streamed both ways, block by block: Content-Length bodies (aws-chunked
    uploads included) unchanged, `Transfer-Encoding: chunked` ones re-chunked. `requests` records each
    request as {"method", "path", "key_id", "status"}."""

    def __init__(self, upstream_url: str, allowed_keys: set[str] | None = None):
        up = urlsplit(upstream_url)
        self.upstream = (up.hostname, up.port or 80)
        self.allowed_keys: set[str] = set(allowed_keys or ())
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = _serve(self._server, "s3-identity-proxy")
        self._closed = False

    def allow(self, key_id: str) -> None:
        with self.lock:
            self.allowed_keys.add(key_id)

    def revoke(self, key_id: str) -> None:
        with self.lock:
            self.allowed_keys.discard(key_id)

    def denied(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["status"] == 403 and r.get("denied")]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _record(self, method: str, path: str, key_id: str | None, status: int, denied: bool) -> None:
        with self.lock:
            self.requests.append({"method": method, "path": path, "key_id": key_id, "status": status,
                                  "denied": denied})

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            # -- request bodies ------------------------------------------------------------
            def _chunked(self) -> bool:
                return "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()

            def _body_blocks(self):
                """The request body, decoded from chunked if need be, in blocks."""
                if self._chunked():
                    while True:
                        size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return
                        left = size
                        while left:
                            block = self.rfile.read(min(left, BLOCK))
                            if not block:
                                raise ConnectionError("client closed mid-chunk")
                            left -= len(block)
                            yield block
                        self.rfile.readline()
                else:
                    left = int(self.headers.get("Content-Length") or 0)
                    while left:
                        block = self.rfile.read(min(left, BLOCK))
                        if not block:
                            raise ConnectionError("client closed mid-body")
                        left -= len(block)
                        yield block

            def _has_body(self) -> bool:
                return self._chunked() or int(self.headers.get("Content-Length") or 0) > 0

            # -- the relay -----------------------------------------------------------------
            def _relay(self):
                parts = urlsplit(self.path)
                key_id = sigv4_key_id(self.headers, parts.query)
                with proxy.lock:
                    allowed = key_id is not None and key_id in proxy.allowed_keys
                if not allowed:
                    for _ in self._body_blocks():  # drain, so the client reads our answer
                        pass
                    why = ("Anonymous access is not allowed" if key_id is None else
                           f"The access key {key_id} is not allowed to access this store")
                    body = s3_error_xml("AccessDenied", f"Access Denied: {why}", parts.path)
                    proxy._record(self.command, parts.path, key_id, 403, True)
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(body)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() not in HOP_HEADERS:
                            conn.putheader(k, v)
                    chunked = self._chunked()
                    if chunked:  # re-chunked block by block, as it arrives
                        conn.putheader("Transfer-Encoding", "chunked")
                    conn.endheaders()
                    for block in self._body_blocks():  # streamed as it arrives
                        conn.send(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                    if chunked:
                        conn.send(b"0\r\n\r\n")
                    resp = conn.getresponse()
                    proxy._record(self.command, parts.path, key_id, resp.status, False)
                    self.send_response(resp.status)
                    length = resp.getheader("Content-Length")
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP_HEADERS:
                            self.send_header(k, v)
                    no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
                    stream_chunked = not no_body and length is None
                    if stream_chunked:
                        self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    if no_body:
                        return
                    while True:
                        block = resp.read(BLOCK) if not stream_chunked else resp.read1(BLOCK)
                        if not block:
                            break
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if stream_chunked else block)
                    if stream_chunked:
                        self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError, ConnectionError, OSError) as e:
                    log.debug("S3 relay of %s %s failed: %s", self.command, parts.path, e)
                    self.close_connection = True
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _relay

        return Handler


# --------------------------------------------------------------------------------------
# The booter
# --------------------------------------------------------------------------------------

class StsWebIdentity:
    """AWS STS's AssumeRoleWithWebIdentity, for nodes on other clouds (GCE here).

    `verify(token)` returns the token's claims ({"sub", "aud", "email", ...}) when a
    trusted issuer (the GCE stand-in's metadata servers: FakeGCE.claims_of) issued it,
    else None. `trust` maps a role ARN to the service-account emails its trust policy
    admits (audience must be sts.amazonaws.com). On success the call answers STS's
    own document with fresh keys, which `s3_proxy` then accepts; otherwise STS's
    AccessDenied error, so botocore raises what it raises against AWS. Every call is
    recorded in `calls` as {"role", "email", "ok"}."""

    def __init__(self, verify, trust: dict[str, set[str]], s3_proxy: S3IdentityProxy | None = None):
        self.verify, self.trust, self.s3_proxy = verify, trust, s3_proxy
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = _serve(self._server, "sts-web-identity")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def assume(self, form: dict[str, str]) -> tuple[int, bytes]:
        role, token = form.get("RoleArn", ""), form.get("WebIdentityToken", "")
        session = form.get("RoleSessionName", "session")
        claims = self.verify(token) if token else None
        ok = bool(claims) and claims.get("aud") == "sts.amazonaws.com" \
            and claims.get("email") in self.trust.get(role, set())
        with self.lock:
            self.calls.append({"role": role, "email": (claims or {}).get("email"), "ok": ok})
        rid = uuid.uuid4()
        if not ok:
            why = "Not authorized to perform sts:AssumeRoleWithWebIdentity"
            return 403, (f'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
                         f"<Error><Type>Sender</Type><Code>AccessDenied</Code><Message>{why}"
                         f"</Message></Error><RequestId>{rid}</RequestId></ErrorResponse>").encode()
        key = "ASIA" + secrets.token_hex(8).upper()
        if self.s3_proxy is not None:
            self.s3_proxy.allow(key)
        name = role.rsplit("/", 1)[-1]
        return 200, (
            '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            "<AssumeRoleWithWebIdentityResult>"
            f"<SubjectFromWebIdentityToken>{claims['sub']}</SubjectFromWebIdentityToken>"
            "<Audience>sts.amazonaws.com</Audience>"
            f"<AssumedRoleUser><Arn>arn:aws:sts::{ACCOUNT_ID}:assumed-role/{name}/{session}</Arn>"
            f"<AssumedRoleId>AROA{secrets.token_hex(8).upper()}:{session}</AssumedRoleId>"
            "</AssumedRoleUser><Credentials>"
            f"<SessionToken>{secrets.token_urlsafe(48)}</SessionToken>"
            f"<SecretAccessKey>{secrets.token_urlsafe(30)}</SecretAccessKey>"
            f"<Expiration>{_iso(time.time() + 3600)}</Expiration>"
            f"<AccessKeyId>{key}</AccessKeyId></Credentials>"
            "<Provider>accounts.google.com</Provider></AssumeRoleWithWebIdentityResult>"
            f"<ResponseMetadata><RequestId>{rid}</RequestId></ResponseMetadata>"
            "</AssumeRoleWithWebIdentityResponse>").encode()

    def _handler(self):
        sts = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                form = {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}
                if form.get("Action") != "AssumeRoleWithWebIdentity":
                    status, payload = 400, b"<ErrorResponse><Error><Code>InvalidAction</Code>" \
                        b"</Error></ErrorResponse>"
                else:
                    status, payload = sts.assume(form)
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler


class Ec2Booter:
    """Boots every pending/running instance of moto's EC2 once, ends it when it goes.

    ec2_url     moto server (EC2 and IAM)
    image_bin   a node image's bin dir (tests.fakes.node.node_image)
    workdir     each node's root is workdir/<instance id>
    node_env    extra environment every node gets
    regions     the regions polled
    s3_proxy    an S3IdentityProxy: a node's role credentials are added to its
                allowed keys when the role is in `store_roles` (or `store_roles`,
                a callable, returns True for it)
    """

    def __init__(self, ec2_url: str, image_bin: Path, workdir: Path, node_env: dict[str, str] | None = None,
                 *, regions: tuple[str, ...] | list[str] = ("us-east-1",),
                 s3_proxy: S3IdentityProxy | None = None, store_roles=(),
                 interval_s: float = 0.3, stop_grace_s: float = 5.0, start: bool = True):
        import boto3  # the test environment's; a node never sees the test's credentials

        self.ec2_url, self.image_bin, self.workdir = ec2_url, Path(image_bin), Path(workdir)
        self.node_env = dict(node_env or {})
        self.regions = tuple(regions)
        self.s3_proxy, self.store_roles = s3_proxy, store_roles
        self.interval_s, self.stop_grace_s = interval_s, stop_grace_s
        self.errors: list[str] = []  # poll-loop errors, logged and retried
        from botocore.config import Config

        kw = dict(endpoint_url=ec2_url, aws_access_key_id="testing", aws_secret_access_key="testing",
                  config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 2}))
        self._ec2 = {r: boto3.client("ec2", region_name=r, **kw) for r in self.regions}
        self._iam = boto3.client("iam", region_name=self.regions[0], **kw)
        self._cond = threading.Condition()
        self._booted: set[str] = set()          # every instance id ever booted
        self._nodes: dict[str, BootedNode] = {}  # live ones
        self.history: list[BootedNode] = []      # every node ever booted, gone ones too
        self._imds: dict[str, Imds] = {}
        self._keys: dict[str, str] = {}          # instance id -> access key id allowed at the proxy
        self._stoppers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ec2-booter", daemon=True)
        if start:
            self._thread.start()

    # -- public --------------------------------------------------------------------------

    def nodes(self) -> dict[str, BootedNode]:
        with self._cond:
            return dict(self._nodes)

    def imds(self, instance_id: str) -> Imds:
        with self._cond:
            return self._imds[instance_id]

    def booted(self) -> set[str]:
        with self._cond:
            return set(self._booted)

    def notice(self, instance_id: str, action: str = "terminate", in_s: float = 120.0) -> None:
        """A spot interruption notice at that instance's Imds."""
        self.imds(instance_id).notice(action, in_s)

    def console_output(self, params: dict[str, str]) -> bytes:
        """EC2's GetConsoleOutput answer for a booted instance: the last 64 KiB of what its
        node printed, base64-encoded as EC2 sends it (for FaultProxy.answer)."""
        iid = params.get("InstanceId", "")
        with self._cond:
            node = self._nodes.get(iid)
        text = node.console.read_bytes()[-64 * 1024:] if node and node.console.exists() else b""
        output = base64.b64encode(text).decode()
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<GetConsoleOutputResponse '
                f'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>{uuid.uuid4()}'
                f"</requestId><instanceId>{iid}</instanceId><timestamp>{_iso(time.time())}"
                f"</timestamp><output>{output}</output></GetConsoleOutputResponse>").encode()

    def wait_booted(self, n: int, timeout: float = 60.0) -> dict[str, BootedNode]:
        """Wait until `n` instances have booted in all; the live nodes."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._booted) >= n, timeout):
                raise TimeoutError(f"{len(self._booted)} of {n} instances booted within {timeout} s "
                                   f"(poll errors: {self.errors[-3:]})")
            return dict(self._nodes)

    def wait_stopped(self, instance_id: str, timeout: float = 60.0) -> None:
        """Wait until the booter has ended that instance's node and Imds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if not self._cond.wait_for(lambda: instance_id not in self._nodes, timeout):
                raise TimeoutError(f"{instance_id} still has a node after {timeout} s")
            threads = list(self._stoppers)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Stop the thread, every node and every Imds."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        with self._cond:
            ids = list(self._nodes)
        for iid in ids:
            self._retire(iid, wait=False)
        with self._cond:
            threads = list(self._stoppers)
        for t in threads:
            t.join(timeout=self.stop_grace_s + 30)

    def __enter__(self) -> Ec2Booter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as e:  # noqa: BLE001 - log, retry; never end the thread
                log.warning("EC2 booter poll failed (retrying): %s: %s", type(e).__name__, e)
                self.errors.append(f"{type(e).__name__}: {e}")
            self._stop.wait(self.interval_s)

    def poll_once(self) -> None:
        seen: dict[str, tuple[str, dict]] = {}
        for region, ec2 in self._ec2.items():
            for page in ec2.get_paginator("describe_instances").paginate():
                for res in page["Reservations"]:
                    for inst in res["Instances"]:
                        seen[inst["InstanceId"]] = (region, inst)
        for iid, (region, inst) in seen.items():
            if self._stop.is_set():
                return
            state = inst["State"]["Name"]
            if state in LIVE_STATES:
                with self._cond:
                    new = iid not in self._booted
                if new:
                    try:
                        self._boot(region, inst)
                    except Exception as e:  # noqa: BLE001 - the next poll tries again
                        log.warning("could not boot %s (retrying): %s: %s", iid, type(e).__name__, e)
                        self.errors.append(f"boot {iid}: {type(e).__name__}: {e}")
            else:
                self._retire(iid)
        with self._cond:
            gone = [iid for iid in self._nodes if iid not in seen]
        for iid in gone:
            self._retire(iid)

    def _role_of(self, inst: dict) -> tuple[str | None, str | None]:
        profile = inst.get("IamInstanceProfile")
        if not profile or not profile.get("Arn"):
            return None, None
        name = profile["Arn"].rsplit("/", 1)[-1]
        roles = self._iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Roles"]
        return (roles[0]["RoleName"] if roles else None), profile["Arn"]

    def _may_use_store(self, role: str) -> bool:
        if callable(self.store_roles):
            return bool(self.store_roles(role))
        return role in self.store_roles

    def _boot(self, region: str, inst: dict) -> None:
        iid = inst["InstanceId"]
        attr = self._ec2[region].describe_instance_attribute(InstanceId=iid, Attribute="userData")
        raw = (attr.get("UserData") or {}).get("Value")
        script = base64.b64decode(raw).decode("utf-8", "replace") if raw else ""
        role, profile_arn = self._role_of(inst)
        zone = (inst.get("Placement") or {}).get("AvailabilityZone") or f"{region}a"
        imds = Imds(iid, region, zone, role=role, profile_arn=profile_arn)
        key = None
        try:
            if role is not None:
                key = imds.issue_credentials()["AccessKeyId"]
                if self.s3_proxy is not None and self._may_use_store(role):
                    self.s3_proxy.allow(key)
                else:
                    key = None
            env = {**self.node_env,
                   "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"{imds.url}/",
                   "GEOTRAIN_METADATA_ENDPOINT": imds.url,
                   "AWS_DEFAULT_REGION": region,
                   "NO_PROXY": "127.0.0.1,localhost"}
            if self.s3_proxy is not None:
                env["AWS_ENDPOINT_URL_S3"] = self.s3_proxy.url
            node = BootedNode(iid, script, self.workdir / iid, self.image_bin, env=env)
            with self._cond:
                if self._stop.is_set():
                    raise RuntimeError("booter closing")
                node.start()
                self._booted.add(iid)
                self._nodes[iid], self._imds[iid] = node, imds
                self.history.append(node)
                if key:
                    self._keys[iid] = key
                self._cond.notify_all()
            log.info("booted %s (%s, role %s) at %s", iid, region, role, node.root)
        except BaseException:
            imds.close()
            if key and self.s3_proxy is not None:
                self.s3_proxy.revoke(key)
            raise

    def _retire(self, iid: str, wait: bool = False) -> None:
        """End a node and its Imds (in a thread: a node gets `stop_grace_s` to shut down)."""
        box: dict = {}

        def stop() -> None:
            node, imds, key = box["node"], box["imds"], box["key"]
            try:
                if node is not None:
                    node.stop(grace_s=self.stop_grace_s)
            except Exception as e:  # noqa: BLE001
                log.warning("stopping %s failed: %s", iid, e)
            finally:
                if imds is not None:
                    imds.close()
                if key and self.s3_proxy is not None:
                    self.s3_proxy.revoke(key)

        t = threading.Thread(target=stop, name=f"stop-{iid}", daemon=True)
        with self._cond:
            box["node"] = self._nodes.pop(iid, None)
            box["imds"] = self._imds.pop(iid, None)
            box["key"] = self._keys.pop(iid, None)
            if box["node"] is None and box["imds"] is None:
                return
            self._stoppers = [s for s in self._stoppers if s.is_alive()] + [t]
            t.start()
            self._cond.notify_all()
        log.info("stopping %s", iid)
        if wait:
            t.join()
