"""The HTTP half of the ARM stand-in (tests/fakes/arm_server.py): the TLS ARM REST routes
and the plain-HTTP managed-identity token endpoint, answered from a `FakeArm`'s state.

`ArmHandler` records each request on the fake (`Recorded`), checks the bearer token and
routes by path: long-running operations (`/_ops/`), role assignments at any scope,
resource groups, the resource types in `TYPES` (collections and single resources),
`retrieveBootDiagnosticsData` and the SAS URLs it hands out (`/_console/`). An `ArmError`
raised anywhere becomes ARM's error body. `IdentityHandler` is the App Service
managed-identity endpoint. `FakeArm.start()` binds both to itself (`handler`) and serves
the first over TLS with a certificate from `self_signed`.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from tests.fakes.azure_abac import BUILT_IN_NAMES, ROLES

if TYPE_CHECKING:
    from tests.fakes.arm_server import FakeArm

TYPES = {t.lower(): t for t in (
    "Microsoft.Network/virtualNetworks", "Microsoft.Network/virtualNetworks/subnets",
    "Microsoft.Network/networkSecurityGroups", "Microsoft.Network/networkInterfaces",
    "Microsoft.Network/publicIPAddresses", "Microsoft.Compute/virtualMachines",
    "Microsoft.Compute/disks")}


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    body: dict | None


class ArmError(Exception):
    """An ARM error answer: HTTP status and the body's `error.code` / `error.message`."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(status, code, message)
        self.status, self.code, self.message = status, code, message


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files in `directory`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def handler(fake: FakeArm, base: type) -> type:
    """`base` bound to `fake`: the class ThreadingHTTPServer instantiates per request."""
    return type(base.__name__, (base,), {"fake": fake})


class _Base(BaseHTTPRequestHandler):
    fake: FakeArm
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: dict | None = None, headers: dict | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class IdentityHandler(_Base):
    """The App Service managed-identity token endpoint (api-version 2019-08-01)."""

    def do_GET(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        if self.headers.get("X-IDENTITY-HEADER") != self.fake.identity_header:
            return self._send(401, {"statusCode": 401, "message": "X-IDENTITY-HEADER missing or wrong"})
        self.fake.token_requests += 1
        self._send(200, {"access_token": self.fake.token, "expires_on": str(int(time.time()) + 3600),
                         "resource": query.get("resource", [""])[0], "token_type": "Bearer",
                         "client_id": "00000000-0000-0000-0000-00000000c11d"})


class ArmHandler(_Base):
    """ARM's REST API: routes a request to the bound `fake`."""

    def _route(self) -> None:
        fake = self.fake
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        fake.requests.append(Recorded(self.command, url.path, parse_qs(url.query), body))
        if url.path.startswith("/_console/"):  # a SAS URL: its token is the credential
            return self._console(url.path.rsplit("/", 1)[-1])
        if self.headers.get("Authorization") != f"Bearer {fake.token}":
            return self._send(401, {"error": {"code": "AuthenticationFailed",
                                              "message": "Authentication failed."}})
        segs = url.path.strip("/").split("/")
        low = [s.lower() for s in segs]
        try:
            if low[0] == "_ops":
                status, out = fake.poll(segs[1])
                hdr = {"Location": f"{fake.base_url}{url.path}", "Retry-After": "0"} if status == 202 else {}
                return self._send(status, out, hdr)
            if "microsoft.authorization" in low and "roleassignments" in low:
                return self._role_assignment(url.path, body)
            if "microsoft.authorization" in low and "roledefinitions" in low:
                return self._role_definition(url.path, parse_qs(url.query), body)
            if low[:1] != ["subscriptions"] or len(low) < 3 or segs[1] != fake.subscription:
                raise ArmError(404, "SubscriptionNotFound", f"The subscription '{segs[1:2]}' could not be found.")
            rest, lrest = segs[2:], low[2:]
            if lrest == ["resourcegroups"] and self.command == "GET":
                return self._send(200, {"value": list(fake._groups.values())})
            if lrest[0] == "providers":  # subscription-wide list of one type
                return self._send(200, {"value": fake.list_type("/".join(rest[1:3]), None)})
            if lrest[0] != "resourcegroups" or len(rest) < 2:
                raise ArmError(404, "InvalidResourceType", f"Unknown path {url.path}")
            group = rest[1]
            if len(rest) == 2:
                return self._group(group, body)
            if lrest[2:] == ["resources"]:
                return self._send(200, {"value": fake.list_group(group)})
            if lrest[2] != "providers" or len(rest) < 5:
                raise ArmError(404, "InvalidResourceType", f"Unknown path {url.path}")
            tail = rest[3:]  # ns, type, name[, childtype, childname]
            if self.command == "POST" and lrest[-1] == "retrievebootdiagnosticsdata":
                return self._boot_diagnostics("/" + "/".join(segs[:-1]))
            rtype = TYPES.get("/".join([tail[0]] + tail[1::2]).lower())
            if rtype is None:
                raise ArmError(404, "InvalidResourceType", f"The resource type of {url.path} is not served here.")
            if len(tail) % 2 == 0:  # a collection
                if self.command != "GET":
                    raise ArmError(405, "MethodNotAllowed", self.command)
                items = fake.list_type(rtype, group)
                if len(tail) == 4:
                    parent = "/".join(segs[:-1]).lower()
                    items = [i for i in items if i["id"].lower().startswith("/" + parent + "/")]
                return self._send(200, {"value": items})
            parts = rtype.split("/")
            rid = (f"/subscriptions/{fake.subscription}/resourceGroups/{group}/providers/{parts[0]}/"
                   + "/".join(f"{t}/{n}" for t, n in zip(parts[1:], tail[2::2])))
            self._resource(rid, group, rtype, tail[-1], body)
        except ArmError as e:
            self._send(e.status, {"error": {"code": e.code, "message": e.message}})

    def _boot_diagnostics(self, rid: str) -> None:
        """virtualMachines/retrieveBootDiagnosticsData: SAS URLs of the VM's boot logs
        (here a URL on this server, whose random token stands for the SAS)."""
        fake = self.fake
        with fake._lock:
            vm = fake._res.get(rid.lower())
            if vm is None:
                raise ArmError(404, "ResourceNotFound", f"The Resource '{rid}' was not found.")
            diag = vm["properties"].get("diagnosticsProfile", {}).get("bootDiagnostics", {})
            if not diag.get("enabled"):
                raise ArmError(409, "OperationNotAllowed",
                               "Boot diagnostics are not enabled for this virtual machine.")
            sas = secrets.token_urlsafe(16)
            fake.console_sas[sas] = rid.lower()
        self._send(200, {"consoleScreenshotBlobUri": f"{fake.base_url}/_console/{sas}.bmp",
                         "serialConsoleLogBlobUri": f"{fake.base_url}/_console/{sas}"})

    def _console(self, sas: str) -> None:
        """The serial console log a SAS URL names: what the booted node printed (1 MiB tail)."""
        fake = self.fake
        with fake._lock:
            rid = fake.console_sas.get(sas)
            node = fake._booter.nodes.get(rid) if rid and fake._booter else None
        if rid is None:
            return self._send(403, {"error": {"code": "AuthenticationFailed",
                                              "message": "Signature not valid."}})
        text = node.console.read_bytes()[-2**20:] if node is not None and node.console.exists() else b""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def _role_definition(self, path: str, query: dict, body: dict | None) -> None:
        """Microsoft.Authorization/roleDefinitions of the subscription: PUT a custom role
        (as `az role definition create` does), GET one, or list them, `$filter=roleName eq
        '...'` honoured. Built-in roles are known by GUID (azure_abac.ROLES), not listed."""
        fake = self.fake
        base = f"/subscriptions/{fake.subscription}/providers/microsoft.authorization/roledefinitions"
        key = path.lower().rstrip("/")
        with fake._lock:
            if key == base and self.command == "GET":
                found = [fake._render(r) for r in fake._res.values()
                         if r["type"] == "Microsoft.Authorization/roleDefinitions"]
                found += [{"id": f"/subscriptions/{fake.subscription}/providers/Microsoft.Authorization/"
                                 f"roleDefinitions/{guid}", "name": guid, "type": "Microsoft.Authorization/roleDefinitions",
                           "properties": {"roleName": name, "type": "BuiltInRole", "permissions": [{
                               "actions": sorted(ROLES[guid][0]), "dataActions": sorted(ROLES[guid][1]),
                               "notActions": [], "notDataActions": []}], "assignableScopes": ["/"]}}
                          for guid, name in BUILT_IN_NAMES.items()]
                want = (query.get("$filter") or [""])[0]
                if want:
                    m = re.fullmatch(r"roleName eq '([^']*)'", want.strip())
                    if not m:
                        raise ArmError(400, "InvalidFilter", f"cannot read $filter {want!r}")
                    found = [r for r in found if r["properties"]["roleName"] == m[1]]
                return self._send(200, {"value": found})
            if not key.startswith(base + "/") or key.count("/") != base.count("/") + 1:
                raise ArmError(404, "InvalidResourceType", f"Unknown path {path}")
            res = fake._res.get(key)
            if self.command == "PUT":
                props = body["properties"]
                if props.get("type") != "CustomRole" or not props.get("roleName") \
                        or not isinstance(props.get("permissions"), list):
                    raise ArmError(400, "InvalidRoleDefinition", "roleName, type CustomRole and "
                                   "permissions are required")
                res = {"id": path, "name": path.rsplit("/", 1)[1], "_group": "",
                       "type": "Microsoft.Authorization/roleDefinitions", "properties": props}
                status = 200 if key in fake._res else 201
                fake._res[key] = res
                return self._send(status, fake._render(res))
            if self.command == "GET" and res is not None:
                return self._send(200, fake._render(res))
            raise ArmError(404, "RoleDefinitionDoesNotExist", "The specified role definition "
                           "does not exist.")

    def _role_assignment(self, path: str, body: dict | None) -> None:
        """Microsoft.Authorization/roleAssignments at any scope (synchronous, like ARM)."""
        fake, key = self.fake, path.lower()
        with fake._lock:
            if self.command == "PUT":
                role = body["properties"]["roleDefinitionId"].rstrip("/").rsplit("/", 1)[-1].lower()
                if role not in ROLES and not any(
                        r["type"] == "Microsoft.Authorization/roleDefinitions" and r["name"].lower() == role
                        for r in fake._res.values()):
                    raise ArmError(400, "RoleDefinitionDoesNotExist", "The specified role definition "
                                   f"with ID '{role}' does not exist.")
                principal = body["properties"]["principalId"]
                known = {(r.get("identity") or {}).get("principalId") for r in fake._res.values()}
                if principal not in known:
                    raise ArmError(400, "PrincipalNotFound", f"Principal {principal} does not exist "
                                   "in the directory.")
                scope = path.split("/providers/Microsoft.Authorization/")[0]
                res = {"id": path, "name": path.rsplit("/", 1)[1], "_group": "",
                       "type": "Microsoft.Authorization/roleAssignments",
                       "properties": {**body["properties"], "scope": scope}}
                status = 200 if key in fake._res else 201
                fake._res[key] = res
                return self._send(status, fake._render(res))
            res = fake._res.get(key)
            if self.command == "GET":
                if res is None:
                    raise ArmError(404, "RoleAssignmentNotFound", "The role assignment does not exist.")
                return self._send(200, fake._render(res))
            if self.command == "DELETE":
                if res is None:
                    return self._send(204)
                del fake._res[key]
                return self._send(200, fake._render(res))
        raise ArmError(405, "MethodNotAllowed", self.command)

    def _group(self, group: str, body: dict | None) -> None:
        fake = self.fake
        if self.command == "PUT":
            status, out = fake.put_group(group, body or {})
            return self._send(status, out)
        if self.command in ("GET", "HEAD"):
            g = fake._groups.get(group.lower())
            if g is None:
                raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{group}' could not be found.")
            return self._send(204 if self.command == "HEAD" else 200, None if self.command == "HEAD" else g)
        if self.command == "DELETE":
            fake.delete_group(group)
            return self._send(202, None, {"Location": f"{fake.base_url}/_ops/{fake.new_op('location')}",
                                          "Retry-After": "0"})
        raise ArmError(405, "MethodNotAllowed", self.command)

    def _resource(self, rid: str, group: str, rtype: str, name: str, body: dict | None) -> None:
        fake = self.fake
        if self.command == "GET":
            return self._send(200, fake.get(rid))
        if self.command == "PUT":
            out, error = fake.put(rid, group, rtype, name, body or {})
            out["properties"]["provisioningState"] = "Creating"
            boot = None
            if rtype == "Microsoft.Compute/virtualMachines" and not error and fake._booter:
                boot = lambda: fake._boot(out["id"])  # noqa: E731 - once provisioned
            op = fake.new_op("async", error, boot)
            return self._send(201, out, {"Azure-AsyncOperation": f"{fake.base_url}/_ops/{op}",
                                         "Retry-After": "0"})
        if self.command == "DELETE":
            fake._group(group)
            existed = rid.lower() in fake._res
            fake.delete(rid)
            if not existed:
                return self._send(204)
            return self._send(202, None, {"Location": f"{fake.base_url}/_ops/{fake.new_op('location')}",
                                          "Retry-After": "0"})
        raise ArmError(405, "MethodNotAllowed", self.command)

    do_GET = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_POST = _route
