"""Booting for the ARM stand-in (tests/fakes/arm_server.py): a per-VM Azure IMDS
stand-in and the VM's custom data run as a `BootedNode`.

`AzureImds` serves on 127.0.0.1:<free port> what Azure's Instance Metadata Service
serves a VM. Every request needs the `Metadata: true` header and an `api-version`
query parameter; one carrying `X-Forwarded-For` is refused (400, JSON `error`), like
the real one.

    GET  /metadata/instance[/compute|/network[/...]]   JSON; a leaf with ?format=text
         compute: name, vmId, location, zone, resourceGroupName, subscriptionId,
                  resourceId, vmSize, priority, osType, tags, tagsList, azEnvironment
         network: interface[0].ipv4.ipAddress[0].privateIpAddress = its node's private
                  address (its NIC's, on its virtual network's private side where nodes
                  get networks of their own: tests/fakes/gce_boot.py Booter), else 127.0.0.1
    GET  /metadata/identity/oauth2/token?resource=R[&client_id|object_id|msi_res_id]
         only when the VM has an identity (SystemAssigned and/or UserAssigned); else
         400 {"error": "invalid_request", "error_description": "Identity not found"}.
         A token (`NodeTokens`) is for one identity and resource, valid `lifetime_s`; a
         cached one is handed out again until it has under 5 minutes left.
    GET  /metadata/scheduledevents      {"DocumentIncarnation", "Events": [...]}
    POST /metadata/scheduledevents      {"StartRequests": [{"EventId"}]}: acknowledged
                                        events turn Started (`acknowledged`)

`schedule(event_type)` adds an event naming this VM (`preempt()` = "Preempt", with a
NotBefore 30 s ahead, as Azure gives Spot VMs).
`vm_imds(vm, ...)` builds the one a VM held by the ARM stand-in gets: its compute
document and its identities. `NodeTokens.info(token)` says whose a token is while it is
valid (tests/fakes/azure_identity.py asks it, as Azure Storage checks a token).
"""

from __future__ import annotations

import copy
import email.utils
import ipaddress
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from tests.fakes.gce_boot import BootConfig, Booter, serve, stop_servers

__all__ = ["AzureImds", "BootConfig", "Booter", "NodeTokens", "azure_env", "vm_imds"]

NOTICE_S = 30  # Azure: Spot eviction events are announced at least 30 s ahead
REUSE_S = 300  # a cached token with less left than this is replaced at the next ask


@dataclass(frozen=True)
class IssuedToken:
    principal_id: str
    client_id: str
    vm: str            # the VM's name
    resource: str      # the audience it was asked for
    expires_at: float


class NodeTokens:
    """Every access token the VMs' IMDS stand-ins issued (shared by one ARM stand-in)."""

    def __init__(self, lifetime_s: float = 86399.0):
        self.lifetime_s = lifetime_s
        self.issued: dict[str, IssuedToken] = {}
        self._lock = threading.Lock()

    def issue(self, principal_id: str, client_id: str, vm: str, resource: str,
              lifetime_s: float | None = None) -> tuple[str, float]:
        """A new token: (token, expires_at)."""
        token = "eyJ0eXAiOiJKV1QifQ.node-" + secrets.token_urlsafe(24)
        expires_at = time.time() + (self.lifetime_s if lifetime_s is None else lifetime_s)
        with self._lock:
            self.issued[token] = IssuedToken(principal_id, client_id, vm, resource, expires_at)
        return token, expires_at

    def get(self, principal_id: str, client_id: str, vm: str, resource: str) -> tuple[str, float]:
        """What IMDS answers: the cached token for this identity and resource while it has
        REUSE_S left, else a new one."""
        with self._lock:
            for token, t in reversed(self.issued.items()):
                if (t.principal_id, t.vm, t.resource) == (principal_id, vm, resource) \
                        and t.expires_at - time.time() > REUSE_S:
                    return token, t.expires_at
        return self.issue(principal_id, client_id, vm, resource)

    def info(self, token: str) -> dict | None:
        """Whose token this is ({"principal_id", "client_id", "vm", "resource",
        "expires_on"}); None for one never issued or expired."""
        with self._lock:
            t = self.issued.get(token)
        if t is None or t.expires_at <= time.time():
            return None
        return {"principal_id": t.principal_id, "client_id": t.client_id, "vm": t.vm,
                "resource": t.resource, "expires_on": int(t.expires_at)}

    def newest(self, principal_id: str) -> str:
        """The newest token issued to `principal_id`."""
        with self._lock:
            found = [k for k, t in self.issued.items() if t.principal_id == principal_id]
        if not found:
            raise KeyError(f"no VM has asked for a token of {principal_id!r}")
        return found[-1]


class AzureImds:
    """The IMDS one booted VM sees. `identities` maps what a token request may name
    (client id, object/principal id, resource id; "" for the default one) to the
    principal id of that identity; empty: the VM has no identity. `tokens` issues them."""

    def __init__(self, *, compute: dict, identities: dict[str, str],
                 default_identity: str | None, client_ids: dict[str, str], tokens: NodeTokens):
        self.compute = compute
        self.identities = identities          # selector -> principal id ("" -> the default one)
        self.default_identity = default_identity  # None: none, "ambiguous": several user-assigned
        self.client_ids = client_ids          # principal id -> its client id
        self.tokens = tokens
        self.private_ip, self.subnet_prefix = "127.0.0.1", 8  # its node's (Booter.boot sets the ip)
        self.events: list[dict] = []
        self.acknowledged: list[str] = []
        self.incarnation = 1
        self.requests: list[tuple[str, str, dict]] = []
        self.token_requests = 0
        self._lock = threading.Lock()
        self._server = None

    def start(self) -> AzureImds:
        self._server = serve(type("Handler", (_ImdsHandler,), {"imds": self}))
        return self

    def stop(self) -> None:
        stop_servers(self._server)
        self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def schedule(self, event_type: str = "Preempt", not_before_s: float = NOTICE_S) -> str:
        """Announce an event for this VM; returns its EventId."""
        event_id = str(uuid.uuid4()).upper()
        with self._lock:
            self.events.append({
                "EventId": event_id, "EventStatus": "Scheduled", "EventType": event_type,
                "ResourceType": "VirtualMachine", "Resources": [self.compute["name"]],
                "NotBefore": email.utils.formatdate(time.time() + not_before_s, usegmt=True),
                "Description": f"Virtual machine is being {event_type.lower()}ed" if event_type
                != "Preempt" else "Virtual machine is being evicted.",
                "EventSource": "Platform", "DurationInSeconds": -1})
            self.incarnation += 1
        return event_id

    def preempt(self) -> str:
        return self.schedule("Preempt")

    def document(self) -> dict:
        prefix = self.subnet_prefix if self.private_ip != "127.0.0.1" else 8
        subnet = ipaddress.ip_interface(f"{self.private_ip}/{prefix}").network
        return {"compute": copy.deepcopy(self.compute), "network": {"interface": [{
            "ipv4": {"ipAddress": [{"privateIpAddress": self.private_ip, "publicIpAddress": ""}],
                     "subnet": [{"address": str(subnet.network_address), "prefix": str(prefix)}]},
            "ipv6": {"ipAddress": []}, "macAddress": "000D3A000001"}]}}


def _error(message: str) -> dict:
    return {"error": message}


class _ImdsHandler(BaseHTTPRequestHandler):
    imds: AzureImds
    protocol_version = "HTTP/1.1"
    server_version = "Microsoft-IIS/10.0"  # what IMDS says it is

    def log_message(self, *args):
        pass

    def _send(self, status: int, body, ctype: str = "application/json; charset=utf-8") -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._route()

    def do_POST(self):
        self._route()

    def _route(self) -> None:
        imds = self.imds
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        with imds._lock:
            imds.requests.append((self.command, url.path, query))
        if self.headers.get("X-Forwarded-For"):
            return self._send(400, _error("Bad request. Requests with header X-Forwarded-For "
                                          "are not allowed."))
        if (self.headers.get("Metadata") or "").lower() != "true":
            return self._send(400, _error("Bad request. Required metadata header not specified"))
        if "api-version" not in query:
            return self._send(400, {"error": "Bad request. api-version was not specified in the "
                                             "request. For more information refer to aka.ms/azureimds",
                                    "newest-versions": ["2023-07-01", "2021-12-13", "2021-11-15"]})
        path = url.path.rstrip("/")
        if path == "/metadata/identity/oauth2/token" and self.command == "GET":
            return self._token(query)
        if path == "/metadata/scheduledevents":
            return self._events(raw)
        if (path == "/metadata/instance" or path.startswith("/metadata/instance/")) \
                and self.command == "GET":
            return self._instance(path, query)
        self._send(404, _error("Not found"))

    def _instance(self, path: str, query: dict) -> None:
        node = self.imds.document()
        for part in [p for p in path.split("/")[3:] if p]:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                return self._send(404, _error("Not found"))
        if query.get("format") == "text":
            if isinstance(node, (dict, list)):
                return self._send(400, _error("Bad request. Query parameter format=text is only "
                                              "supported for leaf nodes"))
            return self._send(200, str(node), "text/plain; charset=utf-8")
        self._send(200, node)

    def _token(self, query: dict) -> None:
        imds = self.imds
        resource = query.get("resource")
        if not resource:
            return self._send(400, {"error": "invalid_request",
                                    "error_description": "Required query variable 'resource' is "
                                                         "missing"})
        selectors = [query[k] for k in ("client_id", "object_id", "msi_res_id", "mi_res_id")
                     if query.get(k)]
        if not imds.identities:
            return self._send(400, {"error": "invalid_request",
                                    "error_description": "Identity not found"})
        if not selectors and imds.default_identity == "ambiguous":
            return self._send(400, {"error": "invalid_request", "error_description":
                                    "Multiple user assigned identities exist, please specify the "
                                    "clientId / resourceId of the identity in the token request"})
        principal = imds.identities.get(selectors[0].lower() if selectors else "")
        if principal is None:
            return self._send(400, {"error": "invalid_request",
                                    "error_description": "Identity not found"})
        with imds._lock:
            imds.token_requests += 1
        client_id = imds.client_ids[principal]
        token, expires_at = imds.tokens.get(principal, client_id, imds.compute["name"], resource)
        now, left = int(time.time()), str(max(0, int(expires_at - time.time())))
        self._send(200, {"access_token": token, "client_id": client_id, "expires_in": left,
                         "expires_on": str(int(expires_at)), "ext_expires_in": left,
                         "not_before": str(now), "resource": resource, "token_type": "Bearer"})

    def _events(self, raw: bytes) -> None:
        imds = self.imds
        if self.command == "POST":
            try:
                wanted = {r["EventId"] for r in json.loads(raw or b"{}").get("StartRequests", [])}
            except (ValueError, KeyError, TypeError, AttributeError):
                return self._send(400, _error("Bad request. Invalid StartRequests body"))
            with imds._lock:
                for ev in imds.events:
                    if ev["EventId"] in wanted and ev["EventStatus"] == "Scheduled":
                        ev["EventStatus"] = "Started"
                        imds.acknowledged.append(ev["EventId"])
                        imds.incarnation += 1
            return self._send(200, "", "text/plain")
        with imds._lock:
            doc = {"DocumentIncarnation": imds.incarnation, "Events": copy.deepcopy(imds.events)}
        self._send(200, doc)


def vm_imds(vm: dict, subscription: str, tokens: NodeTokens) -> AzureImds:
    """The IMDS stand-in (not started) of a VM the ARM stand-in holds: `vm` is its record
    there (with `_group` and `_client_id`, which ARM does not show); `tokens` issues the
    tokens of its identities."""
    props = vm["properties"]
    identity = vm.get("identity") or {}
    kind = identity.get("type") or ""
    identities, client_ids, defaults = {}, {}, []
    if "SystemAssigned" in kind and identity.get("principalId"):
        principal = identity["principalId"]
        client_ids[principal] = vm["_client_id"]
        identities.update({principal.lower(): principal, vm["_client_id"].lower(): principal})
        defaults.append(principal)
    if "UserAssigned" in kind:
        for uid, info in (identity.get("userAssignedIdentities") or {}).items():
            principal = info["principalId"]
            client_ids[principal] = info["clientId"]
            identities.update({uid.lower(): principal, principal.lower(): principal,
                               info["clientId"].lower(): principal})
            if "SystemAssigned" not in kind:
                defaults.append(principal)
    default = None
    if len(defaults) == 1:
        identities[""] = defaults[0]
        default = "one"
    elif defaults:
        default = "ambiguous"
    tags = vm.get("tags") or {}
    compute = {
        "name": vm["name"], "vmId": props["vmId"], "location": vm["location"],
        "zone": (vm.get("zones") or [""])[0], "resourceGroupName": vm["_group"],
        "subscriptionId": subscription, "resourceId": vm["id"],
        "vmSize": props.get("hardwareProfile", {}).get("vmSize", ""),
        "priority": props.get("priority", ""), "evictionPolicy": props.get("evictionPolicy", ""),
        "osType": "Linux", "provider": "Microsoft.Compute", "azEnvironment": "AzurePublicCloud",
        "osProfile": {k: props.get("osProfile", {}).get(k, "")
                      for k in ("computerName", "adminUsername")},
        "tags": ";".join(f"{k}:{v}" for k, v in tags.items()),
        "tagsList": [{"name": k, "value": v} for k, v in tags.items()]}
    return AzureImds(compute=compute, identities=identities, default_identity=default,
                     client_ids=client_ids, tokens=tokens)


def azure_env(imds: AzureImds) -> dict[str, str]:
    """What a booted VM's environment says about its IMDS. azure-identity's
    ManagedIdentityCredential (and msal) take the IMDS address from
    AZURE_POD_IDENTITY_AUTHORITY_HOST; no other managed-identity variable is set, so
    they take the IMDS (VM) path."""
    return {"AZURE_POD_IDENTITY_AUTHORITY_HOST": imds.url,
            "GEOTRAIN_METADATA_ENDPOINT": imds.url, "NO_PROXY": "127.0.0.1,localhost"}
