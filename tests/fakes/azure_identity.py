"""Entra ID checks in front of Azurite, for tests: who may use the Azure store.

Azurite speaks plain HTTP and takes a shared key, a SAS or any bearer token it is
given without asking whose it is; azure-core will not send a token over HTTP at all.
`AzureIdentityProxy` listens with HTTPS on 127.0.0.1 (a self-signed certificate made
at start; `ca_file` is what a client trusts) and forwards a request to Azurite only
when its `Authorization: Bearer` token is

- one a VM's IMDS issued (the ARM stand-in's `token_info`, tests/fakes/azure_boot.py:
  valid, not expired) for the audience https://storage.azure.com to an identity
  granted on the request's storage account (`grants`: account -> principal or client
  ids, what an unconditioned "Storage Blob Data Contributor" role assignment on the
  account says), or to one that a role assignment allows (`assignments`, below); or
- one of `allowed_tokens` (the operator's own token).

`assignments()` (e.g. the ARM stand-in's roleAssignments, so that a grant made through
ARM reaches the store) lists role assignments {"properties": {"principalId",
"roleDefinitionId", "scope", "condition", "conditionVersion"}}. One allows a request
when its principal is the caller's, its scope holds the request's account (and
container), its role has the request's action and its condition, if any, is true
(tests/fakes/azure_abac.py: each request's data action and attributes, the condition
evaluator). A condition the evaluator cannot read refuses the request and is kept in
`condition_errors`.

A forwarded request loses its bearer header and carries instead an account SAS made
with Azurite's published development key (appended to its query), which Azurite
checks. Everything else is answered as Azure Storage answers it, in its XML error
format: 401 `NoAuthenticationInformation` without a token, 401
`InvalidAuthenticationInfo` for a token nobody issued, an expired one or one for
another audience, 403 `AuthorizationPermissionMismatch` for an identity not granted
on the account (azure-storage-blob raises `ClientAuthenticationError` /
`HttpResponseError` with status 401 / 403, which geotrain counts as access denied;
the boot script's fetch quotes the code and message). Each request is recorded in
`requests` as {"method", "path", "account", "principal", "client_id", "vm", "status",
"denied"} (principal "operator" for an allowed token); `denied()` lists the refusals.

    proxy = AzureIdentityProxy(azurite.endpoint, fake_arm.token_info,
                               grants={"devstoreaccount1": {principal_id}},
                               allowed_tokens={fake_arm.token})
    node_env["AZURE_STORAGE_SERVICE_ENDPOINT"] = proxy.blob_endpoint
    node_env["SSL_CERT_FILE"] = node_env["REQUESTS_CA_BUNDLE"] = str(proxy.ca_file)
"""

from __future__ import annotations

import datetime
import http.client
import ssl
import tempfile
import threading
import uuid
from collections.abc import Callable
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

from tests.emulators import AZURITE_ACCOUNT, AZURITE_KEY
from tests.fakes.azure_abac import ConditionError, allows, blob_request, custom_roles, scope_covers
from tests.fakes.arm_routes import self_signed
from tests.fakes.bodies import read_body
from tests.fakes.gce_boot import stop_servers

AUDIENCE = "https://storage.azure.com"
HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te",
                         "upgrade", "expect", "proxy-authorization", "proxy-authenticate", "trailer",
                         "content-length", "authorization"})
AUTH_FAILED = "Server failed to authenticate the request. Please refer to the information in the " \
              "www-authenticate header."


def storage_error(code: str, message: str, detail: str | None = None) -> bytes:
    """Azure Storage's XML error document."""
    now = formatdate(usegmt=True)
    text = f"{message}\nRequestId:{uuid.uuid4()}\nTime:{now}"
    extra = f"<AuthenticationErrorDetail>{escape(detail)}</AuthenticationErrorDetail>" if detail else ""
    return (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code>'
            f"<Message>{escape(text)}</Message>{extra}</Error>").encode()


def account_sas(account: str = AZURITE_ACCOUNT, key: str = AZURITE_KEY) -> str:
    """An account SAS for every blob operation, a day long: how the proxy speaks to Azurite."""
    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

    return generate_account_sas(
        account, key, ResourceTypes(service=True, container=True, object=True),
        AccountSasPermissions(read=True, write=True, delete=True, list=True, add=True, create=True,
                              update=True, process=True, tag=True, filter_by_tags=True,
                              delete_previous_version=True, permanent_delete=True),
        expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1))


class AzureIdentityProxy:
    """Forwards Azure Blob requests to `upstream_url` (Azurite) only for a caller allowed
    on the account (see the module docstring). `token_info(token)` -> {"principal_id",
    "client_id", "resource", "vm", ...} or None is the issuer's verdict on a token."""

    def __init__(self, upstream_url: str, token_info: Callable[[str], dict | None],
                 grants: dict[str, set[str]] | None = None, allowed_tokens: set[str] | None = None,
                 assignments: Callable[[], list[dict]] | None = None,
                 role_definitions: Callable[[], list[dict]] | None = None):
        up = urlsplit(upstream_url)
        self.upstream = (up.hostname, up.port or 80)
        self.token_info = token_info
        self.grants: dict[str, set[str]] = {a: set(ids) for a, ids in (grants or {}).items()}
        self.allowed_tokens: set[str] = set(allowed_tokens or ())
        self.assignments = assignments
        self.role_definitions = role_definitions  # custom roles, as ARM renders them
        self.condition_errors: list[str] = []
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self._sas = account_sas()
        self._tmp = tempfile.TemporaryDirectory(prefix="azure-identity-")
        self.ca_file, key_file = self_signed(Path(self._tmp.name))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.ca_file, key_file)
        self._server: ThreadingHTTPServer | None = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        # The handshake happens in each request's own thread (Handler.setup), not in accept().
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True,
                                              do_handshake_on_connect=False)
        threading.Thread(target=self._server.serve_forever, daemon=True, name="azure-identity").start()
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self.blob_endpoint = f"{self.url}/{AZURITE_ACCOUNT}"  # path-style, as for Azurite

    def grant(self, account: str, identity: str) -> None:
        with self.lock:
            self.grants.setdefault(account, set()).add(identity)

    def revoke(self, account: str, identity: str) -> None:
        with self.lock:
            self.grants.get(account, set()).discard(identity)

    def denied(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["denied"]]

    def close(self) -> None:
        stop_servers(self._server)
        self._server = None
        self._tmp.cleanup()

    def _assigned(self, caller: dict, method: str, path: str, query: str) -> bool:
        """Whether one of `assignments()` allows this request of the caller."""
        if self.assignments is None:
            return False
        account, container, request = blob_request(method, path, query)
        ids = {caller["principal"], caller["client_id"]} - {None}
        roles = custom_roles(self.role_definitions()) if self.role_definitions else {}
        for a in self.assignments():
            props = a.get("properties") or {}
            if props.get("principalId") not in ids or not scope_covers(props.get("scope", ""),
                                                                        account, container):
                continue
            try:
                if allows(props, request, roles):
                    return True
            except ConditionError as e:
                with self.lock:
                    self.condition_errors.append(f"{e}: {props.get('condition')}")
        return False

    def check(self, account: str, authorization: str | None, method: str = "GET",
              path: str = "", query: str = "") -> tuple[dict, tuple[int, str, bytes] | None]:
        """(caller, refusal) for a request `method path?query` on `account`: caller is
        {"principal", "client_id", "vm"} ("operator" for an allowed token, None when
        unknown); refusal is (status, error code, XML document), or None to forward."""
        nobody = {"principal": None, "client_id": None, "vm": None}
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip() if scheme == "Bearer" else ""
        if not token:
            return nobody, (401, "NoAuthenticationInformation", storage_error(
                "NoAuthenticationInformation", "Server failed to authenticate the request. Please "
                "refer to the information in the www-authenticate header."))
        with self.lock:
            if token in self.allowed_tokens:
                return {"principal": "operator", "client_id": None, "vm": None}, None
        info = self.token_info(token)
        if info is None:  # never issued, or expired
            return nobody, (401, "InvalidAuthenticationInfo", storage_error(
                "InvalidAuthenticationInfo", AUTH_FAILED,
                "Signature validation failed, or the token is expired."))
        caller = {"principal": info["principal_id"], "client_id": info.get("client_id"),
                  "vm": info.get("vm")}
        if (info.get("resource") or "").rstrip("/") != AUDIENCE:
            return caller, (401, "InvalidAuthenticationInfo", storage_error(
                "InvalidAuthenticationInfo", AUTH_FAILED,
                f"Audience validation failed. Audience did not match: {info.get('resource')}"))
        with self.lock:
            granted = self.grants.get(account, set())
            ok = caller["principal"] in granted or caller["client_id"] in granted
        if not ok and not self._assigned(caller, method, path or f"/{account}", query):
            return caller, (403, "AuthorizationPermissionMismatch", storage_error(
                "AuthorizationPermissionMismatch",
                "This request is not authorized to perform this operation using this permission."))
        return caller, None

    def _record(self, method: str, path: str, account: str, caller: dict, status: int,
                denied: bool) -> None:
        with self.lock:
            self.requests.append({"method": method, "path": path, "account": account, **caller,
                                  "status": status, "denied": denied})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "Windows-Azure-Blob/1.0 Microsoft-HTTPAPI/2.0"

            def setup(self):
                self.request.settimeout(120)
                try:
                    self.request.do_handshake()
                    self.broken = False
                except OSError:  # a client that gave up, or did not trust our certificate
                    self.broken = True
                super().setup()

            def handle(self):
                if not self.broken:
                    super().handle()

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
                url = urlsplit(self.path)
                account = url.path.lstrip("/").split("/", 1)[0]
                body = self._body()
                caller, refusal = proxy.check(account, self.headers.get("Authorization"),
                                              self.command, url.path, url.query)
                if refusal is not None:
                    status, code, doc = refusal
                    proxy._record(self.command, url.path, account, caller, status, True)
                    return self._answer(status, [("Content-Type", "application/xml"),
                                                 ("x-ms-error-code", code),
                                                 ("x-ms-request-id", str(uuid.uuid4()))], doc)
                target = f"{url.path}?{url.query + '&' if url.query else ''}{proxy._sas}"
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    conn.putrequest(self.command, target, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() not in HOP_HEADERS:
                            conn.putheader(k, v)
                    conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()
                    proxy._record(self.command, url.path, account, caller, resp.status, False)
                    self._answer(resp.status, resp.getheaders(), data)
                except OSError:  # the client or Azurite went away
                    self.close_connection = True
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _relay

        return Handler
