"""Google identity checks in front of the GCS emulator, for tests: who may use the store.

gcp-storage-emulator accepts any request, token or not. `GcsIdentityProxy` stands in
front of it and forwards a request (unchanged: method, path, headers, body) only when
its `Authorization: Bearer` token is

- one an instance's metadata server issued (FakeGCE.token_info, tests/fakes/gce_server.py:
  valid, not expired) to a service account with a storage OAuth scope that is granted on
  the request's bucket, either wholly (`grants`, bucket -> member emails, what a bucket
  IAM binding of roles/storage.objectAdmin says) or through the bucket's IAM policy
  document (`apply_policy(bucket, document)`, e.g. infra/gcp/run-bucket-policy.json):
  role bindings with optional conditions `resource.name.startsWith("...")`
  (tests/fakes/gcs_iam.py), checked per request and object name, creating an object
  that exists needing storage.objects.delete too (as GCS does for an overwrite); or
- one of `allowed_tokens` (the operator's own test credentials).

Everything else is answered as GCS answers it, in its JSON error format: 401 for no
token or a token nobody issued or that expired ("Invalid Credentials"; gcsfs retries that
a few times as a possibly expired token, then raises), 403 when the account is not
granted or the token lacks a storage scope (gcsfs raises `OSError("Forbidden: ...")` at
once, with the message, which names the account and the permission). Each request is
recorded in `requests` as {"method", "path", "bucket", "email", "instance", "status",
"denied"} (email "operator" for an allowed token; instance the "<zone>/<name>" a node's
token was issued to); `denied()` lists the refusals.

The bucket's IAM policy itself is served here, not by the emulator:
`GET /storage/v1/b/B/iam` (`optionsRequestedPolicyVersion`; below 3 refused (400) when a
binding has a condition, as GCS does) and `PUT` (version 3 needed for conditions; the
body's etag must be the current one, else 412 conditionNotMet), for the operator's token
only (a node's: 403). A PUT is what `apply_policy` does: its bindings are enforced from
then on; a binding the stand-in cannot judge is refused (400) rather than ignored.
`interleave_writes(n)`: after each of the next n policy reads another writer changes the
policy (a new etag), so the reader's write loses the race with 412.

Bodies are small in these tests (a wheel, tiny checkpoints), so each is read whole and
relayed with a Content-Length, either way.

    proxy = GcsIdentityProxy(emulator.endpoint, fake_gce.token_info,
                             grants={bucket: {node_account}}, allowed_tokens={fake_gce.token})
    node_env["STORAGE_EMULATOR_HOST"] = proxy.url
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

from tests.fakes.bodies import read_body
from tests.fakes.gce_boot import serve, stop_servers
from tests.fakes.gcs_iam import Binding, ConditionError, bindings_from, request_checks

HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te",
                         "upgrade", "expect", "proxy-authorization", "proxy-authenticate", "trailer",
                         "content-length"})
READ_SCOPES = frozenset({"https://www.googleapis.com/auth/devstorage.read_only"})
WRITE_SCOPES = frozenset({"https://www.googleapis.com/auth/devstorage.read_write",
                          "https://www.googleapis.com/auth/devstorage.full_control",
                          "https://www.googleapis.com/auth/cloud-platform"})
log = logging.getLogger("tests.fakes.gcs_identity")
BUCKET_IN_PATH = re.compile(r"/b/([-.\w]+)(?=/|$)")
POLICY_PATH = re.compile(r"/storage/v1/b/([-.\w]+)/iam")


def gcs_error(status: int, message: str, reason: str, **extra: str) -> bytes:
    """GCS's JSON API error document."""
    return json.dumps({"error": {"code": status, "message": message,
                                 "errors": [{"message": message, "domain": "global", "reason": reason,
                                             **extra}]}}).encode()


def buckets_of(method: str, path: str, body: bytes) -> set[str]:
    """The buckets a request touches: the JSON API's `/b/<bucket>` (under /storage/v1,
    /upload/storage/v1, /download/storage/v1 or bare), every sub-request's in a batch,
    else the XML API's first path segment. Empty: a project-level call (list or create
    buckets) or the emulator's own health check."""
    if path.startswith("/batch/"):
        return set(BUCKET_IN_PATH.findall(body.decode("utf-8", "replace")))
    found = BUCKET_IN_PATH.findall(path)
    if found:
        return set(found)
    first = path.strip("/").split("/", 1)[0]
    return {first} if first and first not in ("b", "storage", "upload", "download") else set()


def permission(method: str, path: str) -> str:
    """The IAM permission GCS checks for a request (what its 403 message names)."""
    if path.startswith("/batch/"):
        return "storage.objects.delete"
    if re.search(r"/b/[-.\w]+/o/.", path):  # one object
        if re.search(r"/(copyTo|rewriteTo|compose)/", path) or path.endswith("/compose"):
            return "storage.objects.create"
        return {"GET": "storage.objects.get", "HEAD": "storage.objects.get",
                "DELETE": "storage.objects.delete"}.get(method, "storage.objects.update")
    if re.search(r"/b/[-.\w]+/o$", path):  # the bucket's objects
        return "storage.objects.list" if method == "GET" else "storage.objects.create"
    if BUCKET_IN_PATH.search(path):
        return "storage.buckets.get" if method == "GET" else "storage.buckets.update"
    return "storage.buckets.list" if method == "GET" else "storage.buckets.create"


class GcsIdentityProxy:
    """Forwards GCS requests to `upstream_url` only for a caller allowed on the bucket
    (see the module docstring). `token_info(token)` -> {"email", "scope", ...} or None
    is the issuer's verdict on a token (FakeGCE.token_info)."""

    def __init__(self, upstream_url: str, token_info: Callable[[str], dict | None],
                 grants: dict[str, set[str]] | None = None, allowed_tokens: set[str] | None = None):
        up = urlsplit(upstream_url)
        self.upstream = (up.hostname, up.port or 80)
        self.token_info = token_info
        self.grants: dict[str, set[str]] = {b: set(m) for b, m in (grants or {}).items()}
        self.allowed_tokens: set[str] = set(allowed_tokens or ())
        self.bindings: dict[str, list[Binding]] = {}  # bucket -> its policy document's bindings
        self.policies: dict[str, dict] = {}  # bucket -> {"version", "etag", "bindings"} served
        self.custom_roles: dict[str, set[str]] = {}  # custom role -> permissions, for PUTs
        self._etags = 0
        self._interleave = 0
        self.sessions: dict[str, str] = {}  # resumable upload id -> the email that opened it
        self.errors: list[str] = []  # requests a binding could not judge (denied, logged)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = serve(self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def grant(self, bucket: str, email: str) -> None:
        with self.lock:
            self.grants.setdefault(bucket, set()).add(email)

    def apply_policy(self, bucket: str, document: dict,
                     custom_roles: dict[str, set[str]] | None = None) -> None:
        """Set the bucket's IAM policy from a document with placeholders filled (raises
        ConditionError on a role, member or condition the stand-in does not know)."""
        with self.lock:
            self.custom_roles.update(custom_roles or {})
            self._set_policy(bucket, document)

    def _set_policy(self, bucket: str, document: dict) -> dict:
        """(under the lock) Enforce and serve the document's bindings; the stored policy."""
        parsed = bindings_from(document, self.custom_roles)
        self._etags += 1
        stored = {"version": document.get("version", 3), "etag": f"CA{self._etags}=",
                  "bindings": [dict(b) for b in document.get("bindings") or []]}
        self.bindings[bucket], self.policies[bucket] = parsed, stored
        return stored

    def interleave_writes(self, n: int = 1) -> None:
        with self.lock:
            self._interleave = n

    def policy_request(self, method: str, bucket: str, token: str, query: str,
                       body: bytes) -> tuple[int, bytes]:
        """(status, JSON) for GET / PUT of the bucket's IAM policy (the module docstring)."""
        perm = "storage.buckets.getIamPolicy" if method == "GET" else "storage.buckets.setIamPolicy"
        with self.lock:
            if token not in self.allowed_tokens:
                who = (self.token_info(token) or {}).get("email", "the caller")
                return 403, gcs_error(403, f"{who} does not have {perm} access to the Google "
                                      f"Cloud Storage bucket {bucket!r}.", "forbidden")
            current = self.policies.get(bucket, {"version": 1, "etag": "CAE=", "bindings": []})
            if method == "GET":
                version = int(parse_qs(query).get("optionsRequestedPolicyVersion", ["1"])[0])
                if version < 3 and any("condition" in b for b in current["bindings"]):
                    return 400, gcs_error(400, "The requested policy version is lower than 3 and "
                                          "the policy has conditional bindings.", "invalid")
                answer = dict(current, kind="storage#policy", resourceId=f"projects/_/buckets/{bucket}")
                if self._interleave > 0:  # another writer changes it right after this read
                    self._interleave -= 1
                    self._set_policy(bucket, current)
                return 200, json.dumps(answer).encode()
            doc = json.loads(body or b"{}")
            if doc.get("etag") not in (None, current["etag"]):
                return 412, gcs_error(412, "Precondition Failed", "conditionNotMet",
                                      locationType="header", location="If-Match")
            if doc.get("version", 1) < 3 and any("condition" in b for b in doc.get("bindings") or []):
                return 400, gcs_error(400, "Conditional bindings need policy version 3.", "invalid")
            try:
                stored = self._set_policy(bucket, {k: v for k, v in doc.items()
                                                   if k in ("version", "bindings")})
            except ConditionError as e:
                return 400, gcs_error(400, f"policy the stand-in cannot judge: {e}", "invalid")
            return 200, json.dumps(dict(stored, kind="storage#policy",
                                        resourceId=f"projects/_/buckets/{bucket}")).encode()

    def _exists(self, bucket: str, name: str) -> bool:
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            conn.request("GET", f"/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}")
            resp = conn.getresponse()
            resp.read()
            return resp.status == 200
        finally:
            conn.close()

    def _judge(self, email: str, method: str, path: str, query: str, body: bytes,
               bindings: list[Binding]) -> str | None:
        """None when the bucket's bindings allow the request, else the permission refused."""
        q = parse_qs(query)
        if "upload_id" in q:  # a resumable session: authorized when it was opened
            with self.lock:
                owner = self.sessions.get(q["upload_id"][0])
            return None if owner == email else "storage.objects.create"
        if path.startswith("/batch/"):
            lines = re.findall(r"^(GET|DELETE|PATCH|POST|PUT) (/\S+?)(?:\?(\S*))? HTTP",
                               body.decode("utf-8", "replace"), re.M)
            checks = [c for m, p, qs in lines for c in (request_checks(m, p, qs, b"") or [None])]
        else:
            checks = request_checks(method, path, query, body) or [None]
        if None in checks or not checks:
            message = f"cannot judge {method} {path} for {email} against the bucket's bindings"
            with self.lock:
                self.errors.append(message)
            log.error("GCS policy check: %s", message)
            return permission(method, path)
        for perm, resource in list(checks):
            if perm == "storage.objects.create" and q.get("ifGenerationMatch") != ["0"]:
                bucket, _, name = resource[len("projects/_/buckets/"):].partition("/objects/")
                if self._exists(bucket, name):  # an overwrite: GCS checks delete too
                    checks.append(("storage.objects.delete", resource))
        for perm, resource in checks:
            if not any(email in b.emails and perm in b.permissions and (b.holds is None or
                                                                        b.holds(resource))
                       for b in bindings):
                return perm
        return None

    def revoke(self, bucket: str, email: str) -> None:
        with self.lock:
            self.grants.get(bucket, set()).discard(email)

    def denied(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["denied"]]

    def close(self) -> None:
        stop_servers(self._server)
        self._server = None

    def check(self, method: str, path: str, authorization: str | None,
              body: bytes, query: str = "") -> tuple[dict, tuple[int, bytes] | None]:
        """(caller, refusal): caller is {"email", "instance"} (email "operator" for an
        allowed token, None when unknown); refusal is (status, GCS error document), or
        None to forward."""
        nobody = {"email": None, "instance": None}
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip() if scheme == "Bearer" else ""
        perm = permission(method, path)
        if not token:
            message = (f"Anonymous caller does not have {perm} access to the Google Cloud Storage "
                       f"object. Permission '{perm}' denied on resource (or it may not exist).")
            return nobody, (401, gcs_error(401, message, "required", locationType="header",
                                           location="Authorization"))
        with self.lock:
            if token in self.allowed_tokens:
                return {"email": "operator", "instance": None}, None
        info = self.token_info(token)
        if info is None:  # never issued, or expired
            return nobody, (401, gcs_error(401, "Invalid Credentials", "authError",
                                           locationType="header", location="Authorization"))
        email, scopes = info["email"], set(info.get("scope", "").split())
        caller = {"email": email, "instance": info.get("instance")}
        reading = perm in ("storage.objects.get", "storage.objects.list", "storage.buckets.get")
        if not scopes & (WRITE_SCOPES | (READ_SCOPES if reading else frozenset())):
            return caller, (403, gcs_error(403, "Provided scope(s) are not authorized",
                                          "insufficientPermissions"))
        buckets = buckets_of(method, path, body)
        with self.lock:
            refused = sorted(b for b in buckets if email not in self.grants.get(b, ()))
            bound = [b for bk in refused for b in self.bindings.get(bk, ())]
        if refused and bound and len(refused) == 1:  # judged against the policy document
            denied = self._judge(email, method, path, query, body, bound)
            if denied is None:
                return caller, None
            return caller, (403, gcs_error(
                403, f"{email} does not have {denied} access to the Google Cloud Storage object. "
                f"Permission '{denied}' denied on resource (or it may not exist).", "forbidden"))
        if not buckets or refused:
            where = (f"the Google Cloud Storage bucket {refused[0]!r}" if refused
                     else "the Google Cloud project")
            return caller, (403, gcs_error(
                403, f"{email} does not have {perm} access to {where}. Permission '{perm}' "
                "denied on resource (or it may not exist).", "forbidden"))
        return caller, None

    def _record(self, method: str, path: str, body: bytes, caller: dict, status: int,
                denied: bool) -> None:
        bucket = ",".join(sorted(buckets_of(method, path, body))) or None
        with self.lock:
            self.requests.append({"method": method, "path": path, "bucket": bucket, **caller,
                                  "status": status, "denied": denied})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                return read_body(self)

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in HOP_HEADERS or (self.command == "HEAD" and
                                                        k.lower() == "content-length"):
                        self.send_header(k, v)
                if self.command != "HEAD" and status not in (204, 304):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _relay(self):
                path, query = urlsplit(self.path).path, urlsplit(self.path).query
                body = self._body()
                policy = POLICY_PATH.fullmatch(path)
                if policy and self.command in ("GET", "PUT"):
                    scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
                    status, doc = proxy.policy_request(self.command, policy[1], token.strip(),
                                                       query, body)
                    with proxy.lock:
                        email = "operator" if token.strip() in proxy.allowed_tokens else None
                    proxy._record(self.command, path, body, {"email": email, "instance": None},
                                  status, status >= 400)
                    return self._answer(status, [("Content-Type", "application/json; charset=UTF-8")],
                                        doc)
                caller, refusal = proxy.check(self.command, path, self.headers.get("Authorization"),
                                              body, query)
                if refusal is not None:
                    status, doc = refusal
                    proxy._record(self.command, path, body, caller, status, True)
                    return self._answer(status, [("Content-Type", "application/json; charset=UTF-8")],
                                        doc)
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():  # Host too: the emulator builds URLs from it
                        if k.lower() not in HOP_HEADERS:
                            conn.putheader(k, v)
                    conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()
                    session = parse_qs(urlsplit(resp.getheader("Location") or "").query).get("upload_id")
                    if session and caller["email"]:
                        with proxy.lock:
                            proxy.sessions[session[0]] = caller["email"]
                    proxy._record(self.command, path, body, caller, resp.status, False)
                    self._answer(resp.status, resp.getheaders(), data)
                except OSError:  # the client or the emulator went away
                    self.close_connection = True
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _relay

        return Handler
