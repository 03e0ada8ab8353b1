"""The Azure provider: a site is a set of (spot) VMs in one resource group per run.

Layout of a run `R` with a site `S` of N nodes, all in `geotrain-R`
(created in the first site's location, tagged `geotrain-run`):

    gt-S-nsg             NSG: inbound allowed only from S's own subnet prefix,
                         every other inbound explicitly denied (priority 4096,
                         above Azure's AllowVnetInBound / AzureLoadBalancer defaults)
    gt-S-vnet / site     a VNet per site with one subnet, the NSG attached to it.
                         Per site rather than per run: a VNet is regional and the
                         sites of a run are usually in different regions; a site's
                         network sharing nothing with another site's is also the
                         simplest isolation argument. With the recipe's
                         `azure.subnet` (an existing subnet) no VNet is made and
                         the NSG goes on each NIC instead, admitting that subnet's prefix
    gt-S-<i>-nic         a NIC per node, no public IP unless `azure.public_ip`
    gt-S-<i>             a VM per node: size = instance_type, Spot/Delete/max
                         price -1 (or option max_price) when spot, image =
                         `azure.image` (marketplace "publisher:offer:sku:version" or
                         an image resource id), custom data = the boot script, the
                         identity `azure.identity` names (none without it), OS disk
                         (`azure.disk_gb`) and NIC with deleteOption Delete
    gt-S-<i>-osdisk      its OS disk (named so that teardown finds it: ARM does not
                         copy VM tags onto an implicit OS disk)

Every resource that takes tags carries `geotrain-run`, `geotrain-site` and
(when launched with one) `geotrain-owner`, the operator's owner id;
`query` lists the group's VMs and keeps those tags. The nodes reach the run
store through their managed identity (`azure.identity`): a user-assigned one
that already holds access to the store, or `system`; with `system` and
`azure.store_scope` (the ARM id of the store's container) launch grants each
VM's identity "Storage Blob Data Contributor" on that container, under a condition
that keeps it to the run's own folder (plan.store_url) and allows no delete, and
terminate revokes it (the scope is kept in the VM tag geotrain-store-scope);
without it, grant access by hand (infra/azure/README.md). No storage key is
ever sent.

Settings come from the environment, all shown by `check()`:
    AZURE_SUBSCRIPTION_ID    the subscription (required)
    credentials              whatever DefaultAzureCredential finds (env, workload or
                             managed identity, az CLI, ...)
    GEOTRAIN_ARM_ENDPOINT    ARM base URL override (tests: a local TLS server)
    GEOTRAIN_ARM_CA_BUNDLE   PEM to verify that endpoint with (connection_verify)

The group, NSG, VNet and the store role assignment are made in providers/azure/network.py.
The recipe's typed options are `SitePlan.provider_options` (providers/azure/options.py
`AzureOptions`). Internal plan options: max_price, subnet_prefix (default
10.42.0.0/24, for the VNet geotrain makes), ssh_public_key (default: a key whose
private half is thrown away, so nobody can log in).

See providers/__init__.py for the contract.
"""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass

from geotrain import bootstrap
from geotrain.errors import CapacityError, ProviderError
from providers import Capabilities, CredentialCheck, Node, SitePlan
from providers.azure.network import (AUTHZ_API, BLOB_CONTRIBUTOR, DEFAULT_PREFIX,  # noqa: F401 - re-exported
                                     ensure_network, ensure_nsg, grant_store, group_name,
                                     revoke_store, site_options, site_tags, store_condition, store_prefix,
                                     store_role_id,
                                     subnet_prefix)

DEFAULT_ENDPOINT = "https://management.azure.com"
SCOPE = "https://management.azure.com/.default"
# Ubuntu 22.04 with NVIDIA drivers, CUDA and InfiniBand (Azure HPC image).
DEFAULT_IMAGE = "microsoft-dsvm:ubuntu-hpc:2204:latest"
CAPACITY_CODES = frozenset({"AllocationFailed", "ZonalAllocationFailed", "OverconstrainedAllocationRequest",
                            "OverconstrainedZonalAllocationRequest", "SkuNotAvailable",
                            "OperationNotAllowed", "QuotaExceeded"})
POLL_INTERVAL_S = 5.0  # between LRO polls; tests set 0
ADMIN = "geotrain"
CONSOLE_BYTES = 64 * 1024  # the tail of a serial console log that `console` returns


def capabilities() -> Capabilities:
    # Azure announces spot eviction >= 30 s ahead through Scheduled Events; boot
    # diagnostics (managed storage) keep each VM's serial console log.
    return Capabilities(spot=True, multi_node=True, preemption_notice=True, gpus=True, console=True)


@dataclass(frozen=True)
class _Settings:
    subscription: str | None
    endpoint: str
    ca_bundle: str | None

    @classmethod
    def from_env(cls) -> "_Settings":
        return cls(os.environ.get("AZURE_SUBSCRIPTION_ID") or None,
                   os.environ.get("GEOTRAIN_ARM_ENDPOINT") or DEFAULT_ENDPOINT,
                   os.environ.get("GEOTRAIN_ARM_CA_BUNDLE") or None)

    def describe(self) -> str:
        ca = f", CA bundle {self.ca_bundle} (GEOTRAIN_ARM_CA_BUNDLE)" if self.ca_bundle else ""
        src = " (GEOTRAIN_ARM_ENDPOINT)" if self.endpoint != DEFAULT_ENDPOINT else ""
        return f"subscription {self.subscription or '-'}, endpoint {self.endpoint}{src}{ca}"


class _Clients:
    """The three management clients, built lazily (the SDKs load only here)."""

    def __init__(self, settings: _Settings | None = None, credential=None):
        self.settings = s = settings or _Settings.from_env()
        if not s.subscription:  # said before the SDKs take seconds to load
            raise ProviderError("AZURE_SUBSCRIPTION_ID is not set: export the id of the "
                                "subscription geotrain may create VMs in")
        from azure.identity import DefaultAzureCredential
        from azure.mgmt.compute import ComputeManagementClient
        from azure.mgmt.network import NetworkManagementClient
        from azure.mgmt.resource.resources import ResourceManagementClient

        self.credential = credential or DefaultAzureCredential()
        kw = {"base_url": s.endpoint, "polling_interval": POLL_INTERVAL_S}
        if s.ca_bundle:
            kw["connection_verify"] = s.ca_bundle
        self.resource = ResourceManagementClient(self.credential, s.subscription, **kw)
        self.network = NetworkManagementClient(self.credential, s.subscription, **kw)
        self.compute = ComputeManagementClient(self.credential, s.subscription, **kw)


def check() -> CredentialCheck:
    settings = _Settings.from_env()
    if not settings.subscription:
        return CredentialCheck("azure", False, "AZURE_SUBSCRIPTION_ID is not set "
                               f"({settings.describe()})")
    try:
        clients = _Clients(settings)
        clients.credential.get_token(SCOPE)  # the token itself is never shown
        groups = sum(1 for _ in clients.resource.resource_groups.list())
    except Exception as e:  # check() never raises
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return CredentialCheck("azure", False, f"{type(e).__name__}: {first} ({settings.describe()})")
    return CredentialCheck("azure", True, f"{settings.describe()}; {groups} resource group(s) visible")


def _error_code(e: Exception) -> str | None:
    err = getattr(e, "error", None)
    return getattr(err, "code", None) or getattr(e, "error_code", None)


def _provider_error(what: str, e: Exception) -> ProviderError:
    code = _error_code(e)
    message = getattr(e, "message", None) or str(e)
    return ProviderError(f"azure: {what} failed: {code or type(e).__name__}: "
                         f"{str(message).splitlines()[0][:300]}")


def open_ports(plan: SitePlan) -> None:
    """Create or update the site's NSG: its own subnet prefix in, nothing else."""
    c = _Clients()
    ensure_nsg(c, plan, subnet_prefix(c, plan))


def _image(plan: SitePlan) -> dict:
    """The imageReference: a marketplace URN (the recipe checked its form) or an image id."""
    image = site_options(plan).image or DEFAULT_IMAGE
    if image.startswith("/"):
        return {"id": image}
    return dict(zip(("publisher", "offer", "sku", "version"), image.split(":")))


def _identity(plan: SitePlan) -> dict | None:
    identity = site_options(plan).identity
    if identity is None:
        return None
    if identity == "system":
        return {"type": "SystemAssigned"}
    return {"type": "UserAssigned", "userAssignedIdentities": {identity: {}}}


def _ssh_key(plan: SitePlan) -> str:
    given = plan.option("ssh_public_key")
    if given:
        return given
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()


def _vm_body(plan: SitePlan, index: int, zone: str | None, nic_id: str, boot: str, key: str) -> dict:
    name = f"gt-{plan.site}-{index}"
    props = {
        "hardwareProfile": {"vmSize": plan.instance_type},
        "storageProfile": {"imageReference": _image(plan), "osDisk": {
            "name": f"{name}-osdisk", "createOption": "FromImage", "deleteOption": "Delete",
            "diskSizeGB": site_options(plan).disk_gb,
            "managedDisk": {"storageAccountType": "Premium_LRS"}}},
        "osProfile": {"computerName": name, "adminUsername": ADMIN,
                      "customData": base64.b64encode(boot.encode()).decode(),
                      "linuxConfiguration": {"disablePasswordAuthentication": True, "ssh": {
                          "publicKeys": [{"path": f"/home/{ADMIN}/.ssh/authorized_keys", "keyData": key}]}}},
        "networkProfile": {"networkInterfaces": [
            {"id": nic_id, "properties": {"primary": True, "deleteOption": "Delete"}}]},
        # Boot diagnostics in managed storage (no storageUri): the serial console log that
        # `console` reads, where a node that cannot boot says why.
        "diagnosticsProfile": {"bootDiagnostics": {"enabled": True}},
    }
    if plan.spot:
        props.update(priority="Spot", evictionPolicy="Delete",
                     billingProfile={"maxPrice": float(plan.option("max_price", "-1"))})
    tags = site_tags(plan)
    if site_options(plan).store_scope:
        tags["geotrain-store-scope"] = site_options(plan).store_scope
    body = {"location": plan.region, "tags": tags, "properties": props}
    if _identity(plan):
        body["identity"] = _identity(plan)
    if zone:
        body["zones"] = [zone]
    return body


def _store_grant(c: _Clients, plan: SitePlan) -> tuple[str, str, str] | None:
    """(scope, run folder, role id) that launch grants each VM's identity on the store
    (option store_scope, only with identity 'system': the recipe checks), or None. Asked
    before anything is created: a bad URL, a member name a condition cannot hold, or a
    role that does not exist fails here."""
    opts = site_options(plan)
    if not opts.store_scope:
        return None
    prefix = store_prefix(plan.store_url)
    store_condition(prefix, plan.site)
    return opts.store_scope, prefix, store_role_id(c, opts.store_role)


def _create_nodes(c: _Clients, plan: SitePlan, zone: str | None, subnet_id: str,
                  nic_nsg: str | None, grant: tuple[str, str, str] | None) -> list[Node]:
    rg, ray_token, key = group_name(plan.run_id), secrets.token_hex(32), _ssh_key(plan)
    nics = []
    for i in range(plan.nodes):
        ipcfg = {"subnet": {"id": subnet_id}, "privateIPAllocationMethod": "Dynamic"}
        if site_options(plan).public_ip:
            pip = c.network.public_ip_addresses.begin_create_or_update(rg, f"gt-{plan.site}-{i}-ip", {
                "location": plan.region, "tags": site_tags(plan), "sku": {"name": "Standard"},
                **({"zones": [zone]} if zone else {}),
                "properties": {"publicIPAllocationMethod": "Static"}}).result()
            ipcfg["publicIPAddress"] = {"id": pip.id}
        nic = {"ipConfigurations": [{"name": "ipconfig1", "properties": ipcfg}]}
        if nic_nsg:
            nic["networkSecurityGroup"] = {"id": nic_nsg}
        nics.append(c.network.network_interfaces.begin_create_or_update(rg, f"gt-{plan.site}-{i}-nic", {
            "location": plan.region, "tags": site_tags(plan), "properties": nic}))
    nics = [p.result() for p in nics]
    pollers = [c.compute.virtual_machines.begin_create_or_update(
        rg, f"gt-{plan.site}-{i}",
        _vm_body(plan, i, zone, nics[i].id, bootstrap.render(plan, i, ray_token), key))
        for i in range(plan.nodes)]
    vms = [p.result() for p in pollers]  # raises on the first failed one
    if grant:
        scope, prefix, role = grant
        for vm in vms:
            grant_store(c, scope, vm, prefix, plan.site, role)
    ips = [n.ip_configurations[0].private_ip_address for n in nics]
    return [Node(plan.run_id, plan.site, "azure", vm.id, "running", private_ip=ip, region=plan.region)
            for vm, ip in zip(vms, ips)]


def launch(plan: SitePlan) -> list[Node]:
    from azure.core.exceptions import HttpResponseError

    if not plan.region or not plan.instance_type:
        raise ProviderError(f"azure: site {plan.site} needs a region (an Azure location such as "
                            f"eastus) and an instance_type (a VM size such as Standard_NC24ads_A100_v4)")
    c = _Clients()
    tried: list[str] = []
    try:
        grant = _store_grant(c, plan)
    except HttpResponseError as e:  # e.g. no right to read role definitions
        raise _provider_error(f"launching site {plan.site}", e) from None
    try:
        subnet_id, nic_nsg = ensure_network(c, plan)
        for zone in plan.zones or (None,):
            tried.append(f"azure:{plan.region}/{zone or '-'}")
            try:
                return _create_nodes(c, plan, zone, subnet_id, nic_nsg, grant)
            except HttpResponseError as e:
                if _error_code(e) not in CAPACITY_CODES:
                    raise
                _teardown_site(c, plan.run_id, plan.site, keep_network=True)
                last = e
        raise CapacityError(f"azure: no capacity for {plan.nodes} x {plan.instance_type} "
                            f"({'spot' if plan.spot else 'on-demand'}) for site {plan.site}: "
                            f"{_error_code(last)}", tried)
    except BaseException as e:
        try:
            _teardown_site(c, plan.run_id, plan.site)
        except Exception:
            pass  # the original error says more; `geotrain down` retries the teardown
        if isinstance(e, HttpResponseError):
            raise _provider_error(f"launching site {plan.site}", e) from None
        raise


def _state(vm) -> str:
    ps = (vm.provisioning_state or "").lower()
    return {"succeeded": "running", "creating": "pending", "updating": "pending"}.get(ps, "terminated")


def _nodes(c: _Clients, vms, run_id: str, site: str | None) -> list[Node]:
    out = []
    for vm in vms:
        tags = vm.tags or {}
        if tags.get("geotrain-run") != run_id or (site and tags.get("geotrain-site") != site):
            continue
        ip = None
        for ref in vm.network_profile.network_interfaces if vm.network_profile else []:
            rg, name = ref.id.split("/")[4], ref.id.split("/")[-1]
            try:
                ip = c.network.network_interfaces.get(rg, name).ip_configurations[0].private_ip_address
            except Exception:
                pass
        out.append(Node(run_id, tags["geotrain-site"], "azure", vm.id, _state(vm),
                        private_ip=ip, region=vm.location, owner=tags.get("geotrain-owner")))
    return out


def query(run_id: str, site: str | None = None, regions: list[str] | None = None) -> list[Node]:
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    c = _Clients()
    try:
        return _nodes(c, list(c.compute.virtual_machines.list(group_name(run_id))), run_id, site)
    except ResourceNotFoundError:
        return []
    except HttpResponseError as e:
        raise _provider_error(f"listing the VMs of run {run_id}", e) from None


def query_all() -> list[Node]:
    """Every VM in the subscription tagged with a geotrain run, of any run."""
    c = _Clients()
    vms = [vm for vm in c.compute.virtual_machines.list_all() if (vm.tags or {}).get("geotrain-run")]
    return [n for run in sorted({vm.tags["geotrain-run"] for vm in vms})
            for n in _nodes(c, vms, run, None)]


def _teardown_site(c: _Clients, run_id: str, site: str, keep_network: bool = False,
                   vm_ids: list[str] | None = None) -> bool:
    """Delete the site's VMs (all, or `vm_ids`), then, once the site has none left,
    its NICs, disks, public IPs, VNet and NSG; then the group if it is empty.
    Returns whether the site is gone."""
    from azure.core.exceptions import ResourceNotFoundError

    rg = group_name(run_id)
    mine = lambda r: (r.tags or {}).get("geotrain-site") == site  # noqa: E731
    try:
        vms = [vm for vm in c.compute.virtual_machines.list(rg) if mine(vm)]
    except ResourceNotFoundError:
        return True
    try:
        return _teardown_listed(c, rg, site, vms, keep_network, vm_ids)
    except ResourceNotFoundError:
        # Another teardown of the same run (the controller's, while `down` runs its
        # own) deleted the group meanwhile: then everything in it is gone too.
        if c.resource.resource_groups.check_existence(rg):
            raise
        return True


def _teardown_listed(c: _Clients, rg: str, site: str, vms: list, keep_network: bool,
                     vm_ids: list[str] | None) -> bool:
    mine = lambda r: (r.tags or {}).get("geotrain-site") == site  # noqa: E731
    wanted = {i.lower() for i in vm_ids} if vm_ids is not None else None
    doomed = [vm for vm in vms if wanted is None or vm.id.lower() in wanted]
    for vm in doomed:
        revoke_store(c, vm)
    for poller in [c.compute.virtual_machines.begin_delete(rg, vm.name) for vm in doomed]:
        poller.result()
    if len(doomed) < len(vms):
        return False
    ops = c.network
    for nic in [n for n in ops.network_interfaces.list(rg) if mine(n)]:
        ops.network_interfaces.begin_delete(rg, nic.name).result()
    for disk in c.compute.disks.list_by_resource_group(rg):
        if disk.name.startswith(f"gt-{site}-") and disk.name.endswith("-osdisk"):
            c.compute.disks.begin_delete(rg, disk.name).result()
    for pip in [p for p in ops.public_ip_addresses.list(rg) if mine(p)]:
        ops.public_ip_addresses.begin_delete(rg, pip.name).result()
    if keep_network:
        return True
    # The VNet goes before the NSG: an NSG attached to a subnet cannot be deleted.
    ops.virtual_networks.begin_delete(rg, f"gt-{site}-vnet").result()
    ops.network_security_groups.begin_delete(rg, f"gt-{site}-nsg").result()
    if not any(True for _ in c.resource.resources.list_by_resource_group(rg)):
        c.resource.resource_groups.begin_delete(rg).result()
    return True


def console(node: Node) -> str:
    """The tail of the VM's serial console log (boot diagnostics: retrieveBootDiagnosticsData
    gives a SAS URL of the log, valid 5 minutes, read here): where a node that cannot reach
    the run store says why (geotrain/site/node_info.py)."""
    import requests

    c = _Clients()
    parts = node.instance_id.split("/")
    lower = [x.lower() for x in parts]
    group, name = parts[lower.index("resourcegroups") + 1], parts[-1]
    data = c.compute.virtual_machines.retrieve_boot_diagnostics_data(
        group, name, sas_uri_expiration_time_in_minutes=5)
    if not data.serial_console_log_blob_uri:
        return ""
    resp = requests.get(data.serial_console_log_blob_uri, timeout=30,
                        verify=c.settings.ca_bundle or True)
    if resp.status_code != 200:
        raise ProviderError(f"azure: the serial console log of {name} answered {resp.status_code}")
    return resp.content[-CONSOLE_BYTES:].decode("utf-8", "replace")


def terminate(nodes: list[Node]) -> list[Node]:
    from azure.core.exceptions import HttpResponseError

    if not nodes:
        return []
    c = _Clients()
    by_site: dict[tuple[str, str], list[str]] = {}
    for n in nodes:
        by_site.setdefault((n.run_id, n.site), []).append(n.instance_id)
    for (run_id, site), ids in by_site.items():
        try:
            _teardown_site(c, run_id, site, vm_ids=ids)
        except HttpResponseError as e:
            raise _provider_error(f"terminating site {site} of run {run_id}", e) from None
    return [Node(n.run_id, n.site, n.provider, n.instance_id, "terminated", private_ip=n.private_ip,
                 region=n.region) for n in nodes]
