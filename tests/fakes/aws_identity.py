"""AWS identity checks around the stand-in cloud's S3, for tests: who may use the store.

- `S3IdentityProxy`: an HTTP proxy in front of moto's S3 that forwards a request,
  unchanged and streamed, only when its SigV4 access key id is in `allowed_keys` and,
  for keys issued to a role (`allow(key, role=...)`: instance profiles, STS web
  identity), the role's IAM policies as moto's IAM holds them allow it
  (tests/fakes/s3_actions.py maps the request to its action, tests/fakes/iam_eval.py
  decides); otherwise S3's own `AccessDenied` error document, so botocore raises a
  genuine ClientError. This is how "the store accepts a node's requests only with the
  credentials its identity gives it, and only what the role's policy allows".
- `StsWebIdentity`: STS's AssumeRoleWithWebIdentity, trading an OIDC identity token
  for fresh keys that the proxy then accepts (a GCE node reaching an S3 store).

tests/fakes/ec2_boot.py allows each booted instance's role credentials at the proxy.
"""

from __future__ import annotations

import base64
import http.client
import logging
import secrets
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape as xml_escape

from tests.fakes.ec2_imds import ACCOUNT_ID, iso_time, serve_in_thread
from tests.fakes.iam_eval import PolicyError, evaluate
from tests.fakes.s3_actions import RolePolicies, UnknownRequest, needs_body, s3_checks

log = logging.getLogger("tests.fakes.ec2_boot")  # one logger for the AWS stand-in

HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te",
                         "upgrade", "expect", "proxy-authorization", "proxy-authenticate", "trailer"})
BLOCK = 64 * 1024


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
    message, resource = xml_escape(message), xml_escape(resource)
    request_id = uuid.uuid4().hex[:16].upper()
    host_id = base64.b64encode(secrets.token_bytes(48)).decode()
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><Resource>{resource}</Resource>"
            f"<RequestId>{request_id}</RequestId><HostId>{host_id}</HostId></Error>").encode()


def node_policy(store_url: str) -> str:
    """infra/aws/geotrain-node-policy.json with RUN_BUCKET / RUN_PREFIX filled from an
    s3:// store URL (s3://my-runs/exp1 -> my-runs, exp1), as infra/aws/README.md says."""
    from pathlib import Path

    parts = urlsplit(store_url)
    prefix = parts.path.strip("/")
    if parts.scheme != "s3" or not parts.netloc or not prefix:
        raise ValueError(f"expected s3://BUCKET/PREFIX, got {store_url!r}")
    text = (Path(__file__).resolve().parents[2] / "infra/aws/geotrain-node-policy.json").read_text()
    return text.replace("RUN_BUCKET", parts.netloc).replace("RUN_PREFIX", prefix)


def grant_store(iam, role: str, store_url: str) -> None:
    """Put the node policy for `store_url` on `role` (an IAM client's put-role-policy, as
    infra/aws/README.md does it)."""
    iam.put_role_policy(RoleName=role, PolicyName="geotrain-store", PolicyDocument=node_policy(store_url))


class S3IdentityProxy:
    """Forwards S3 requests to `upstream_url` only when signed by a key in `allowed_keys`
    (the signature itself is not verified: the key id is what an identity is) and,
    for a key allowed with a role, only what that role's IAM policies allow (read from
    moto's IAM at `iam_url`, by default the upstream itself, at every request).

    Everything else is answered 403 AccessDenied with S3's error document (the
    request body is read and dropped first, so the client reads the answer). Bodies
    are streamed both ways, block by block: Content-Length bodies (aws-chunked
    uploads included) unchanged, `Transfer-Encoding: chunked` ones re-chunked. `requests` records each
    request as {"method", "path", "key_id", "status", "denied", "role", "why"}; `errors`
    lists requests the proxy could not judge (unknown request, unknown policy grammar),
    each denied and logged as an error."""

    def __init__(self, upstream_url: str, allowed_keys: set[str] | None = None,
                 iam_url: str | None = None):
        up = urlsplit(upstream_url)
        self.upstream = (up.hostname, up.port or 80)
        self.allowed_keys: set[str] = set(allowed_keys or ())
        self.roles: dict[str, str] = {}  # key id -> the role it was issued to
        self.policies = RolePolicies(iam_url or upstream_url)
        self.errors: list[str] = []
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = serve_in_thread(self._server, "s3-identity-proxy")
        self._closed = False

    def allow(self, key_id: str, role: str | None = None) -> None:
        """Accept `key_id`; with `role`, only for what the role's policies allow."""
        with self.lock:
            self.allowed_keys.add(key_id)
            if role is not None:
                self.roles[key_id] = role

    def revoke(self, key_id: str) -> None:
        with self.lock:
            self.allowed_keys.discard(key_id)
            self.roles.pop(key_id, None)

    def judge(self, role: str, method: str, path: str, query: str, headers,
              body: bytes | None) -> str | None:
        """None when the role's policies allow the request, else why not."""
        try:
            checks = s3_checks(method, path, query, headers, body)
            documents = self.policies(role)
            for action, resource, context in checks:
                decision = evaluate(documents, action, resource, context)
                if not decision.allowed:
                    return (f"role {role} may not {action} on {resource}"
                            f"{' with ' + str(context) if context else ''}: {decision.reason}")
        except (UnknownRequest, PolicyError) as e:
            message = f"cannot judge {method} {path} for role {role}: {type(e).__name__}: {e}"
            log.error("S3 policy check: %s", message)
            with self.lock:
                self.errors.append(message)
            return message
        return None

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

    def _record(self, method: str, path: str, key_id: str | None, status: int, denied: bool,
                why: str | None = None) -> None:
        with self.lock:
            self.requests.append({"method": method, "path": path, "key_id": key_id, "status": status,
                                  "denied": denied, "role": self.roles.get(key_id or ""), "why": why})

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
                if getattr(self, "_read", None) is not None:  # read already, to judge it
                    yield from ([self._read] if self._read else [])
                    return
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
                self._read = None
                with proxy.lock:
                    allowed = key_id is not None and key_id in proxy.allowed_keys
                    role = proxy.roles.get(key_id or "")
                why = None
                if not allowed:
                    why = ("Anonymous access is not allowed" if key_id is None else
                           f"The access key {key_id} is not allowed to access this store")
                elif role is not None:
                    if needs_body(self.command, parts.query):
                        self._read = b"".join(self._body_blocks())
                    why = proxy.judge(role, self.command, parts.path, parts.query, self.headers,
                                      self._read)
                if why is not None:
                    for _ in self._body_blocks():  # drain, so the client reads our answer
                        pass
                    body = s3_error_xml("AccessDenied", f"Access Denied: {why}", parts.path)
                    proxy._record(self.command, parts.path, key_id, 403, True, why)
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
                    chunked = self._chunked() and self._read is None
                    if self._read is not None and self._chunked():  # de-chunked to judge it
                        conn.putheader("Content-Length", str(len(self._read)))
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


class StsWebIdentity:
    """AWS STS's AssumeRoleWithWebIdentity, for nodes on other clouds.

    `verify(token)` returns the token's claims ({"sub", "aud", "email", ...}) when a
    trusted issuer (the GCE stand-in's metadata servers: FakeGCE.claims_of; an Azure
    IMDS stand-in's tokens) issued it, else None. `trust` maps a role ARN to the
    identities its trust policy admits (claim `email`: a service account, or a managed
    identity's principal id), whose token must carry `audience`. On success the call answers STS's
    own document with fresh keys, which `s3_proxy` then accepts for what the role's
    policies in moto's IAM allow (so the role must exist there); otherwise STS's
    AccessDenied error, so botocore raises what it raises against AWS. Every call is
    recorded in `calls` as {"role", "email", "ok"}."""

    def __init__(self, verify, trust: dict[str, set[str]], s3_proxy: S3IdentityProxy | None = None,
                 audience: str = "sts.amazonaws.com", provider: str = "accounts.google.com"):
        self.verify, self.trust, self.s3_proxy = verify, trust, s3_proxy
        self.audience, self.provider = audience, provider
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = serve_in_thread(self._server, "sts-web-identity")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def assume(self, form: dict[str, str]) -> tuple[int, bytes]:
        role, token = form.get("RoleArn", ""), form.get("WebIdentityToken", "")
        session = form.get("RoleSessionName", "session")
        claims = self.verify(token) if token else None
        ok = bool(claims) and claims.get("aud") == self.audience \
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
        name = role.rsplit("/", 1)[-1]
        if self.s3_proxy is not None:
            self.s3_proxy.allow(key, role=name)
        return 200, (
            '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            "<AssumeRoleWithWebIdentityResult>"
            f"<SubjectFromWebIdentityToken>{claims['sub']}</SubjectFromWebIdentityToken>"
            f"<Audience>{self.audience}</Audience>"
            f"<AssumedRoleUser><Arn>arn:aws:sts::{ACCOUNT_ID}:assumed-role/{name}/{session}</Arn>"
            f"<AssumedRoleId>AROA{secrets.token_hex(8).upper()}:{session}</AssumedRoleId>"
            "</AssumedRoleUser><Credentials>"
            f"<SessionToken>{secrets.token_urlsafe(48)}</SessionToken>"
            f"<SecretAccessKey>{secrets.token_urlsafe(30)}</SecretAccessKey>"
            f"<Expiration>{iso_time(time.time() + 3600)}</Expiration>"
            f"<AccessKeyId>{key}</AccessKeyId></Credentials>"
            f"<Provider>{self.provider}</Provider></AssumeRoleWithWebIdentityResult>"
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
