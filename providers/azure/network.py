"""What an Azure site's nodes may reach: its resource group, NSG, VNet and subnet, and
the role assignment that lets a VM's managed identity read and write its run's part of
the run store (and nothing else there: `store_condition`).

The layout these build (names, tags, rules) is described in providers/azure/__init__.py,
which calls them while launching and tearing down a site; the SDK's management clients
come in as `c` (its `_Clients`), so importing this module loads no Azure SDK.
"""

from __future__ import annotations

import re
import urllib.parse
import uuid
from typing import TYPE_CHECKING

from geotrain.errors import ProviderError
from providers import SitePlan
from providers.azure.options import NODE_STORE_ROLE, AzureOptions

if TYPE_CHECKING:
    from providers.azure import _Clients

DEFAULT_PREFIX = "10.42.0.0/24"
# Built-in "Storage Blob Data Contributor" (azure.store_role may name it instead of the
# custom role 'geotrain node store'); whichever role is granted to each node's identity on
# the option store_scope (the ARM id of the run store's container) gets a condition
# (`store_condition`) that keeps it to the run's own blobs and takes delete away.
BLOB_CONTRIBUTOR = "ba92f5b4-2d11-453d-a403-e96b0029c9fe"
BLOBS = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs"
AUTHZ_API = "2022-04-01"
GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def group_name(run_id: str) -> str:
    """The resource group that holds every resource of run `run_id`."""
    return f"geotrain-{run_id}"


def site_tags(plan: SitePlan) -> dict[str, str]:
    """The tags on every resource of the plan's site."""
    tags = {"geotrain-run": plan.run_id, "geotrain-site": plan.site}
    if plan.owner:  # the launching GEOTRAIN_HOME's owner id (down --orphans)
        tags["geotrain-owner"] = plan.owner
    return tags


def site_options(plan: SitePlan) -> AzureOptions:
    """The recipe's `azure:` block for the site, or its defaults."""
    return plan.provider_options or AzureOptions()


def subnet_prefix(c: _Clients, plan: SitePlan) -> str:
    """The address prefix of the site's subnet: the recipe's existing one, or ours."""
    subnet = site_options(plan).subnet
    if not subnet:
        return plan.option("subnet_prefix", DEFAULT_PREFIX)
    parts = subnet.split("/")  # /subscriptions/S/resourceGroups/RG/providers/.../VNET/subnets/N
    found = c.network.subnets.get(parts[4], parts[8], parts[10])
    return found.address_prefix or found.address_prefixes[0]


def ensure_nsg(c: _Clients, plan: SitePlan, prefix: str) -> str:
    """Create or update the site's NSG (`prefix` in, every other inbound denied); its id."""
    rule = {"protocol": "*", "sourcePortRange": "*", "destinationPortRange": "*",
            "destinationAddressPrefix": prefix, "direction": "Inbound"}
    body = {"location": plan.region, "tags": site_tags(plan), "properties": {"securityRules": [
        {"name": "geotrain-intra-site", "properties": {
            **rule, "sourceAddressPrefix": prefix, "access": "Allow", "priority": 100,
            "description": "the site's own nodes (Ray, its agents, gloo) and nothing else"}},
        {"name": "geotrain-deny-inbound", "properties": {
            **rule, "destinationAddressPrefix": "*", "sourceAddressPrefix": "*",
            "access": "Deny", "priority": 4096,
            "description": "everything else, before Azure's AllowVnetInBound/AzureLoadBalancer"}},
    ]}}
    return c.network.network_security_groups.begin_create_or_update(
        group_name(plan.run_id), f"gt-{plan.site}-nsg", body).result().id


def ensure_network(c: _Clients, plan: SitePlan) -> tuple[str, str | None]:
    """Resource group, NSG, VNet + subnet of the site: (subnet id, the NSG id for the
    NICs when the subnet is the recipe's own, else None)."""
    rg = group_name(plan.run_id)
    from azure.core.exceptions import ResourceNotFoundError
    try:
        c.resource.resource_groups.get(rg)
    except ResourceNotFoundError:
        c.resource.resource_groups.create_or_update(
            rg, {"location": plan.region, "tags": {"geotrain-run": plan.run_id, **(
                {"geotrain-owner": plan.owner} if plan.owner else {})}})
    prefix = subnet_prefix(c, plan)
    nsg_id = ensure_nsg(c, plan, prefix)
    if site_options(plan).subnet:  # the recipe's subnet: the NSG goes on each NIC
        return site_options(plan).subnet, nsg_id
    vnet = c.network.virtual_networks.begin_create_or_update(rg, f"gt-{plan.site}-vnet", {
        "location": plan.region, "tags": site_tags(plan),
        "properties": {"addressSpace": {"addressPrefixes": [prefix]}, "subnets": [
            {"name": "site", "properties": {
                "addressPrefix": prefix, "networkSecurityGroup": {"id": nsg_id},
                # Outbound only (pip, the store); new VNets default to none.
                "defaultOutboundAccess": True,
                "serviceEndpoints": [{"service": "Microsoft.Storage"}]}}]}}).result()
    return f"{vnet.id}/subnets/site", None


def _assignment_url(c: _Clients, scope: str, vm_id: str) -> str:
    # A name derived from (scope, VM): creating it twice is harmless and
    # terminate can find it again without remembering anything.
    name = uuid.uuid5(uuid.NAMESPACE_URL, f"{scope.lower()}|{vm_id.lower()}")
    return (f"{c.settings.endpoint}{scope}/providers/Microsoft.Authorization/roleAssignments/"
            f"{name}?api-version={AUTHZ_API}")


def store_prefix(store_url: str) -> str:
    """The run's folder inside its container, as Azure's blob path attribute spells it
    (no container, no leading or trailing slash, not URL-encoded): `a/b/RUN` for
    az://CONTAINER/a/b/RUN. It goes into a condition between single quotes, so it may
    hold neither a quote nor a backslash, and it may not be empty (the container's root
    is every run's)."""
    scheme, _, rest = store_url.partition("://")
    prefix = rest.partition("/")[2].strip("/")
    if scheme not in ("az", "abfs") or not prefix or "'" in prefix or "\\" in prefix:
        raise ProviderError(f"azure: cannot limit the nodes' store access to run store "
                            f"{store_url!r}: the run's folder must be a non-empty path inside "
                            f"an az:// container, without quotes or backslashes")
    return prefix


def store_condition(prefix: str, member: str) -> str:
    """The role assignment condition (conditionVersion 2.0) that keeps Storage Blob Data
    Contributor to the run's blobs under `prefix`/ (store_prefix), lets the VM write only
    what its member writes there, and allows no delete.

    Read a blob (read NOT Blob.List) only when its path starts with `prefix/`; write one
    or create one (write, add/action) only when its path is one of the member's keys
    (geotrain/store/roster.py `member_writes`: its own records and contributions and the
    shared round keys, never another member's, nor run.json, control/ or final/); List
    Blobs (read AND Blob.List: it has no blob path, only the Request attribute blob
    prefix) only when the listing's prefix starts with `prefix/` (a listing without one,
    of the whole container, is refused); delete and move/action never. Every other
    action of the role passes the condition untouched.
    """
    from geotrain.errors import StoreError
    from geotrain.store import member_writes

    assert prefix and "'" not in prefix and "\\" not in prefix, prefix  # store_prefix checked
    try:
        keys = member_writes(member)
    except StoreError as e:
        raise ProviderError(f"azure.store_scope: {e}") from None
    under = f"'{prefix}/'"
    writes = " OR ".join(f"(@Resource[{BLOBS}:path] StringLike '{prefix}/{k}')" for k in keys)
    return (
        f"((!(ActionMatches{{'{BLOBS}/read'}} AND NOT SubOperationMatches{{'Blob.List'}}))"
        f" OR (@Resource[{BLOBS}:path] StringStartsWith {under}))"
        f" AND ((!(ActionMatches{{'{BLOBS}/write'}}) AND !(ActionMatches{{'{BLOBS}/add/action'}}))"
        f" OR ({writes}))"
        f" AND ((!(ActionMatches{{'{BLOBS}/read'}} AND SubOperationMatches{{'Blob.List'}}))"
        f" OR (@Request[{BLOBS}:prefix] StringStartsWith {under}))"
        f" AND ((!(ActionMatches{{'{BLOBS}/delete'}}) AND !(ActionMatches{{'{BLOBS}/move/action'}})))")


def store_role_id(c: _Clients, role: str) -> str:
    """The full id of the role `role` (the option store_role: a GUID, or a role's name
    looked up in the subscription's role definitions), or a ProviderError of one line
    saying how to make it. Asked before any VM is created."""
    from azure.core.exceptions import HttpResponseError
    from azure.core.rest import HttpRequest

    base = f"/subscriptions/{c.settings.subscription}/providers/Microsoft.Authorization/roleDefinitions"
    if GUID.match(role):
        return f"{base}/{role.lower()}"
    query = urllib.parse.urlencode({"$filter": f"roleName eq '{role}'", "api-version": AUTHZ_API})
    resp = c.resource.send_request(HttpRequest("GET", f"{c.settings.endpoint}{base}?{query}"))
    if resp.status_code != 200:
        raise HttpResponseError(response=resp)
    found = [d for d in resp.json().get("value") or []
             if (d.get("properties") or {}).get("roleName") == role and d.get("id")]
    if not found:
        how = ("make it once: infra/azure/README.md, `az role definition create` with "
               "infra/azure/geotrain-node-store-role.json" if role == NODE_STORE_ROLE else
               "check the name, or give the role's GUID")
        raise ProviderError(f"azure: the role {role!r} (azure.store_role) does not exist in "
                            f"subscription {c.settings.subscription}; {how}")
    return found[0]["id"]


def grant_store(c: _Clients, scope: str, vm, prefix: str, member: str, role: str) -> None:
    """Give the VM's system identity the role `role` (store_role_id) on `scope` under
    `store_condition(prefix, member)`: its run's blobs only, writes only its member's
    keys, no delete."""
    from azure.core.exceptions import HttpResponseError
    from azure.core.rest import HttpRequest

    body = {"properties": {"roleDefinitionId": role, "principalId": vm.identity.principal_id,
                           "principalType": "ServicePrincipal",
                           "condition": store_condition(prefix, member), "conditionVersion": "2.0",
                           "description": f"geotrain: this VM's run store folder {prefix}/ only, its own keys, no delete"}}
    resp = c.resource.send_request(HttpRequest("PUT", _assignment_url(c, scope, vm.id), json=body))
    if resp.status_code not in (200, 201):
        raise HttpResponseError(response=resp)


def revoke_store(c: _Clients, vm) -> None:
    """Remove what `grant_store` gave the VM (the scope is in its tag geotrain-store-scope)."""
    from azure.core.exceptions import HttpResponseError
    from azure.core.rest import HttpRequest

    scope = (vm.tags or {}).get("geotrain-store-scope")
    if scope:
        resp = c.resource.send_request(HttpRequest("DELETE", _assignment_url(c, scope, vm.id)))
        if resp.status_code not in (200, 204, 404):
            raise HttpResponseError(response=resp)
