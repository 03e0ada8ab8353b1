"""The HTTP half of the Compute Engine stand-in (tests/fakes/gce_server.py): the v1 REST
routes (instances, zones, operations, firewalls; the IAM v1 service-account routes are in
tests/fakes/gce_iam.py) and the metadata endpoints that hand out the API's bearer token,
answered from a `FakeGCE`'s state.

Each request is recorded on the fake (`Recorded`), checked for the token, matched against
`ROUTES` and answered with the JSON the real API sends, errors included (`error_body`).
The server is started by `FakeGCE.start()`, with `GceHandler` bound to that fake.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from tests.fakes import gce_iam

if TYPE_CHECKING:
    from tests.fakes.gce_server import FakeGCE

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


class GceHandler(BaseHTTPRequestHandler):
    """Routes one request to the bound `gce` (a subclass sets it)."""

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
            if not url.path.startswith(("/compute/v1/", "/v1/")):
                return self._metadata(url.path, query)
            if self.headers.get("Authorization") != f"Bearer {gce.token}":
                return self._send(401, error_body(
                    401, "Request is missing required authentication credential.",
                    "required"))
            if url.path.startswith("/v1/"):  # the IAM API
                return self._send(*gce_iam.handle(gce, method, url.path, query, body))
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
        for account in body.get("serviceAccounts") or []:
            email = account.get("email", "")
            if not gce.account_visible(email):
                return 400, error_body(400, "Invalid value for field 'resource.serviceAccounts[0]"
                                       f".email': '{email}'. Service account {email} does not "
                                       "exist.", "invalid")
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
            nic.update(name=f"nic{i}", networkIP=str(ipaddress.ip_address("10.128.0.0") + next(gce._ips)))
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
