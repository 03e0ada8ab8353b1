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
This module holds the state and ARM's rules (`FakeArm`); the HTTP routes that read
and change it, and the TLS certificate, are in tests/fakes/arm_routes.py.

Booting (opt-in: `FakeArm(boot=BootConfig(image_bin, workdir, node_env))` or
`enable_boot(config)`; tests/fakes/azure_boot.py): when a VM's creation operation
succeeds, the VM gets its own IMDS stand-in (`imds(name)`) and its
`osProfile.customData` (base64-decoded) runs as a `BootedNode` (`node(name)`) with the
environment

    AZURE_POD_IDENTITY_AUTHORITY_HOST=http://127.0.0.1:<port>   (azure-identity's IMDS host)
    GEOTRAIN_METADATA_ENDPOINT=http://127.0.0.1:<port>  NO_PROXY=127.0.0.1,localhost
    + BootConfig.node_env

A VM with an `identity` (SystemAssigned and/or UserAssigned) gets IMDS tokens
(`token_for(principal id)` is the newest, `token_info(token)` whose one is while it is
valid, `tokens.lifetime_s` how long); without one IMDS refuses a token. A user-assigned
identity has the same principal and client id on every VM (`user_identity(id)`). `preempt(name)` schedules a
Preempt event for it; deleting the VM or its resource group stops its node (its whole
process tree) and its IMDS; `stop()` stops every one.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import itertools
import json
import secrets
import ssl
import tempfile
import threading
import uuid
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

from tests.fakes import netns
from tests.fakes.arm_routes import ArmError, ArmHandler, IdentityHandler, Recorded, handler, self_signed
from tests.fakes.azure_boot import AzureImds, BootConfig, Booter, NodeTokens, azure_env, vm_imds

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
class Failure:
    code: str
    via: str  # "sync" | "async"


class FakeArm:
    """The server's state and behaviour; the HTTP handlers (tests/fakes/arm_routes.py) only route."""

    def __init__(self, subscription: str = "00000000-0000-0000-0000-0000000000aa",
                 boot: BootConfig | None = None):
        self.subscription = subscription
        self.boot = boot
        self._booter: Booter | None = Booter(boot) if boot else None
        self.tokens = NodeTokens()  # what the VMs' IMDS stand-ins issued
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
        self.ca_path, key_path = self_signed(Path(self._tmp.name))
        arm = ThreadingHTTPServer(("127.0.0.1", 0), handler(self, ArmHandler))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.ca_path, key_path)
        arm.socket = ctx.wrap_socket(arm.socket, server_side=True)
        ident = ThreadingHTTPServer(("127.0.0.1", 0), handler(self, IdentityHandler))
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
        """The newest access token a VM's IMDS gave for the identity `principal_id`."""
        return self.tokens.newest(principal_id)

    def token_info(self, token: str) -> dict | None:
        """Whose IMDS token this is while it is valid (NodeTokens.info), else None."""
        return self.tokens.info(token)

    @staticmethod
    def user_identity(resource_id: str) -> tuple[str, str]:
        """(principal id, client id) of a user-assigned identity: fixed by its resource id."""
        key = resource_id.lower()
        return (str(uuid.uuid5(uuid.NAMESPACE_URL, key + "#principal")),
                str(uuid.uuid5(uuid.NAMESPACE_URL, key + "#client")))

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
            imds = vm_imds(vm, self.subscription, self.tokens)
            custom = props.get("osProfile", {}).get("customData")
            script = base64.b64decode(custom).decode() if custom else None
            self._booter.boot(rid.lower(), imds, script,
                              f"azure-{vm['name']}-{props['vmId'][:8]}-{secrets.token_hex(3)}",
                              f"{vm['name']}-{props['vmId'][:8]}", azure_env, nic=self._nic(vm, imds))

    def _nic(self, vm: dict, imds) -> netns.Nic | None:
        """The VM's interface on its virtual network's private side: its first NIC's
        private address; every address of the vnet is on the link (Azure routes a
        vnet's subnets to each other)."""
        refs = vm["properties"].get("networkProfile", {}).get("networkInterfaces", [])
        nic = self._res.get(refs[0]["id"].lower()) if refs else None
        configs = (nic or {}).get("properties", {}).get("ipConfigurations", [])
        if not configs:
            return None
        ip_props = configs[0]["properties"]
        subnet_id = ip_props["subnet"]["id"]
        vnet = self._res.get(subnet_id.rsplit("/subnets/", 1)[0].lower())
        subnet = self._res.get(subnet_id.lower())
        if vnet is None or subnet is None:
            return None
        imds.subnet_prefix = ipaddress.ip_network(subnet["properties"]["addressPrefix"]).prefixlen
        space = ipaddress.ip_network(vnet["properties"]["addressSpace"]["addressPrefixes"][0])
        return self._booter.nic(vnet["id"].lower(), ip_props.get("privateIPAddress"), space.prefixlen)

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
            for uid, info in (res["identity"].get("userAssignedIdentities") or {}).items():
                info["principalId"], info["clientId"] = self.user_identity(uid)
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


