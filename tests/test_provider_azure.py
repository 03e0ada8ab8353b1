"""The Azure provider against a local ARM server (tests/fakes/arm_server.py).

The real azure-mgmt-resource / -network / -compute clients talk TLS to the
fake (its self-signed certificate passed as GEOTRAIN_ARM_CA_BUNDLE), and the
real DefaultAzureCredential gets its bearer token from the fake's App Service
managed-identity endpoint (IDENTITY_ENDPOINT + IDENTITY_HEADER), so the whole
chain is on the wire: token, PUT/GET/DELETE/list, async operations, pollers.
"""

from __future__ import annotations

import base64
import ipaddress
import subprocess
import sys

import pytest
from pydantic import ValidationError

import providers.azure as az
from geotrain.errors import CapacityError, ProviderError, RecipeError
from geotrain.recipe import AzureOptions, loads
from providers import SitePlan
from tests.fakes.arm_server import FakeArm
from tests.cloud_helpers import define_node_store_role

STORE = "az://geotrainruns/runs/my run"  # a space: the boot script must quote it
SCOPE = ("/subscriptions/00000000-0000-0000-0000-0000000000aa/resourceGroups/data/providers/"
         "Microsoft.Storage/storageAccounts/geotrainruns/blobServices/default/containers/runs")
OPEN = {"*", "internet", "0.0.0.0/0", "any", "::/0"}


@pytest.fixture
def arm(monkeypatch):
    fake = FakeArm().start()
    for var in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_USERNAME",
                "AZURE_FEDERATED_TOKEN_FILE", "MSI_ENDPOINT", "MSI_SECRET",
                "IDENTITY_SERVER_THUMBPRINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", fake.subscription)
    monkeypatch.setenv("GEOTRAIN_ARM_ENDPOINT", fake.base_url)
    monkeypatch.setenv("GEOTRAIN_ARM_CA_BUNDLE", str(fake.ca_path))
    monkeypatch.setenv("IDENTITY_ENDPOINT", fake.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", fake.identity_header)
    monkeypatch.setattr(az, "POLL_INTERVAL_S", 0)
    yield fake
    fake.stop()


def plan(site="east", run="exp-20260101-000000-ab12", zones=("1", "2"), nodes=2, **options) -> SitePlan:
    """A plan; options that are the recipe's `azure:` fields become its typed options, the
    rest (max_price, subnet_prefix) plan options."""
    typed = {k: v for k, v in options.items() if k in AzureOptions.model_fields}
    return SitePlan(run, site, "azure", STORE, region="eastus", zones=zones, nodes=nodes,
                    workers=1, instance_type="Standard_NC24ads_A100_v4", spot=True,
                    options=tuple((k, v) for k, v in options.items() if k not in typed),
                    provider_options=AzureOptions(**typed))


def kinds(fake: FakeArm, site: str | None = None) -> list[tuple[str, str]]:
    """(type, name) of everything the server holds but the operator's standing role
    definitions, optionally of one site's names."""
    return sorted((r["type"], r["name"]) for r in fake.resources()
                  if r["type"] != "Microsoft.Authorization/roleDefinitions"
                  and (site is None or r["name"].startswith(f"gt-{site}-")
                       or (r["type"].endswith("/subnets") and f"/gt-{site}-vnet/" in r["id"])))


def vm_puts(fake: FakeArm) -> list[dict]:
    return fake.bodies("PUT", "Microsoft.Compute/virtualMachines")


@pytest.mark.timeout(60)
def test_spot_launch_sends_the_right_vm(arm):
    nodes = az.launch(plan())

    assert [n.state for n in nodes] == ["running", "running"]
    prefix = ipaddress.ip_network(az.DEFAULT_PREFIX)
    assert all(ipaddress.ip_address(n.private_ip) in prefix for n in nodes)
    assert arm.token_requests >= 1  # the credential chain fetched a token on the wire
    [rg] = arm.resources("resourceGroups")
    assert (rg["name"], rg["location"]) == ("geotrain-exp-20260101-000000-ab12", "eastus")
    assert rg["tags"] == {"geotrain-run": "exp-20260101-000000-ab12"}

    bodies = vm_puts(arm)
    assert len(bodies) == 2
    tokens = set()
    for i, body in enumerate(bodies):
        p = body["properties"]
        assert body["zones"] == ["1"] and body["location"] == "eastus"
        assert body["tags"] == {"geotrain-run": "exp-20260101-000000-ab12", "geotrain-site": "east"}
        assert "identity" not in body  # none named: the VM has no identity at all
        assert p["storageProfile"]["osDisk"]["diskSizeGB"] == 128
        assert p["priority"] == "Spot" and p["evictionPolicy"] == "Delete"
        assert p["billingProfile"] == {"maxPrice": -1}
        assert p["hardwareProfile"] == {"vmSize": "Standard_NC24ads_A100_v4"}
        assert p["storageProfile"]["imageReference"] == {
            "publisher": "microsoft-dsvm", "offer": "ubuntu-hpc", "sku": "2204", "version": "latest"}
        assert p["storageProfile"]["osDisk"]["deleteOption"] == "Delete"
        [nic] = p["networkProfile"]["networkInterfaces"]
        assert nic["properties"]["deleteOption"] == "Delete"
        assert p["osProfile"]["linuxConfiguration"]["disablePasswordAuthentication"] is True
        script = base64.b64decode(p["osProfile"]["customData"]).decode()
        assert script.startswith("#!/bin/bash")
        assert "export GEOTRAIN_RUN=exp-20260101-000000-ab12\n" in script
        assert "export GEOTRAIN_SITE=east\n" in script
        assert f"export GEOTRAIN_NODE_INDEX={i}\n" in script
        assert "STORE='az://geotrainruns/runs/my run'\n" in script
        tokens.add(script.split("RAY_AUTH_TOKEN=")[1].split("\n")[0])
    [token] = tokens  # one token per site, shared by its nodes
    assert len(token) == 64
    # The token is in the boot data only: not in any tag, name or other body.
    others = [r.body for r in arm.requests if r.body and "virtualMachines" not in r.path]
    assert token not in repr(others) and token not in repr(arm.resources("Microsoft.Compute/virtualMachines")[0]["tags"])
    # No public address by default.
    assert not arm.resources("Microsoft.Network/publicIPAddresses")
    for nic in arm.resources("Microsoft.Network/networkInterfaces"):
        assert "publicIPAddress" not in nic["properties"]["ipConfigurations"][0]["properties"]
    assert all(r["tags"] == {"geotrain-run": "exp-20260101-000000-ab12", "geotrain-site": "east"}
               for r in arm.resources() if r["type"] not in ("resourceGroups", "Microsoft.Compute/disks")
               and not r["type"].endswith("/subnets"))


@pytest.mark.timeout(60)
def test_node_identity_gets_blob_access_on_the_store_container_only(arm):
    # A fresh subscription has no 'geotrain node store' role: refused before anything exists.
    with pytest.raises(ProviderError, match="the role 'geotrain node store' .* does not exist in "
                       "subscription .*az role definition create"):
        az.launch(plan(nodes=2, identity="system", store_scope=SCOPE))
    assert [r["type"] for r in arm.resources()] == [] and vm_puts(arm) == []
    role = define_node_store_role(arm)  # the operator's one-time step (infra/azure/README.md)
    az.launch(plan(nodes=2, identity="system", store_scope=SCOPE))
    assert all(b["identity"] == {"type": "SystemAssigned"} for b in vm_puts(arm))
    vms = {v["identity"]["principalId"]: v for v in arm.resources("Microsoft.Compute/virtualMachines")}
    grants = arm.resources("Microsoft.Authorization/roleAssignments")
    assert sorted(g["properties"]["principalId"] for g in grants) == sorted(vms)
    for g in grants:
        assert g["properties"]["scope"] == SCOPE
        assert g["properties"]["roleDefinitionId"] == role  # data actions only: no container actions
        assert g["properties"]["principalType"] == "ServicePrincipal"
    [defined] = arm.resources("Microsoft.Authorization/roleDefinitions")
    [perms] = defined["properties"]["permissions"]
    assert perms["actions"] == [] and not any(a.endswith("/delete") for a in perms["dataActions"])


@pytest.mark.timeout(60)
def test_store_role_may_name_a_built_in_role_or_a_guid(arm):
    az.launch(plan(site="east", nodes=1, identity="system", store_scope=SCOPE,
                   store_role="Storage Blob Data Contributor"))
    az.launch(plan(site="west", nodes=1, identity="system", store_scope=SCOPE,
                   store_role="2a2b9908-6ea1-4ae2-8e65-a410df84e7d1"))  # Storage Blob Data Reader
    roles = sorted(g["properties"]["roleDefinitionId"].rsplit("/", 1)[-1]
                   for g in arm.resources("Microsoft.Authorization/roleAssignments"))
    assert roles == ["2a2b9908-6ea1-4ae2-8e65-a410df84e7d1", "ba92f5b4-2d11-453d-a403-e96b0029c9fe"]
    with pytest.raises(ProviderError, match="the role 'no such role' .* check the name"):
        az.launch(plan(site="north", nodes=1, identity="system", store_scope=SCOPE, store_role="no such role"))


@pytest.mark.timeout(60)
def test_user_assigned_identity_image_id_disk_and_existing_subnet(arm):
    """The recipe's identity, image id, disk size and own subnet: no VNet is made, the
    site's NSG goes on each NIC and admits that subnet's prefix only."""
    sub = arm.subscription
    ident = (f"/subscriptions/{sub}/resourceGroups/ids/providers/"
             "Microsoft.ManagedIdentity/userAssignedIdentities/geotrain-node")
    image = f"/subscriptions/{sub}/resourceGroups/imgs/providers/Microsoft.Compute/images/gpu"
    arm.put_group("net", {"location": "eastus"})
    vnet = f"/subscriptions/{sub}/resourceGroups/net/providers/Microsoft.Network/virtualNetworks/main"
    arm.put(vnet, "net", "Microsoft.Network/virtualNetworks", "main", {
        "location": "eastus", "properties": {"addressSpace": {"addressPrefixes": ["10.5.0.0/16"]},
                                             "subnets": [{"name": "gpu", "properties": {
                                                 "addressPrefix": "10.5.7.0/24"}}]}})
    subnet = f"{vnet}/subnets/gpu"
    nodes = az.launch(plan(nodes=1, zones=(), identity=ident, image=image, disk_gb=512,
                           subnet=subnet))
    [body] = vm_puts(arm)
    assert body["identity"] == {"type": "UserAssigned", "userAssignedIdentities": {ident: {}}}
    assert body["properties"]["storageProfile"]["imageReference"] == {"id": image}
    assert body["properties"]["storageProfile"]["osDisk"]["diskSizeGB"] == 512
    assert not arm.resources("Microsoft.Authorization/roleAssignments")  # granted by the operator
    assert ("Microsoft.Network/virtualNetworks", "gt-east-vnet") not in kinds(arm)
    [nic] = arm.resources("Microsoft.Network/networkInterfaces")
    assert nic["properties"]["ipConfigurations"][0]["properties"]["subnet"]["id"] == subnet
    [nsg] = arm.resources("Microsoft.Network/networkSecurityGroups")
    assert nic["properties"]["networkSecurityGroup"]["id"] == nsg["id"]
    allow = [r for r in nsg["properties"]["securityRules"] if r["properties"]["access"] == "Allow"]
    assert [r["properties"]["sourceAddressPrefix"] for r in allow] == ["10.5.7.0/24"]
    assert ipaddress.ip_address(nodes[0].private_ip) in ipaddress.ip_network("10.5.7.0/24")
    az.terminate(nodes)
    assert [r["name"] for r in arm.resources() if r["name"].startswith("gt-")] == []
    assert arm.resources("Microsoft.Network/virtualNetworks")  # the recipe's own VNet stays


@pytest.mark.timeout(60)
def test_on_demand_image_and_price_options(arm):
    p = plan(nodes=1, zones=(), image="Canonical:ubuntu-24_04-lts:server:latest", max_price="0.5")
    az.launch(p)
    [body] = vm_puts(arm)
    assert "zones" not in body
    assert body["properties"]["storageProfile"]["imageReference"]["offer"] == "ubuntu-24_04-lts"
    assert body["properties"]["billingProfile"] == {"maxPrice": 0.5}
    on_demand = SitePlan("r2", "west", "azure", STORE, region="westus", nodes=1,
                         instance_type="Standard_D4s_v5", spot=False)
    az.launch(on_demand)
    body = vm_puts(arm)[-1]["properties"]
    assert "priority" not in body and "evictionPolicy" not in body and "billingProfile" not in body


def _first_match(rules: list[dict], source: str) -> dict:
    """The inbound rule Azure applies to traffic from `source` (lowest priority number wins)."""
    def matches(rule):
        src = rule["properties"]["sourceAddressPrefix"]
        if src == "*":
            return True
        if src in ("Internet", "VirtualNetwork", "AzureLoadBalancer"):
            return src == source
        try:
            return ipaddress.ip_address(source) in ipaddress.ip_network(src)
        except ValueError:
            return False
    inbound = [r for r in rules if r["properties"]["direction"] == "Inbound" and matches(r)]
    return min(inbound, key=lambda r: r["properties"]["priority"])


@pytest.mark.timeout(60)
def test_nsg_admits_only_the_site_subnet(arm):
    az.launch(plan(nodes=1, subnet_prefix="10.7.3.0/24"))

    [nsg] = arm.resources("Microsoft.Network/networkSecurityGroups")
    rules = nsg["properties"]["securityRules"]
    allows = [r["properties"] for r in rules
              if r["properties"]["direction"] == "Inbound" and r["properties"]["access"] == "Allow"]
    assert allows and all(a["sourceAddressPrefix"] == "10.7.3.0/24" for a in allows)
    for r in rules:
        sources = [r["properties"].get("sourceAddressPrefix", "")] + r["properties"].get("sourceAddressPrefixes", [])
        if r["properties"]["access"] == "Allow":
            assert not {s.lower() for s in sources} & OPEN, r
    # What Azure would do, its default rules included: the site is let in,
    # the Internet, the rest of the VNet and the load balancer probe are not.
    effective = rules + nsg["properties"]["defaultSecurityRules"]
    assert _first_match(effective, "10.7.3.9")["properties"]["access"] == "Allow"
    for source in ("Internet", "VirtualNetwork", "AzureLoadBalancer", "10.7.4.1", "203.0.113.5"):
        assert _first_match(effective, source)["properties"]["access"] == "Deny", source
    [subnet] = arm.resources("Microsoft.Network/virtualNetworks/subnets")
    assert subnet["properties"]["addressPrefix"] == "10.7.3.0/24"
    assert subnet["properties"]["networkSecurityGroup"]["id"].lower() == nsg["id"].lower()
    assert subnet["properties"]["defaultOutboundAccess"] is True  # outbound only, for pip
    assert not arm.resources("Microsoft.Network/publicIPAddresses")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("via", ["sync", "async"])
def test_zone_failover_on_zonal_allocation_failure(arm, via):
    arm.fail_zone("1", "ZonalAllocationFailed", via=via)
    nodes = az.launch(plan())

    assert len(nodes) == 2
    zones = [b["zones"] for b in vm_puts(arm)]
    assert zones[0] == ["1"] and zones[-2:] == [["2"], ["2"]]
    vms = arm.resources("Microsoft.Compute/virtualMachines")
    assert sorted(v["name"] for v in vms) == ["gt-east-0", "gt-east-1"]
    assert all(v["zones"] == ["2"] and v["properties"]["provisioningState"] == "Succeeded" for v in vms)
    assert len(arm.resources("Microsoft.Compute/disks")) == 2
    assert len(arm.resources("Microsoft.Network/networkInterfaces")) == 2
    deleted = [r.path.rsplit("/", 1)[1] for r in arm.requests
               if r.method == "DELETE" and "/virtualMachines/" in r.path]
    # An async failure leaves a Failed VM in ARM, which the provider deletes.
    assert deleted == (["gt-east-0", "gt-east-1"] if via == "async" else [])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code,via", [("ZonalAllocationFailed", "async"), ("SkuNotAvailable", "sync"),
                                      ("OperationNotAllowed", "sync"), ("AllocationFailed", "async")])
def test_no_capacity_anywhere_raises_capacity_error_and_leaves_nothing(arm, code, via):
    arm.fail_zone("1", code, via=via)
    arm.fail_zone("2", code, via=via)
    with pytest.raises(CapacityError) as info:
        az.launch(plan())
    assert info.value.tried == ["azure:eastus/1", "azure:eastus/2"]
    assert code in str(info.value)
    assert kinds(arm) == []  # every kind: group, VMs, disks, NICs, NSG, VNet, subnet, IPs
    assert "geotrain-exp-20260101-000000-ab12" in arm.rg_deleted_with


@pytest.mark.timeout(60)
def test_other_errors_are_provider_errors_and_leave_nothing(arm):
    arm.fail_zone("1", "InvalidParameter", via="sync")
    with pytest.raises(ProviderError) as info:
        az.launch(plan())
    assert not isinstance(info.value, CapacityError)
    assert "InvalidParameter" in str(info.value)
    assert kinds(arm) == []


@pytest.mark.timeout(60)
def test_bad_plan_is_refused_before_anything_is_created(arm):
    with pytest.raises(RecipeError, match="publisher:offer:sku:version"):
        loads("name: x\nsites:\n  - {name: a, provider: azure, instance_type: Standard_D2s_v5, "
              "azure: {image: ubuntu}}\n")
    with pytest.raises(ValidationError, match="only with identity 'system'"):
        AzureOptions(store_scope=SCOPE)  # a user-assigned identity is granted by the operator
    with pytest.raises(ProviderError, match="region"):
        az.launch(SitePlan("r", "s", "azure", STORE, instance_type="Standard_D2s_v5"))
    assert arm.requests == []


@pytest.mark.timeout(60)
def test_query_finds_nodes_by_tags(arm):
    a = az.launch(plan(site="east"))
    b = az.launch(plan(site="west", nodes=1, zones=()))
    other = az.launch(plan(site="east", run="other-run", nodes=1))

    got = az.query("exp-20260101-000000-ab12")
    assert sorted(n.instance_id for n in got) == sorted(n.instance_id for n in a + b)
    assert {n.site for n in got} == {"east", "west"}
    assert all(n.state == "running" and n.private_ip and n.region == "eastus" for n in got)
    assert {n.private_ip for n in az.query("exp-20260101-000000-ab12", "east")} == {n.private_ip for n in a}
    assert az.query("exp-20260101-000000-ab12", "nowhere") == []
    assert az.query("no-such-run") == []
    assert sorted(n.instance_id for n in az.query_all()) == sorted(n.instance_id for n in a + b + other)
    # query reads the server, not our memory: a VM deleted behind our back is gone.
    arm.delete(a[0].instance_id)
    assert sorted(n.instance_id for n in az.query("exp-20260101-000000-ab12", "east")) == [a[1].instance_id]


@pytest.mark.timeout(90)
def test_terminate_leaves_nothing_and_removes_the_empty_group(arm):
    run = "exp-20260101-000000-ab12"
    define_node_store_role(arm)
    east = az.launch(plan(site="east", public_ip=True, identity="system", store_scope=SCOPE))
    west = az.launch(plan(site="west", nodes=1, subnet_prefix="10.9.0.0/24"))
    assert len(arm.resources("Microsoft.Network/publicIPAddresses")) == 2
    assert len(arm.resources("Microsoft.Authorization/roleAssignments")) == 2
    west_before = kinds(arm, "west")

    # One node of a site: that VM (and its NIC and disk) goes, the rest stays.
    az.terminate(east[:1])
    assert [n.instance_id for n in az.query(run, "east")] == [east[1].instance_id]
    assert ("Microsoft.Network/virtualNetworks", "gt-east-vnet") in kinds(arm, "east")
    assert ("Microsoft.Compute/disks", "gt-east-0-osdisk") not in kinds(arm, "east")

    assert len(arm.resources("Microsoft.Authorization/roleAssignments")) == 1
    done = az.terminate(east)  # the whole site; east[0] is already gone (idempotent)
    assert [n.state for n in done] == ["terminated", "terminated"]
    assert kinds(arm, "east") == []  # VMs, disks, NICs, public IPs, NSG, VNet, subnet
    assert kinds(arm, "west") == west_before
    assert arm.resources("resourceGroups")  # west still lives there

    az.terminate(west)
    assert kinds(arm) == []
    # The provider emptied the group itself before deleting it (not ARM's cascade).
    assert arm.rg_deleted_with == {f"geotrain-{run}": []}
    az.terminate(west + east)  # again, with nothing left: no error
    assert az.query(run) == []


@pytest.mark.timeout(60)
def test_check_with_and_without_config(arm, monkeypatch):
    ok = az.check()
    assert ok.ok, ok.detail
    assert arm.subscription in ok.detail and arm.base_url in ok.detail and str(arm.ca_path) in ok.detail
    assert arm.token not in ok.detail

    monkeypatch.setenv("IDENTITY_HEADER", "wrong")  # the identity endpoint refuses
    bad = az.check()
    assert not bad.ok and arm.token not in bad.detail and arm.base_url in bad.detail

    monkeypatch.delenv("AZURE_SUBSCRIPTION_ID")
    none = az.check()
    assert not none.ok and "AZURE_SUBSCRIPTION_ID" in none.detail


def test_import_does_not_load_the_sdk():
    code = ("import sys, providers.azure as a; a.capabilities(); "
            "assert not [m for m in sys.modules if m.startswith('azure.')], 'SDK loaded'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
