"""A local Compute Engine v1 REST server and GCE metadata server, for tests.

No usable GCE emulator exists, so this speaks the documented JSON of the
Compute Engine v1 API (camelCase fields, as the API returns them) to the real
`google-cloud-compute` client over plain HTTP on 127.0.0.1:

    instances      insert / get / list / aggregatedList (label filter) / delete
    zones          list
    zoneOperations get / wait      firewalls insert / get / list / delete
    globalOperations get / wait
    IAM v1         serviceAccounts create / get / list / delete (tests/fakes/gce_iam.py)

Operations go PENDING -> RUNNING -> DONE, one step per poll. Every API
request must carry the bearer token that this same server's metadata half
hands out (`/computeMetadata/v1/instance/service-accounts/default/token`), so
a test that passes proves google-auth's Compute Engine credentials fetched a
token on the wire (`GCE_METADATA_HOST` / `GCE_METADATA_IP` point here).

Faults: `fail_zone(zone, code, via="http" | "operation", after=n)` makes the
inserts in a zone fail (after n successes there) either as the HTTP error of
the insert call (`{"error": {"code", "message", "errors": [{"reason",
"domain", "message"}]}}`) or as a DONE operation whose
`error.errors[].code` names the problem, like the real API.

Service accounts made through the IAM routes live in `service_accounts` (email ->
account JSON). With `accounts_must_exist`, an instance insert naming an account
(other than "default") that is not there is refused as GCE refuses it (400 "invalid",
"... Service account EMAIL does not exist."), and so is one made less than
`account_propagation_s` ago: IAM is eventually consistent, and callers must retry.

Every request is recorded (`requests`) with its parsed JSON body for
assertions. Start with `start()`, stop with `stop()`; nothing is left open.
This module holds the state and its rules (`FakeGCE`); the HTTP routes that
read and change it are in tests/fakes/gce_routes.py.

Booting (opt-in: `FakeGCE(boot=BootConfig(image_bin, workdir, node_env))` or
`enable_boot(config)`; tests/fakes/gce_boot.py): when an inserted instance turns
RUNNING, it gets its own metadata server (`metadata_server(name)`) and its
`startup-script` item runs as a `BootedNode` (`node(name)`) with the environment

    GCE_METADATA_HOST=127.0.0.1:<port>  GCE_METADATA_IP=127.0.0.1:<port>
    GEOTRAIN_METADATA_ENDPOINT=http://127.0.0.1:<port>  NO_PROXY=127.0.0.1,localhost
    + BootConfig.node_env

An instance with a service account (its `serviceAccounts[0]`, "default" meaning
`service_account`) gets access tokens of its own from its metadata server: each random,
issued to that instance and account with its scopes, valid `token_lifetime_s` (a cached
one is handed out again until it has under 5 minutes left, as GCE does). The fake records
every one (`access_tokens`); `token_info(token)` says whose a token is while it is valid
(what Google's tokeninfo endpoint answers; tests/fakes/gcs_identity.py asks it), and
`token_for(email)` is the newest one an instance running as `email` got. Without a
serviceAccounts entry there is no `service-accounts/` in its metadata (404, no token).
`preempt(name)` sets its `preempted` to TRUE; deleting the instance stops its node (its
whole process tree) and its metadata server; `stop()` stops every one.
"""

from __future__ import annotations

import functools
import itertools
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

from tests.fakes.gce_boot import BootConfig, Booter, GceInstanceMetadata, gce_env
from tests.fakes.gce_routes import GceHandler, Recorded

LINK = "https://www.googleapis.com/compute/v1/projects/{project}/"


@dataclass
class Failure:
    code: str
    via: str  # "http" | "operation"
    status: int
    after: int  # inserts that succeed in the zone before failures start
    reason: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class AccessToken:
    """An OAuth access token a booted instance's metadata server handed out."""
    email: str  # the service account it acts as
    instance: str  # "<zone>/<name>" of the instance that was given it
    scopes: tuple[str, ...]
    expires_at: float  # time.time() seconds


@dataclass
class FakeGCE:
    project: str = "geotrain-test"
    # Not *.gserviceaccount.com on purpose: for such an address google-auth
    # starts a background "regional access boundary" lookup on
    # iamcredentials.googleapis.com, which must not be called from tests.
    service_account: str = "compute-default@geotrain-test.invalid"
    token: str = field(default_factory=lambda: "ya29.fake-" + secrets.token_urlsafe(24))
    instances: dict = field(default_factory=dict)  # (zone, name) -> instance JSON
    firewalls: dict = field(default_factory=dict)  # name -> firewall JSON
    operations: dict = field(default_factory=dict)  # (scope, name) -> operation JSON
    requests: list = field(default_factory=list)
    failures: dict = field(default_factory=dict)  # zone -> Failure
    inserted: dict = field(default_factory=dict)  # zone -> successful inserts so far
    boot: BootConfig | None = None  # set: instances boot (see the module docstring)
    project_number: str = "210987654321"
    access_tokens: dict = field(default_factory=dict)  # token -> AccessToken, every one issued
    token_lifetime_s: float = 3600.0  # how long an instance's access token is valid
    service_accounts: dict = field(default_factory=dict)  # email -> IAM account JSON
    account_made_at: dict = field(default_factory=dict)  # email -> time.monotonic() made
    accounts_must_exist: bool = False  # inserts naming an unknown account are refused
    account_propagation_s: float = 0.0  # a new account is unknown to inserts this long

    def __post_init__(self):
        self._lock = threading.Lock()
        self._ids = itertools.count(1000)
        self._ips = itertools.count(2)
        self._done_actions: dict = {}  # (scope, op name) -> callable run when it turns DONE
        self._server: ThreadingHTTPServer | None = None
        self._booter: Booter | None = Booter(self.boot) if self.boot else None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> str:
        fake = self

        class Handler(GceHandler):
            gce = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url

    def stop(self) -> None:
        if self._booter:
            self._booter.stop()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # -- test controls -----------------------------------------------------
    def fail_zone(self, zone: str, code: str = "ZONE_RESOURCE_POOL_EXHAUSTED", *,
                  via: str = "http", status: int = 503, after: int = 0,
                  reason: str | None = None, message: str | None = None) -> None:
        self.failures[zone] = Failure(code, via, status, after, reason, message)

    def bodies(self, method: str, path_suffix: str) -> list[dict]:
        return [r.body for r in self.requests
                if r.method == method and r.path.endswith(path_suffix) and r.body is not None]

    def api_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.startswith("/compute/v1/")]

    def iam_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.startswith("/v1/")]

    def account_visible(self, email: str) -> bool:
        """Whether an instance insert may name `email` now (see the module docstring)."""
        if not self.accounts_must_exist or email == "default":
            return True
        made = self.account_made_at.get(email)
        return made is not None and time.monotonic() - made >= self.account_propagation_s

    # -- booting -----------------------------------------------------------
    def enable_boot(self, config: BootConfig) -> None:
        """Boot instances that turn RUNNING from now on."""
        self.boot = config
        self._booter = Booter(config)

    def issue_token(self, email: str, instance: str, scopes: list[str] | tuple[str, ...] = (),
                    lifetime_s: float | None = None) -> tuple[str, float]:
        """A new access token for `email` on `instance` ("<zone>/<name>"): (token, expires_at).
        What a booted instance's metadata server calls when it needs one."""
        token = "ya29.node-" + secrets.token_urlsafe(24)
        expires_at = time.time() + (self.token_lifetime_s if lifetime_s is None else lifetime_s)
        with self._lock:
            self.access_tokens[token] = AccessToken(email, instance, tuple(scopes), expires_at)
        return token, expires_at

    def token_info(self, token: str) -> dict | None:
        """Whose access token this is, as Google's tokeninfo endpoint answers
        ({"email", "scope", "expires_in"} plus the fake's "instance"); None for a token
        no instance was given or one that has expired."""
        with self._lock:
            issued = self.access_tokens.get(token)
        left = issued.expires_at - time.time() if issued else 0
        if left <= 0:
            return None
        return {"email": issued.email, "scope": " ".join(issued.scopes), "expires_in": int(left),
                "instance": issued.instance}

    def token_for(self, email: str) -> str:
        """The newest access token an instance running as `email` was given."""
        with self._lock:
            found = [t for t, issued in self.access_tokens.items() if issued.email == email]
        if not found:
            raise KeyError(f"no instance running as {email!r} has asked for a token")
        return found[-1]

    def _key(self, name: str, zone: str | None) -> tuple[str, str]:
        found = [k for k in (self._booter.metadata if self._booter else {})
                 if k[1] == name and zone in (None, k[0])]
        if len(found) != 1:
            raise KeyError(f"no booted instance {name!r}" + (f" in {zone}" if zone else "")
                           + (" (several zones: name one)" if found else ""))
        return found[0]

    def metadata_server(self, name: str, zone: str | None = None) -> GceInstanceMetadata:
        """The metadata server of a booted instance."""
        with self._lock:
            key = self._key(name, zone)
            return self._booter.metadata[key]

    def claims_of(self, token: str) -> dict | None:
        """The claims of an identity token a booted instance's metadata server issued
        (None: not one of ours, or expired): what an OIDC verifier would establish."""
        with self._lock:
            servers = list(self._booter.metadata.values()) if self._booter else []
        for md in servers:
            claims = md.identity_tokens.get(token)
            if claims and claims["exp"] > time.time():
                return dict(claims)
        return None

    def node(self, name: str, zone: str | None = None):
        """The BootedNode of a booted instance (None if it had no startup-script)."""
        with self._lock:
            key = self._key(name, zone)
            return self._booter.nodes.get(key)

    def preempt(self, name: str, zone: str | None = None) -> None:
        """Announce the preemption of a booted instance: its `preempted` turns TRUE."""
        self.metadata_server(name, zone).preempt()

    def _boot(self, zone: str, name: str) -> None:
        """Called (under the lock) when an instance turns RUNNING."""
        inst = self.instances[(zone, name)]
        items = {i["key"]: i.get("value", "") for i in
                 (inst.get("metadata") or {}).get("items", [])}
        account = (inst.get("serviceAccounts") or [None])[0]
        email = mint = None
        scopes: list[str] = []
        if account:
            email = account.get("email") or "default"
            email = self.service_account if email == "default" else email
            scopes = list(account.get("scopes") or [])
            mint = functools.partial(self.issue_token, email, f"{zone}/{name}", tuple(scopes))
        machine = inst.get("machineType", "").rsplit("/", 1)[-1]
        md = GceInstanceMetadata(name=name, instance_id=inst["id"], zone=zone,
                                 project=self.project, project_number=self.project_number,
                                 machine_type=machine, attributes=items, service_account=email,
                                 scopes=scopes, token=None, mint=mint)
        nic = (inst.get("networkInterfaces") or [{}])[0]
        network = (nic.get("network") or "global/networks/default").rsplit("/", 1)[-1]
        # An auto-mode VPC network's regional subnets are all in 10.128.0.0/9, routed
        # to each other: every address of the network is on its link.
        self._booter.boot((zone, name), md, items.get("startup-script"),
                          f"gce-{name}-{inst['id']}-{secrets.token_hex(3)}",
                          f"{name}-{inst['id']}", gce_env,
                          nic=self._booter.nic(network, nic.get("networkIP"), 9))

    # -- helpers -----------------------------------------------------------
    def link(self, rest: str) -> str:
        return LINK.format(project=self.project) + rest

    def _operation(self, scope: str, kind: str, target: str, on_done=None,
                   error: dict | None = None) -> dict:
        name = f"operation-{next(self._ids)}-{secrets.token_hex(4)}"
        op = {"kind": "compute#operation", "id": str(next(self._ids)), "name": name,
              "operationType": kind, "targetLink": self.link(target), "status": "PENDING",
              "progress": 0, "user": self.service_account,
              "insertTime": "2026-11-22T00:00:00.000-08:00",
              "selfLink": self.link(f"{scope}/operations/{name}")}
        if scope.startswith("zones/"):
            op["zone"] = self.link(scope)
        self.operations[(scope, name)] = op
        self._done_actions[(scope, name)] = (on_done, error)
        return dict(op)

    def _advance(self, scope: str, name: str) -> dict | None:
        op = self.operations.get((scope, name))
        if op is None:
            return None
        if op["status"] == "PENDING":
            op["status"] = "RUNNING"
            op["progress"] = 50
        elif op["status"] == "RUNNING":
            op["status"] = "DONE"
            op["progress"] = 100
            on_done, error = self._done_actions.pop((scope, name))
            if error:
                op["error"] = error
                op["httpErrorStatusCode"] = 503
                op["httpErrorMessage"] = "SERVICE UNAVAILABLE"
            elif on_done:
                on_done()
        return dict(op)
