"""A local Compute Engine v1 REST server and GCE metadata server, for tests.

No usable GCE emulator exists, so this speaks the documented JSON of the
Compute Engine v1 API (camelCase fields, as the API returns them) to the real
`google-cloud-compute` client over plain HTTP on 127.0.0.1:

    instances      insert / get / list / aggregatedList (label filter) / delete
    zones          list
    zoneOperations get / wait      firewalls insert / get / list / delete
    globalOperations get / wait

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

Every request is recorded (`requests`) with its parsed JSON body for
assertions. Start with `start()`, stop with `stop()`; nothing is left open.

Booting (opt-in: `FakeGCE(boot=BootConfig(image_bin, workdir, node_env))` or
`enable_boot(config)`; tests/fakes/gce_boot.py): when an inserted instance turns
RUNNING, it gets its own metadata server (`metadata_server(name)`) and its
`startup-script` item runs as a `BootedNode` (`node(name)`) with the environment

    GCE_METADATA_HOST=127.0.0.1:<port>  GCE_METADATA_IP=127.0.0.1:<port>
    GEOTRAIN_METADATA_ENDPOINT=http://127.0.0.1:<port>  NO_PROXY=127.0.0.1,localhost
    + BootConfig.node_env

The instance's service account (its `serviceAccounts[0]`, "default" meaning
`service_account`) gets the token `token_for(email)`; without a serviceAccounts entry
there is no `service-accounts/` in its metadata. `preempt(name)` sets its `preempted` to
TRUE; deleting the instance stops its node (its whole process tree) and its metadata
server; `stop()` stops every one.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tests.fakes.gce_boot import BootConfig, Booter, GceInstanceMetadata, gce_env

LINK = "https://www.googleapis.com/compute/v1/projects/{project}/"
ZONES = ("us-central1-a", "us-central1-b", "us-central1-c", "europe-west4-a")
CAPACITY_MESSAGES = {
    "ZONE_RESOURCE_POOL_EXHAUSTED": "The zone 'projects/{project}/zones/{zone}' does not have "
    "enough resources available to fulfill the request.  Try a different zone, or try again later.",
    "QUOTA_EXCEEDED": "Quota 'NVIDIA_L4_GPUS' exceeded.  Limit: 0.0 in region {region}.",
}


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    body: dict | None
    authorization: str | None


@dataclass
class Failure:
    code: str
    via: str  # "http" | "operation"
    status: int
    after: int  # inserts that succeed in the zone before failures start
    reason: str | None = None
    message: str | None = None


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
    sa_tokens: dict = field(default_factory=dict)  # service account email -> its node token

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

        class Handler(_Handler):
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

    # -- booting -----------------------------------------------------------
    def enable_boot(self, config: BootConfig) -> None:
        """Boot instances that turn RUNNING from now on."""
        self.boot = config
        self._booter = Booter(config)

    def token_for(self, email: str) -> str:
        """The access token the metadata server gives an instance running as `email`."""
        with self._lock:
            return self._token_for(email)

    def _token_for(self, email: str) -> str:
        return self.sa_tokens.setdefault(email, "ya29.node-" + secrets.token_urlsafe(24))

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
        email = token = None
        scopes: list[str] = []
        if account:
            email = account.get("email") or "default"
            email = self.service_account if email == "default" else email
            token = self._token_for(email)
            scopes = list(account.get("scopes") or [])
        machine = inst.get("machineType", "").rsplit("/", 1)[-1]
        md = GceInstanceMetadata(name=name, instance_id=inst["id"], zone=zone,
                                 project=self.project, project_number=self.project_number,
                                 machine_type=machine, attributes=items, service_account=email,
                                 scopes=scopes, token=token)
        self._booter.boot((zone, name), md, items.get("startup-script"),
                          f"gce-{name}-{inst['id']}-{secrets.token_hex(3)}",
                          f"{name}-{inst['id']}", gce_env)

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


def error_body(status: int, message: str, reason: str, domain: str = "global") -> dict:
    return {"error": {"code": status, "message": message,
                      "errors": [{"message": message, "domain": domain, "reason": reason}]}}


def matches(filter_text: str, instance: dict) -> bool:
    """The subset of the list-filter grammar we use: `labels.K = V` / `name = V`
    expressions, each optionally in parentheses, joined by AND or whitespace."""
    exprs = re.findall(r'\(?\s*([\w.\-]+)\s*(=|!=)\s*"?([^"()\s]*)"?\s*\)?', filter_text or "")
    if filter_text and not exprs:
        raise ValueError(f"Invalid list filter expression {filter_text!r}")
    for key, op, value in exprs:
        if key.startswith("labels."):
            actual = instance.get("labels", {}).get(key[len("labels."):])
        elif key == "name":
            actual = instance.get("name")
        else:
            raise ValueError(f"Invalid field name {key!r} in filter")
        if (actual == value) != (op == "="):
            return False
    return True


ROUTES = [
    ("POST", r"zones/(?P<zone>[^/]+)/instances", "insert_instance"),
    ("GET", r"zones/(?P<zone>[^/]+)/instances", "list_instances"),
    ("GET", r"zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)", "get_instance"),
    ("GET", r"zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)/serialPort", "serial_port"),
    ("DELETE", r"zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)", "delete_instance"),
    ("GET", r"aggregated/instances", "aggregated_instances"),
    ("GET", r"zones", "list_zones"),
    ("GET", r"(?P<scope>zones/[^/]+|global)/operations/(?P<name>[^/]+)", "get_operation"),
    ("POST", r"(?P<scope>zones/[^/]+|global)/operations/(?P<name>[^/]+)/wait", "get_operation"),
    ("POST", r"global/firewalls", "insert_firewall"),
    ("GET", r"global/firewalls", "list_firewalls"),
    ("GET", r"global/firewalls/(?P<name>[^/]+)", "get_firewall"),
    ("DELETE", r"global/firewalls/(?P<name>[^/]+)", "delete_firewall"),
]


class _Handler(BaseHTTPRequestHandler):
    gce: FakeGCE
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _send(self, status: int, payload, headers: dict | None = None) -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        ctype = "application/text" if isinstance(payload, str) else "application/json"
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw.strip() else None
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        gce = self.gce
        with gce._lock:
            gce.requests.append(Recorded(method, url.path, query, body,
                                         self.headers.get("Authorization")))
            if not url.path.startswith("/compute/v1/"):
                return self._metadata(url.path, query)
            if self.headers.get("Authorization") != f"Bearer {gce.token}":
                return self._send(401, error_body(
                    401, "Request is missing required authentication credential.",
                    "required"))
            prefix = f"/compute/v1/projects/{gce.project}/"
            if not url.path.startswith(prefix):
                return self._send(404, error_body(404, f"The resource '{url.path}' was not found",
                                                  "notFound"))
            rest = url.path[len(prefix):]
            for verb, pattern, handler in ROUTES:
                m = re.fullmatch(pattern, rest)
                if verb == method and m:
                    status, payload = getattr(self, handler)(body=body, query=query,
                                                             **m.groupdict())
                    return self._send(status, payload)
            self._send(404, error_body(404, f"no route for {method} {rest}", "notFound"))

    # -- metadata server ---------------------------------------------------
    def _metadata(self, path: str, query: dict) -> None:
        gce = self.gce
        flavor = {"Metadata-Flavor": "Google"}
        if path == "/":
            return self._send(200, "", flavor)
        if self.headers.get("Metadata-Flavor") != "Google":
            return self._send(403, "Missing Metadata-Flavor:Google header.", flavor)
        sa = "/computeMetadata/v1/instance/service-accounts/default"
        if path == "/computeMetadata/v1/project/project-id":
            return self._send(200, gce.project, flavor)
        if path == sa + "/":
            return self._send(200, {"aliases": ["default"], "email": gce.service_account,
                                    "scopes": ["https://www.googleapis.com/auth/cloud-platform"]},
                              flavor)
        if path == sa + "/token":
            return self._send(200, {"access_token": gce.token, "expires_in": 3599,
                                    "token_type": "Bearer"}, flavor)
        if path == "/computeMetadata/v1/universe/universe-domain":
            return self._send(200, "googleapis.com", flavor)
        self._send(404, "not found", flavor)

    # -- instances ---------------------------------------------------------
    def insert_instance(self, zone, body, query):
        gce = self.gce
        name = body["name"]
        if (zone, name) in gce.instances:
            return 409, error_body(409, f"The resource 'projects/{gce.project}/zones/{zone}/"
                                   f"instances/{name}' already exists", "alreadyExists")
        fail = gce.failures.get(zone)
        done = gce.inserted.get(zone, 0)
        if fail and done >= fail.after:
            template = fail.message or CAPACITY_MESSAGES.get(fail.code, f"{fail.code} in {zone}")
            message = template.format(
                project=gce.project, zone=zone, region=zone.rsplit("-", 1)[0])
            if fail.via == "http":
                return fail.status, error_body(fail.status, message, fail.reason or fail.code)
            return 200, gce._operation(f"zones/{zone}", "insert", f"zones/{zone}/instances/{name}",
                                       error={"errors": [{"code": fail.code, "message": message}]})
        gce.inserted[zone] = done + 1
        instance = dict(copy.deepcopy(body), kind="compute#instance", id=str(next(gce._ids)),
                        zone=gce.link(f"zones/{zone}"), status="PROVISIONING",
                        selfLink=gce.link(f"zones/{zone}/instances/{name}"),
                        creationTimestamp="2026-11-22T00:00:00.000-08:00")
        nics = instance.get("networkInterfaces", [{}])
        for i, nic in enumerate(nics):
            nic.update(name=f"nic{i}", networkIP=f"10.128.0.{next(gce._ips)}")
            for ac in nic.get("accessConfigs", []):
                ac["natIP"] = f"34.0.0.{next(gce._ips)}"
        instance["networkInterfaces"] = nics
        gce.instances[(zone, name)] = instance

        def running():
            if (zone, name) in gce.instances:
                gce.instances[(zone, name)]["status"] = "RUNNING"
                if gce._booter is not None:
                    gce._boot(zone, name)
        return 200, gce._operation(f"zones/{zone}", "insert", f"zones/{zone}/instances/{name}",
                                   on_done=running)

    def _not_found(self, what: str):
        return 404, error_body(404, f"The resource 'projects/{self.gce.project}/{what}' was not "
                               "found", "notFound")

    def get_instance(self, zone, name, body, query):
        inst = self.gce.instances.get((zone, name))
        return (200, inst) if inst else self._not_found(f"zones/{zone}/instances/{name}")

    def serial_port(self, zone, name, body, query):
        """A booted instance's console (what its node printed), the last 1 MiB as GCE keeps."""
        if (zone, name) not in self.gce.instances:
            return self._not_found(f"zones/{zone}/instances/{name}")
        node = self.gce._booter.nodes.get((zone, name)) if self.gce._booter else None
        text = node.console.read_bytes()[-2**20:].decode("utf-8", "replace") \
            if node is not None and node.console.exists() else ""
        return 200, {"kind": "compute#serialPortOutput", "contents": text, "start": "0",
                     "next": str(len(text)),
                     "selfLink": self.gce.link(f"zones/{zone}/instances/{name}/serialPort")}

    def list_instances(self, zone, body, query):
        try:
            items = [i for (z, _), i in sorted(self.gce.instances.items())
                     if z == zone and matches(query.get("filter", ""), i)]
        except ValueError as e:
            return 400, error_body(400, str(e), "invalid")
        return 200, {"kind": "compute#instanceList", "items": items,
                     "selfLink": self.gce.link(f"zones/{zone}/instances")}

    def aggregated_instances(self, body, query):
        gce = self.gce
        items = {}
        zones = sorted(set(ZONES) | {z for z, _ in gce.instances})
        try:
            for zone in zones:
                found = [i for (z, _), i in sorted(gce.instances.items())
                         if z == zone and matches(query.get("filter", ""), i)]
                items[f"zones/{zone}"] = {"instances": found} if found else {"warning": {
                    "code": "NO_RESULTS_ON_PAGE", "message": "There are no results for scope "
                    f"'zones/{zone}' on this page.", "data": [{"key": "scope",
                                                              "value": f"zones/{zone}"}]}}
        except ValueError as e:
            return 400, error_body(400, str(e), "invalid")
        return 200, {"kind": "compute#instanceAggregatedList",
                     "id": f"projects/{gce.project}/aggregated/instances", "items": items,
                     "selfLink": gce.link("aggregated/instances")}

    def delete_instance(self, zone, name, body, query):
        gce = self.gce
        inst = gce.instances.get((zone, name))
        if inst is None:
            return self._not_found(f"zones/{zone}/instances/{name}")
        inst["status"] = "STOPPING"
        if gce._booter is not None:
            gce._booter.halt((zone, name))  # in the background: the API answers at once
        return 200, gce._operation(f"zones/{zone}", "delete", f"zones/{zone}/instances/{name}",
                                   on_done=lambda: gce.instances.pop((zone, name), None))

    def list_zones(self, body, query):
        gce = self.gce
        items = [{"kind": "compute#zone", "name": z, "status": "UP",
                  "region": gce.link(f"regions/{z.rsplit('-', 1)[0]}"),
                  "selfLink": gce.link(f"zones/{z}")} for z in ZONES]
        return 200, {"kind": "compute#zoneList", "items": items, "selfLink": gce.link("zones")}

    # -- operations --------------------------------------------------------
    def get_operation(self, scope, name, body, query):
        op = self.gce._advance(scope, name)
        return (200, op) if op else self._not_found(f"{scope}/operations/{name}")

    # -- firewalls ---------------------------------------------------------
    def insert_firewall(self, body, query):
        gce = self.gce
        name = body["name"]
        if name in gce.firewalls:
            return 409, error_body(409, f"The resource 'projects/{gce.project}/global/firewalls/"
                                   f"{name}' already exists", "alreadyExists")
        gce.firewalls[name] = dict(copy.deepcopy(body), kind="compute#firewall", id=str(next(gce._ids)),
                                   selfLink=gce.link(f"global/firewalls/{name}"))
        return 200, gce._operation("global", "insert", f"global/firewalls/{name}")

    def get_firewall(self, name, body, query):
        fw = self.gce.firewalls.get(name)
        return (200, fw) if fw else self._not_found(f"global/firewalls/{name}")

    def list_firewalls(self, body, query):
        return 200, {"kind": "compute#firewallList", "items": list(self.gce.firewalls.values()),
                     "selfLink": self.gce.link("global/firewalls")}

    def delete_firewall(self, name, body, query):
        gce = self.gce
        if name not in gce.firewalls:
            return self._not_found(f"global/firewalls/{name}")
        return 200, gce._operation("global", "delete", f"global/firewalls/{name}",
                                   on_done=lambda: gce.firewalls.pop(name, None))
