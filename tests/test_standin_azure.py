"""The ARM stand-in boots what it creates (tests/fakes/arm_server.py + azure_boot.py).

VMs are created and deleted through the real azure-mgmt-resource / azure-mgmt-compute
clients against FakeArm (TLS) with booting on. Each VM's custom data runs as a process
tree of its own (tests/fakes/node.py) that asks its own IMDS stand-in for its name and,
through azure-identity's ManagedIdentityCredential, for a token, writes what it got
under its root and sleeps forever.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest

from geotrain.site.preemption import NoticeThread
from providers.azure.watcher import AzureWatcher
from tests.fakes.arm_server import FakeArm
from tests.fakes.azure_boot import BootConfig
from tests.fakes.node import node_image, tagged_pids
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(180)

GROUP = "standin-rg"
SCOPE = "https://storage.azure.com/.default"
UAI = ("/subscriptions/00000000-0000-0000-0000-0000000000aa/resourceGroups/ids/providers/"
       "Microsoft.ManagedIdentity/userAssignedIdentities/geotrain-node")

REPORT = r'''
import json, os, urllib.request
base = os.environ["GEOTRAIN_METADATA_ENDPOINT"]
def imds(path):
    req = urllib.request.Request(base + path, headers={"Metadata": "true"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()
doc = json.loads(imds("/metadata/instance?api-version=2021-02-01"))
out = {"name": imds("/metadata/instance/compute/name?api-version=2021-02-01&format=text"),
       "compute": doc["compute"],
       "ip": doc["network"]["interface"][0]["ipv4"]["ipAddress"][0]["privateIpAddress"],
       "env": sorted(os.environ)}
from azure.identity import ManagedIdentityCredential
try:
    out["token"] = ManagedIdentityCredential().get_token("https://storage.azure.com/.default").token
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
root = os.environ["GEOTRAIN_NODE_ROOT"]
with open(root + "/report.tmp", "w") as f:
    json.dump(out, f)
os.replace(root + "/report.tmp", root + "/report.json")
'''

CUSTOM_DATA = f"""#!/bin/bash
set -u
python3 - <<'EOF'
{REPORT}
EOF
setsid sleep infinity &   # leaves the process group: only the node tag finds it
sleep infinity
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    config = BootConfig(node_image(tmp_path / "image"), tmp_path / "nodes",
                        node_env={"GEOTRAIN_STORE_HINT": "http://127.0.0.1:1"})
    arm = FakeArm(boot=config).start()
    try:
        _point_at(arm, monkeypatch)
        yield arm
    finally:
        arm.stop()


def _point_at(arm: FakeArm, monkeypatch) -> None:
    for var in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_USERNAME",
                "AZURE_FEDERATED_TOKEN_FILE", "MSI_ENDPOINT", "MSI_SECRET",
                "IDENTITY_SERVER_THUMBPRINT", "AZURE_POD_IDENTITY_AUTHORITY_HOST"):
        monkeypatch.delenv(var, raising=False)
    # The test process's own managed identity (App Service protocol): a node must not see it.
    monkeypatch.setenv("IDENTITY_ENDPOINT", arm.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", arm.identity_header)


class Clients:
    def __init__(self, arm: FakeArm):
        from azure.identity import ManagedIdentityCredential
        from azure.mgmt.compute import ComputeManagementClient
        from azure.mgmt.resource.resources import ResourceManagementClient

        kw = {"base_url": arm.base_url, "connection_verify": str(arm.ca_path),
              "polling_interval": 0}
        cred = ManagedIdentityCredential()
        self.resource = ResourceManagementClient(cred, arm.subscription, **kw)
        self.compute = ComputeManagementClient(cred, arm.subscription, **kw)
        self.resource.resource_groups.create_or_update(GROUP, {"location": "eastus"})

    def create(self, name: str, identity: dict | None, custom: str = CUSTOM_DATA,
               boot_diagnostics: bool = False):
        body = {"location": "eastus", "zones": ["1"], "tags": {"geotrain-site": "east"},
                "properties": {
                    "hardwareProfile": {"vmSize": "Standard_D2s_v5"},
                    "storageProfile": {"imageReference": {
                        "publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server",
                        "version": "latest"}, "osDisk": {"createOption": "FromImage",
                                                         "deleteOption": "Delete"}},
                    "osProfile": {"computerName": name, "adminUsername": "geotrain",
                                  "customData": base64.b64encode(custom.encode()).decode(),
                                  "linuxConfiguration": {"disablePasswordAuthentication": True}},
                    "priority": "Spot", "evictionPolicy": "Delete"}}
        if identity:
            body["identity"] = identity
        if boot_diagnostics:
            body["properties"]["diagnosticsProfile"] = {"bootDiagnostics": {"enabled": True}}
        return self.compute.virtual_machines.begin_create_or_update(GROUP, name, body).result()


@pytest.fixture
def clients(fake):
    return Clients(fake)


def report(fake, name: str) -> dict:
    node = fake.node(name)
    path = node.root / "report.json"
    try:
        wait_for(path.exists, timeout=90, every=0.2)
    except TimeoutError:
        raise AssertionError(f"{name} wrote no report; console:\n{node.console_text()}") from None
    return json.loads(path.read_text())


def imds_get(url: str, path: str, **headers) -> tuple[int, str]:
    req = urllib.request.Request(url + path, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def test_vm_with_system_identity_boots_and_gets_a_token(fake, clients):
    vm = clients.create("vm-sys", {"type": "SystemAssigned"})
    got = report(fake, "vm-sys")
    assert got["name"] == "vm-sys" and got["ip"] == "127.0.0.1"
    compute = got["compute"]
    assert (compute["vmId"], compute["location"], compute["zone"]) == (vm.vm_id, "eastus", "1")
    assert compute["resourceGroupName"] == GROUP and compute["subscriptionId"] == fake.subscription
    assert "error" not in got, got.get("error")
    assert got["token"] == fake.token_for(vm.identity.principal_id) != fake.token
    imds = fake.imds("vm-sys")
    assert imds.token_requests >= 1
    env = set(got["env"])
    assert {"AZURE_POD_IDENTITY_AUTHORITY_HOST", "GEOTRAIN_METADATA_ENDPOINT", "NO_PROXY",
            "GEOTRAIN_STORE_HINT"} <= env
    assert not env & {"IDENTITY_ENDPOINT", "IDENTITY_HEADER", "AZURE_SUBSCRIPTION_ID"}
    # IMDS wants `Metadata: true` and refuses forwarded requests.
    path = "/metadata/instance?api-version=2021-02-01"
    assert imds_get(imds.url, path)[0] == 400
    assert imds_get(imds.url, path, Metadata="true", **{"X-Forwarded-For": "10.0.0.1"})[0] == 400
    assert imds_get(imds.url, path, Metadata="true")[0] == 200


def test_vm_with_user_assigned_identity_gets_its_token(fake, clients):
    vm = clients.create("vm-uai", {"type": "UserAssigned", "userAssignedIdentities": {UAI: {}}})
    got = report(fake, "vm-uai")
    assert "error" not in got, got.get("error")
    [info] = vm.identity.user_assigned_identities.values()
    assert got["token"] == fake.token_for(info.principal_id)


def test_vm_without_identity_is_refused_a_token(fake, clients):
    clients.create("vm-bare", None)
    got = report(fake, "vm-bare")
    assert got["name"] == "vm-bare"
    assert "token" not in got and "Identity not found" in got["error"], got
    status, body = imds_get(fake.imds("vm-bare").url, "/metadata/identity/oauth2/token?"
                            "api-version=2018-02-01&resource=https://storage.azure.com/",
                            Metadata="true")
    assert (status, json.loads(body)) == (400, {"error": "invalid_request",
                                                "error_description": "Identity not found"})
    assert fake.imds("vm-bare").token_requests == 0


def test_preempt_is_seen_and_acknowledged_by_the_azure_watcher(fake, clients):
    clients.create("vm-spot", {"type": "SystemAssigned"})
    clients.create("vm-other", None)
    imds = fake.imds("vm-spot")
    watcher = AzureWatcher(imds.url)  # asks IMDS for its own name
    assert watcher.poll() is None and watcher.vm_name == "vm-spot"
    fake.preempt("vm-other")  # another VM's event is not this one's
    thread = NoticeThread(watcher).start()
    try:
        event_id = fake.preempt("vm-spot")
        assert thread.fired.wait(30), "the watcher did not see the Preempt event"
        assert (thread.notice.kind, thread.notice.event_id) == ("preempt", event_id)
        assert thread.acknowledge()
    finally:
        thread.stop()
    assert imds.acknowledged == [event_id]
    assert fake.imds("vm-other").acknowledged == []


def test_deleting_the_vm_or_its_group_ends_its_process_tree(fake, clients):
    clients.create("vm-a", None)
    clients.create("vm-b", None)
    a, b = fake.node("vm-a"), fake.node("vm-b")
    a_url = fake.imds("vm-a").url
    for name in ("vm-a", "vm-b"):
        report(fake, name)
    for node in (a, b):
        wait_for(lambda: len(tagged_pids(node.instance_id)) >= 3, timeout=30, every=0.2)
    clients.compute.virtual_machines.begin_delete(GROUP, "vm-a").result()
    wait_for(lambda: not tagged_pids(a.instance_id), timeout=60, every=0.3)
    assert tagged_pids(b.instance_id)  # only that VM's tree
    wait_for(lambda: _refused(a_url), timeout=30, every=0.3)
    clients.resource.resource_groups.begin_delete(GROUP).result()
    # Gone from /proc's tags, and reaped (an exiting process can drop out of the tag scan
    # a moment before it ends).
    wait_for(lambda: not tagged_pids(b.instance_id) and not a.running() and not b.running(),
             timeout=60, every=0.3)


def _refused(url: str) -> bool:
    try:
        imds_get(url, "/metadata/instance?api-version=2021-02-01", Metadata="true")
    except OSError:
        return True
    return False


def test_stop_leaves_no_process(fake, clients):
    clients.create("vm-x", {"type": "SystemAssigned"})
    clients.create("vm-y", None)
    nodes = [fake.node("vm-x"), fake.node("vm-y")]
    for name in ("vm-x", "vm-y"):
        report(fake, name)
    fake.stop()
    for node in nodes:
        assert not tagged_pids(node.instance_id) and not node.running()


def test_booting_is_opt_in(monkeypatch):
    arm = FakeArm().start()
    try:
        _point_at(arm, monkeypatch)
        Clients(arm).create("vm-plain", {"type": "SystemAssigned"})
        with pytest.raises(KeyError):
            arm.node("vm-plain")
    finally:
        arm.stop()


def test_the_provider_reads_a_vms_console_through_boot_diagnostics(fake, clients, monkeypatch):
    """providers.azure.console: retrieveBootDiagnosticsData through the real compute client,
    then the serial log's SAS URL: what the node printed, such as the one line a node that
    cannot use the run store prints (the controller reports it as the site's loss)."""
    import providers.azure as az
    from geotrain.site.node_info import fatal_line
    from providers import Node

    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", fake.subscription)
    monkeypatch.setenv("GEOTRAIN_ARM_ENDPOINT", fake.base_url)
    monkeypatch.setenv("GEOTRAIN_ARM_CA_BUNDLE", str(fake.ca_path))
    said = "geotrain node: fatal: cannot use the run store az://acct/runs/r1: no managed identity"
    script = f"#!/bin/bash\necho booting\necho '{said}'\nsleep infinity\n"
    vm = clients.create("vm-diag", None, custom=script, boot_diagnostics=True)
    node = Node("r1", "east", "azure", vm.id, "running", region="eastus")
    assert az.capabilities().console
    text = wait_for(lambda: (c := az.console(node)) and said in c and c, 60)
    assert fatal_line(text) == said.split("fatal: ", 1)[1]
    # Without boot diagnostics ARM refuses, and the provider says so (the controller then
    # reads nothing: a console that cannot be read is no verdict).
    bare = clients.create("vm-nodiag", None, custom=script)
    with pytest.raises(Exception, match="Boot diagnostics are not enabled"):
        az.console(Node("r1", "east", "azure", bare.id, "running", region="eastus"))
