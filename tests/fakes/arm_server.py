"""A local Azure Resource Manager (ARM) REST server over TLS, for tests.

No usable ARM emulator exists, so this speaks the documented ARM JSON to the
real `azure-mgmt-resource`, `azure-mgmt-network` and `azure-mgmt-compute`
clients on 127.0.0.1:

    resourceGroups            PUT / GET / HEAD / DELETE / list, `.../resources` list
    roleAssignments           PUT / GET / DELETE at any scope (the principal must be a
                              VM's system-assigned identity held here)
    Microsoft.Network         virtualNetworks (+ subnets), networkSecurityGroups,
                              networkInterfaces, publicIPAddresses
    Microsoft.Compute         virtualMachines, disks
    each type                 PUT / GET / DELETE, list in a group, list in the subscription

Long-running operations behave like ARM: a PUT answers 201 with an
`Azure-AsyncOperation` header whose status goes InProgress -> Succeeded (or
Failed with an `error`); a DELETE answers 202 with a `Location` header that
answers 202 once, then 204. The api-version query parameter is recorded and
any value is accepted. ARM's dependency rules that teardown order depends on
are enforced (a NIC in use by a VM, a subnet in use by a NIC, an NSG in use by
a subnet, an attached disk or a public IP in use cannot be deleted), and a VM's
`deleteOption: Delete` on its OS disk and NICs deletes them with the VM.

Bearer tokens are refused over plain HTTP by azure-core, so the server speaks
TLS with a self-signed certificate made at `start()` (`ca_path` is the PEM the
client trusts). Every ARM request must carry the token that the server's
second half hands out: a plain-HTTP App Service managed-identity endpoint
(`IDENTITY_ENDPOINT` + `IDENTITY_HEADER`), the protocol azure-identity's
`ManagedIdentityCredential` (and so `DefaultAzureCredential`) speaks.

Faults: `fail_zone(zone, code, via="sync" | "async")` makes VM creation in a
zone ("" = no zone) fail with the real error body `{"error": {"code",
"message"}}`, either as the HTTP answer to the PUT (409) or as a Failed async
operation that leaves the VM in provisioningState Failed, like ARM.

Every request is recorded (`requests`) with its JSON body. `resources()` lists
every resource of every kind the server holds.

Booting (opt-in: `FakeArm(boot=BootConfig(image_bin, workdir, node_env))` or
`enable_boot(config)`; tests/fakes/azure_boot.py): when a VM's creation operation
succeeds, the VM gets its own IMDS stand-in (`imds(name)`) and its
`osProfile.customData` (base64-decoded) runs as a `BootedNode` (`node(name)`) with the
environment

    AZURE_POD_IDENTITY_AUTHORITY_HOST=http://127.0.0.1:<port>   (azure-identity's IMDS host)
    GEOTRAIN_METADATA_ENDPOINT=http://127.0.0.1:<port>  NO_PROXY=127.0.0.1,localhost
    + BootConfig.node_env

A VM with an `identity` (SystemAssigned and/or UserAssigned) gets IMDS tokens
`token_for(principal id)`; without one IMDS refuses a token. `preempt(name)` schedules a
Preempt event for it; deleting the VM or its resource group stops its node (its whole
process tree) and its IMDS; `stop()` stops every one.
"""

from __future__ import annotations

import base64
import copy
import datetime
import ipaddress
import itertools
import json
import secrets
import ssl
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tests.fakes.azure_boot import AzureImds, BootConfig, Booter, azure_env

TYPES = {t.lower(): t for t in (
    "Microsoft.Network/virtualNetworks", "Microsoft.Network/virtualNetworks/subnets",
    "Microsoft.Network/networkSecurityGroups", "Microsoft.Network/networkInterfaces",
    "Microsoft.Network/publicIPAddresses", "Microsoft.Compute/virtualMachines",
    "Microsoft.Compute/disks")}
CAPACITY_MESSAGES = {
    "ZonalAllocationFailed": "Allocation failed. We do not have sufficient capacity for the "
    "requested VM size in this zone. Read more about improving likelihood of allocation success "
    "at http://aka.ms/allocation-guidance",
    "AllocationFailed": "Allocation failed. We do not have sufficient capacity for the requested "
    "VM size in this region.",
    "SkuNotAvailable": "The requested VM size for resource 'Following SKUs have failed for "
    "Capacity Restrictions: {size}' is currently not available in location '{location}'. "
    "Please try another size or deploy to a different location or different zone.",
    "OperationNotAllowed": "Operation could not be completed as it results in exceeding approved "
    "standardNCADSA100v4Family Cores quota.",
}


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    body: dict | None


@dataclass
class Failure:
    code: str
    via: str  # "sync" | "async"


def _self_signed(directory: Path) -> tuple[Path, Path]:
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


class ArmError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(status, code, message)
        self.status, self.code, self.message = status, code, message


class FakeArm:
    """The server's state and behaviour; the HTTP handlers below only route."""

    def __init__(self, subscription: str = "00000000-0000-0000-0000-0000000000aa",
                 boot: BootConfig | None = None):
        self.subscription = subscription
        self.boot = boot
        self._booter: Booter | None = Booter(boot) if boot else None
        self.node_tokens: dict[str, str] = {}  # identity principal id -> its IMDS token
        self.console_sas: dict[str, str] = {}  # a boot-diagnostics SAS token -> its VM's id
        self.token = "fake-arm-" + secrets.token_hex(8)
        self.identity_header = secrets.token_hex(8)
        self.requests: list[Recorded] = []
        self.token_requests = 0
        self.failures: dict[str, Failure] = {}
        self.rg_deleted_with: dict[str, list[str]] = {}  # group -> resource ids it still held
        self._groups: dict[str, dict] = {}  # lowercase name -> group
        self._res: dict[str, dict] = {}  # lowercase id -> resource
        self._ops: dict[str, dict] = {}
        self._ip_seq = itertools.count(4)
        self._lock = threading.RLock()
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-arm-")
        self._servers: list[ThreadingHTTPServer] = []

    # --- lifecycle ---------------------------------------------------------
    def start(self) -> "FakeArm":
        self.ca_path, key_path = _self_signed(Path(self._tmp.name))
        arm = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, _ArmHandler))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.ca_path, key_path)
        arm.socket = ctx.wrap_socket(arm.socket, server_side=True)
        ident = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, _IdentityHandler))
        self._servers = [arm, ident]
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self.base_url = f"https://127.0.0.1:{arm.server_address[1]}"
        self.identity_endpoint = f"http://127.0.0.1:{ident.server_address[1]}/msi/token"
        return self

    def stop(self) -> None:
        if self._booter is not None:
            self._booter.stop()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []
        self._tmp.cleanup()

    # --- booting -----------------------------------------------------------
    def enable_boot(self, config: BootConfig) -> None:
        """Boot VMs created from now on."""
        self.boot = config
        self._booter = Booter(config)

    def token_for(self, principal_id: str) -> str:
        """The access token IMDS gives a VM for the identity `principal_id`."""
        with self._lock:
            return self.node_tokens.setdefault(principal_id, "eyJ0eXAiOiJKV1QifQ.node-"
                                               + secrets.token_urlsafe(24))

    def _vm_key(self, name: str, group: str | None) -> str:
        found = [k for k in (self._booter.metadata if self._booter else {})
                 if k.rsplit("/", 1)[-1] == name.lower()
                 and (group is None or f"/resourcegroups/{group.lower()}/" in k)]
        if len(found) != 1:
            raise KeyError(f"no booted VM {name!r}" + (f" in {group}" if group else "")
                           + (" (several groups: name one)" if found else ""))
        return found[0]

    def imds(self, name: str, group: str | None = None) -> AzureImds:
        """The IMDS stand-in of a booted VM."""
        with self._lock:
            key = self._vm_key(name, group)
            return self._booter.metadata[key]

    def node(self, name: str, group: str | None = None):
        """The BootedNode of a booted VM (None if it had no custom data)."""
        with self._lock:
            key = self._vm_key(name, group)
            return self._booter.nodes.get(key)

    def preempt(self, name: str, group: str | None = None) -> str:
        """Schedule a Preempt event for a booted VM (its Scheduled Events list it); the
        EventId."""
        return self.imds(name, group).preempt()

    def _boot(self, rid: str) -> None:
        """Called (under the lock) when a VM's creation has succeeded."""
        with self._lock:
            vm = self._res.get(rid.lower())
            if vm is None or self._booter is None or rid.lower() in self._booter.metadata:
                return
            props = vm["properties"]
            identity = vm.get("identity") or {}
            kind = identity.get("type") or ""
            identities, client_ids, defaults = {}, {}, []
            if "SystemAssigned" in kind and identity.get("principalId"):
                token = self.node_tokens.setdefault(
                    identity["principalId"], "eyJ0eXAiOiJKV1QifQ.node-" + secrets.token_urlsafe(24))
                client_ids[token] = vm["_client_id"]
                identities.update({identity["principalId"].lower(): token,
                                   vm["_client_id"].lower(): token})
                defaults.append(token)
            if "UserAssigned" in kind:
                for uid, info in (identity.get("userAssignedIdentities") or {}).items():
                    token = self.node_tokens.setdefault(
                        info["principalId"], "eyJ0eXAiOiJKV1QifQ.node-" + secrets.token_urlsafe(24))
                    client_ids[token] = info["clientId"]
                    identities.update({uid.lower(): token, info["principalId"].lower(): token,
                                       info["clientId"].lower(): token})
                    if "SystemAssigned" not in kind:
                        defaults.append(token)
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
                "subscriptionId": self.subscription, "resourceId": vm["id"],
                "vmSize": props.get("hardwareProfile", {}).get("vmSize", ""),
                "priority": props.get("priority", ""), "evictionPolicy": props.get("evictionPolicy", ""),
                "osType": "Linux", "provider": "Microsoft.Compute", "azEnvironment": "AzurePublicCloud",
                "osProfile": {k: props.get("osProfile", {}).get(k, "")
                              for k in ("computerName", "adminUsername")},
                "tags": ";".join(f"{k}:{v}" for k, v in tags.items()),
                "tagsList": [{"name": k, "value": v} for k, v in tags.items()]}
            imds = AzureImds(compute=compute, identities=identities, default_identity=default,
                             client_ids=client_ids)
            custom = props.get("osProfile", {}).get("customData")
            script = base64.b64decode(custom).decode() if custom else None
            self._booter.boot(rid.lower(), imds, script,
                              f"azure-{vm['name']}-{props['vmId'][:8]}-{secrets.token_hex(3)}",
                              f"{vm['name']}-{props['vmId'][:8]}", azure_env)

    def _halt(self, rid: str) -> None:
        if self._booter is not None:
            self._booter.halt(rid.lower())

    # --- test controls -----------------------------------------------------
    def fail_zone(self, zone: str, code: str, via: str = "sync") -> None:
        self.failures[zone] = Failure(code, via)

    def resources(self, kind: str | None = None) -> list[dict]:
        """Every resource held (groups included, as type 'resourceGroups')."""
        with self._lock:
            out = [dict(g, type="resourceGroups") for g in self._groups.values()]
            out += [copy.deepcopy(r) for r in self._res.values()]
        return [r for r in out if kind is None or r["type"].lower() == kind.lower()]

    def bodies(self, method: str, kind: str) -> list[dict]:
        """JSON bodies of the recorded `method` requests on resources of `kind`."""
        seg = "/" + kind.split("/")[-1].lower() + "/"
        return [r.body for r in self.requests
                if r.method == method and seg in r.path.lower() + "/" and r.body is not None]

    # --- ARM semantics -----------------------------------------------------
    def _group(self, name: str) -> dict:
        group = self._groups.get(name.lower())
        if group is None:
            raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{name}' could not be found.")
        return group

    def put_group(self, name: str, body: dict) -> tuple[int, dict]:
        with self._lock:
            old = self._groups.get(name.lower())
            if old and old["location"].lower() != body.get("location", "").lower():
                raise ArmError(409, "InvalidResourceGroupLocation",
                               f"Invalid resource group location '{body.get('location')}'. The "
                               f"Resource group already exists in location '{old['location']}'.")
            group = {"id": f"/subscriptions/{self.subscription}/resourceGroups/{name}", "name": name,
                     "location": body["location"], "tags": body.get("tags") or {},
                     "properties": {"provisioningState": "Succeeded"}}
            self._groups[name.lower()] = group
            return (200 if old else 201), group

    def delete_group(self, name: str) -> None:
        with self._lock:
            if name.lower() not in self._groups:
                raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{name}' could not be found.")
            prefix = f"/subscriptions/{self.subscription}/resourcegroups/{name.lower()}/"
            held = [r["id"] for k, r in self._res.items() if k.startswith(prefix)]
            self.rg_deleted_with[name] = held
            for k, r in self._res.items():
                if k.startswith(prefix) and r["type"] == "Microsoft.Compute/virtualMachines":
                    self._halt(r["id"])
            for k in [k for k in self._res if k.startswith(prefix)]:
                del self._res[k]
            del self._groups[name.lower()]

    def list_group(self, name: str) -> list[dict]:
        with self._lock:
            self._group(name)
            prefix = f"/subscriptions/{self.subscription}/resourcegroups/{name.lower()}/"
            return [{k: r.get(k) for k in ("id", "name", "type", "location", "tags")}
                    for key, r in self._res.items()
                    if key.startswith(prefix) and "/subnets/" not in key]

    def list_type(self, rtype: str, group: str | None) -> list[dict]:
        with self._lock:
            if group is not None:
                self._group(group)
            return [self._render(r) for r in self._res.values()
                    if r["type"].lower() == rtype.lower()
                    and (group is None or r["_group"].lower() == group.lower())]

    def get(self, rid: str) -> dict:
        with self._lock:
            res = self._res.get(rid.lower())
            if res is None:
                raise ArmError(404, "ResourceNotFound", f"The Resource '{rid}' was not found.")
            return self._render(res)

    def _render(self, res: dict) -> dict:
        out = {k: copy.deepcopy(v) for k, v in res.items() if not k.startswith("_")}
        if res["type"] == "Microsoft.Network/virtualNetworks":
            out["properties"]["subnets"] = [self._render(s) for k, s in self._res.items()
                                            if k.startswith(res["id"].lower() + "/subnets/")]
        return out

    def put(self, rid: str, group: str, rtype: str, name: str, body: dict) -> tuple[dict, dict | None]:
        """Create or replace; returns (resource, async error or None)."""
        with self._lock:
            self._group(group)
            props = copy.deepcopy(body.get("properties") or {})
            res = {"id": rid, "name": name, "type": rtype, "_group": group,
                   "properties": props}
            if rtype.endswith("/subnets"):
                parent = rid.rsplit("/subnets/", 1)[0]
                if parent.lower() not in self._res:
                    raise ArmError(404, "ResourceNotFound", f"The Resource '{parent}' was not found.")
            else:
                if not body.get("location"):
                    raise ArmError(400, "LocationRequired", "The location property is required.")
                res.update(location=body["location"], tags=body.get("tags") or {})
            for key in ("zones", "identity"):
                if key in body:
                    res[key] = copy.deepcopy(body[key])
            error = getattr(self, "_put_" + rtype.split("/")[-1].lower(), lambda r: None)(res)
            props["provisioningState"] = "Failed" if error else "Succeeded"
            self._res[rid.lower()] = res
            if rtype == "Microsoft.Network/virtualNetworks":
                for sub in props.pop("subnets", None) or []:
                    sid = f"{rid}/subnets/{sub['name']}"
                    self.put(sid, group, "Microsoft.Network/virtualNetworks/subnets", sub["name"], sub)
            return self._render(res), error

    def _ref(self, ref: dict | None, kind: str) -> dict | None:
        if not ref:
            return None
        target = self._res.get(ref["id"].lower())
        if target is None:
            raise ArmError(400, "InvalidResourceReference",
                           f"Resource {ref['id']} referenced by the request was not found.")
        return target

    def _put_subnets(self, res: dict) -> None:
        self._ref(res["properties"].get("networkSecurityGroup"), "nsg")
        ipaddress.ip_network(res["properties"]["addressPrefix"])

    def _put_networksecuritygroups(self, res: dict) -> None:
        rules = res["properties"].setdefault("securityRules", [])
        for rule in rules:
            rule["id"] = f"{res['id']}/securityRules/{rule['name']}"
            rule["properties"]["provisioningState"] = "Succeeded"
        res["properties"]["defaultSecurityRules"] = [
            {"name": n, "properties": {"priority": p, "direction": d, "access": a,
                                       "sourceAddressPrefix": s, "destinationAddressPrefix": "*",
                                       "protocol": "*", "sourcePortRange": "*",
                                       "destinationPortRange": "*"}}
            for n, p, d, a, s in (("AllowVnetInBound", 65000, "Inbound", "Allow", "VirtualNetwork"),
                                  ("AllowAzureLoadBalancerInBound", 65001, "Inbound", "Allow",
                                   "AzureLoadBalancer"),
                                  ("DenyAllInBound", 65500, "Inbound", "Deny", "*"))]

    def _put_networkinterfaces(self, res: dict) -> None:
        for cfg in res["properties"].get("ipConfigurations", []):
            p = cfg.setdefault("properties", {})
            subnet = self._ref(p.get("subnet"), "subnet")
            if subnet is None:
                raise ArmError(400, "InvalidRequestFormat", "ipConfiguration needs a subnet.")
            self._ref(p.get("publicIPAddress"), "public ip")
            net = ipaddress.ip_network(subnet["properties"]["addressPrefix"])
            p["privateIPAddress"] = str(net.network_address + next(self._ip_seq))
            p["privateIPAllocationMethod"] = "Dynamic"

    def _put_virtualmachines(self, res: dict) -> dict | None:
        props = res["properties"]
        size = props.get("hardwareProfile", {}).get("vmSize")
        if not size:
            raise ArmError(400, "InvalidParameter", "Required parameter 'hardwareProfile.vmSize' is missing.")
        zone = (res.get("zones") or [""])[0]
        old = self._res.get(res["id"].lower())
        if old is not None and (old.get("zones") or [""])[0] != zone:
            raise ArmError(409, "PropertyChangeNotAllowed",
                           "Changing property 'zones' is not allowed.")
        failure = self.failures.get(zone)
        error = None
        if failure:
            error = {"code": failure.code, "message": CAPACITY_MESSAGES.get(failure.code, failure.code)
                     .format(size=size, location=res["location"])}
            if failure.via == "sync":
                raise ArmError(409, error["code"], error["message"])
        for ref in props.get("networkProfile", {}).get("networkInterfaces", []):
            nic = self._ref(ref, "nic")
            owner = nic["properties"].get("virtualMachine")
            if owner and owner["id"].lower() != res["id"].lower():
                raise ArmError(400, "NicInUse", f"Network interface {nic['id']} is used by {owner['id']}.")
            nic["properties"]["virtualMachine"] = {"id": res["id"]}
        if "identity" in res and "SystemAssigned" in res["identity"].get("type", ""):
            res["identity"].update(principalId=str(uuid.uuid4()), tenantId=str(uuid.uuid4()))
            res["_client_id"] = str(uuid.uuid4())  # not in the VM's JSON; IMDS tells it
        if "identity" in res and "UserAssigned" in res["identity"].get("type", ""):
            for info in (res["identity"].get("userAssignedIdentities") or {}).values():
                info.setdefault("principalId", str(uuid.uuid4()))
                info.setdefault("clientId", str(uuid.uuid4()))
        os_disk = props.setdefault("storageProfile", {}).setdefault("osDisk", {})
        disk_name = os_disk.get("name") or f"{res['name']}_OsDisk_1_{secrets.token_hex(16)}"
        disk_id = f"{res['id'].rsplit('/providers/', 1)[0]}/providers/Microsoft.Compute/disks/{disk_name}"
        os_disk.update(name=disk_name, managedDisk={**os_disk.get("managedDisk", {}), "id": disk_id})
        # ARM does not copy the VM's tags onto an implicitly created OS disk.
        self._res[disk_id.lower()] = {
            "id": disk_id, "name": disk_name, "type": "Microsoft.Compute/disks",
            "_group": res["_group"], "location": res["location"], "tags": {},
            "zones": res.get("zones"), "managedBy": res["id"],
            "properties": {"diskState": "Attached", "provisioningState": "Succeeded"}}
        props["vmId"] = str(uuid.uuid4())
        return error

    def delete(self, rid: str) -> None:
        with self._lock:
            res = self._res.get(rid.lower())
            if res is None:
                return
            kind = res["type"]
            users = [r for r in self._res.values() if _refers_to(r, res["id"])]
            if kind == "Microsoft.Network/networkInterfaces" and res["properties"].get("virtualMachine"):
                raise ArmError(400, "NicInUse", f"Network Interface {rid} is used by existing resource "
                               f"{res['properties']['virtualMachine']['id']}.")
            if kind == "Microsoft.Compute/disks" and res.get("managedBy"):
                raise ArmError(409, "OperationNotAllowed", f"Disk {res['name']} is attached to VM "
                               f"{res['managedBy']}.")
            if kind == "Microsoft.Network/virtualNetworks":
                users = [r for r in self._res.values()
                         if any(_refers_to(r, s["id"]) for s in self._render(res)["properties"]["subnets"])]
                if users:
                    raise ArmError(400, "InUseSubnetCannotBeDeleted",
                                   f"Subnet of {rid} is in use by {users[0]['id']}.")
            elif users and kind != "Microsoft.Compute/virtualMachines":
                code = {"Microsoft.Network/networkSecurityGroups": "InUseNetworkSecurityGroupCannotBeDeleted",
                        "Microsoft.Network/publicIPAddresses": "PublicIPAddressCannotBeDeleted"}.get(kind, "InUse")
                raise ArmError(400, code, f"{rid} is in use by {users[0]['id']}.")
            for key in [k for k in self._res if k == rid.lower() or k.startswith(rid.lower() + "/")]:
                del self._res[key]
            if kind == "Microsoft.Compute/virtualMachines":
                self._release_vm(res)
                self._halt(res["id"])

    def _release_vm(self, vm: dict) -> None:
        props = vm["properties"]
        os_disk = props.get("storageProfile", {}).get("osDisk", {})
        disk = self._res.get(os_disk.get("managedDisk", {}).get("id", "").lower())
        if disk is not None:
            if os_disk.get("deleteOption") == "Delete":
                del self._res[disk["id"].lower()]
            else:
                disk["managedBy"], disk["properties"]["diskState"] = None, "Unattached"
        for ref in props.get("networkProfile", {}).get("networkInterfaces", []):
            nic = self._res.get(ref["id"].lower())
            if nic is None:
                continue
            nic["properties"].pop("virtualMachine", None)
            if (ref.get("properties") or {}).get("deleteOption") == "Delete":
                del self._res[nic["id"].lower()]

    def new_op(self, kind: str, error: dict | None = None, on_done=None) -> str:
        op = secrets.token_hex(8)
        self._ops[op] = {"kind": kind, "polls": 0, "error": error, "on_done": on_done}
        return op

    def poll(self, op: str) -> tuple[int, dict | None]:
        with self._lock:
            state = self._ops[op]
            state["polls"] += 1
            if state["polls"] == 1:
                return (202, None) if state["kind"] == "location" else (200, {"status": "InProgress"})
            if state["kind"] == "location":
                return 204, None
            if state["error"]:
                return 200, {"status": "Failed", "error": state["error"]}
            on_done, state["on_done"] = state["on_done"], None
            if on_done is not None:
                on_done()
            return 200, {"status": "Succeeded"}


def _refers_to(res: dict, rid: str) -> bool:
    """Whether `res` holds a reference to `rid` (anywhere in its properties)."""
    text = json.dumps(res.get("properties", {})).lower()
    return f'"{rid.lower()}"' in text and res["id"].lower() != rid.lower()


def _handler(fake: FakeArm, base: type) -> type:
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


class _IdentityHandler(_Base):
    """The App Service managed-identity token endpoint (api-version 2019-08-01)."""

    def do_GET(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        if self.headers.get("X-IDENTITY-HEADER") != self.fake.identity_header:
            return self._send(401, {"statusCode": 401, "message": "X-IDENTITY-HEADER missing or wrong"})
        self.fake.token_requests += 1
        self._send(200, {"access_token": self.fake.token, "expires_on": str(int(time.time()) + 3600),
                         "resource": query.get("resource", [""])[0], "token_type": "Bearer",
                         "client_id": "00000000-0000-0000-0000-00000000c11d"})


class _ArmHandler(_Base):
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

    def _role_assignment(self, path: str, body: dict | None) -> None:
        """Microsoft.Authorization/roleAssignments at any scope (synchronous, like ARM)."""
        fake, key = self.fake, path.lower()
        with fake._lock:
            if self.command == "PUT":
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
