"""An Azure site whose VM really boots: `geotrain launch` → the ARM stand-in creates the
VM → its custom data runs → it fetches geotrain from an az:// run store with its own
managed identity (a token from its IMDS; the operator's token cannot sign a SAS) →
installs, verified → trains to the end on Azurite.

Like tests/test_boot_gcp.py, nothing of the test process reaches the node but the
stand-in's environment and its IMDS; its image has geotrain's dependencies, not
geotrain. The store is Azurite behind an identity proxy (tests/fakes/azure_identity.py,
HTTPS): it accepts a node's requests only with a token the node's own IMDS issued for
https://storage.azure.com to an identity granted on the storage account, and the
operator's own token (the ARM stand-in's managed-identity token, which the CLI's
DefaultAzureCredential fetches). A node whose identity is not granted is refused by the
store and reported on its site, not left hanging.

The stand-in's environment names what differs from a real VM: the blob endpoint
(AZURE_STORAGE_SERVICE_ENDPOINT, https://ACCOUNT.blob.core.windows.net on Azure), the
proxy's CA (SSL_CERT_FILE, REQUESTS_CA_BUNDLE) and IMDS's address
(AZURE_POD_IDENTITY_AUTHORITY_HOST). The storage account comes from the boot script.

The first tests check the proxy and the per-VM tokens alone (seconds); the boot tests
take minutes.

Run: .venv/bin/python -m pytest -q tests/test_boot_azure.py
"""

from __future__ import annotations

import base64
import copy
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from geotrain.site.node_info import fatal_line
from geotrain.store_retry import is_access_denied
from tests.cloud_helpers import azure_env, cli, cli_json, define_node_store_role, wait_succeeded
from tests.emulators import AZURITE_ACCOUNT
from tests.fakes import netns
from tests.fakes.arm_server import FakeArm
from tests.fakes.azure_boot import BootConfig, NodeTokens, vm_imds
from tests.fakes.azure_identity import AUDIENCE, AzureIdentityProxy
from tests.fakes.node import node_image, tagged_pids
from tests.helpers import bundle_cache, wait_for

PATIENCE_S = 600  # a hang detector, not a speed bound
UAI = ("/subscriptions/00000000-0000-0000-0000-0000000000aa/resourceGroups/ids/providers/"
       "Microsoft.ManagedIdentity/userAssignedIdentities/geotrain-node")  # granted on the account
PRINCIPAL, CLIENT = FakeArm.user_identity(UAI)
OUTSIDER = "9d1c2f7e-0000-4000-8000-00000000beef"  # a real identity, not granted
NODE_NET = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}


class Token:
    """A fixed bearer token, as azure-core's TokenCredential."""

    def __init__(self, token: str):
        self.token = token

    def get_token(self, *scopes, **kwargs):
        from azure.core.credentials import AccessToken

        return AccessToken(self.token, int(time.time()) + 3600)


def blobs_as(proxy: AzureIdentityProxy, token: str, container: str):
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient(proxy.blob_endpoint, credential=Token(token),
                                connection_verify=str(proxy.ca_file), retry_total=0)
    return service.get_container_client(container)


def raw(proxy: AzureIdentityProxy, token: str | None, path: str) -> tuple[int, str]:
    """(status, body) of one GET through the proxy, with `Authorization: Bearer token`."""
    req = urllib.request.Request(proxy.blob_endpoint + path, headers={
        "x-ms-version": "2021-08-06", **({"Authorization": f"Bearer {token}"} if token else {})})
    ctx = ssl.create_default_context(cafile=str(proxy.ca_file))
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


@pytest.fixture
def store(azurite):
    """(proxy in front of Azurite, the tokens VMs were issued, container); PRINCIPAL granted."""
    tokens = NodeTokens()
    proxy = AzureIdentityProxy(azurite.endpoint, tokens.info, grants={AZURITE_ACCOUNT: {PRINCIPAL}},
                               allowed_tokens={"operator-token"})
    try:
        yield proxy, tokens, azurite.bucket
    finally:
        proxy.close()


@pytest.mark.timeout(120)
def test_the_store_takes_granted_identities_and_the_operator_only(store):
    from azure.core.exceptions import HttpResponseError

    proxy, tokens, container = store
    granted, _ = tokens.issue(PRINCIPAL, CLIENT, "vm-a", AUDIENCE)
    outsider, _ = tokens.issue(OUTSIDER, "c-outsider", "vm-b", AUDIENCE + "/")
    name = "proxy-check/hello.txt"
    blobs_as(proxy, granted, container).upload_blob(name, b"hello" * 1000, overwrite=True)
    assert blobs_as(proxy, granted, container).download_blob(name).readall() == b"hello" * 1000
    assert blobs_as(proxy, "operator-token", container).download_blob(name).readall() == b"hello" * 1000
    assert not proxy.denied()
    assert {(r["principal"], r["vm"]) for r in proxy.requests} == {(PRINCIPAL, "vm-a"), ("operator", None)}

    # Not granted: 403 AuthorizationPermissionMismatch, which geotrain counts as access
    # denied (not retried); Azurite never sees the request.
    with pytest.raises(HttpResponseError) as refused:
        blobs_as(proxy, outsider, container).download_blob(name).readall()
    assert refused.value.status_code == 403 and refused.value.error_code == "AuthorizationPermissionMismatch"
    assert is_access_denied(refused.value)
    with pytest.raises(HttpResponseError, match="not authorized"):
        blobs_as(proxy, outsider, container).upload_blob("proxy-check/x", b"x")
    assert [(d["principal"], d["vm"], d["status"]) for d in proxy.denied()] == [
        (OUTSIDER, "vm-b", 403)] * 2
    # Revoked: the same token is refused from then on; a grant may name the client id.
    proxy.revoke(AZURITE_ACCOUNT, PRINCIPAL)
    assert raw(proxy, granted, f"/{container}/{name}")[0] == 403
    proxy.grant(AZURITE_ACCOUNT, CLIENT)
    assert raw(proxy, granted, f"/{container}/{name}") == (200, "hello" * 1000)

    # No token, a token nobody issued, an expired one, one for another audience: 401.
    expired, _ = tokens.issue(PRINCIPAL, CLIENT, "vm-a", AUDIENCE, lifetime_s=0)
    vault, _ = tokens.issue(PRINCIPAL, CLIENT, "vm-a", "https://vault.azure.net")
    for token, code in ((None, "NoAuthenticationInformation"),
                        ("eyJ0eXAiOiJKV1QifQ.made-up", "InvalidAuthenticationInfo"),
                        (expired, "InvalidAuthenticationInfo"), (vault, "InvalidAuthenticationInfo")):
        status, body = raw(proxy, token, f"/{container}/{name}")
        assert status == 401 and f"<Code>{code}</Code>" in body, (token, body)
    # The refused upload never reached Azurite.
    assert [b.name for b in blobs_as(proxy, "operator-token", container).list_blobs("proxy-check/")] == [name]


@pytest.mark.timeout(60)
def test_each_vm_gets_its_own_tokens_until_they_near_expiry():
    tokens = NodeTokens(lifetime_s=3600)

    def vm(name: str, principal: str) -> dict:
        return {"name": name, "id": f"/subscriptions/s/resourceGroups/g/providers/"
                f"Microsoft.Compute/virtualMachines/{name}", "location": "eastus", "_group": "g",
                "_client_id": f"client-{name}", "properties": {"vmId": name},
                "identity": {"type": "SystemAssigned", "principalId": principal}}

    def token(imds, resource: str = AUDIENCE) -> dict:
        req = urllib.request.Request(f"{imds.url}/metadata/identity/oauth2/token?api-version="
                                     f"2018-02-01&resource={resource}", headers={"Metadata": "true"})
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as r:
            return json.load(r)
    servers = [vm_imds(vm(name, f"p-{name[-1]}"), "s", tokens).start() for name in ("vm-a", "vm-b")]
    try:
        a, b = token(servers[0]), token(servers[1])
        assert a["access_token"] != b["access_token"] and a["client_id"] == "client-vm-a"
        assert 3500 < int(a["expires_in"]) <= 3600 and int(a["expires_on"]) > time.time() + 3500
        assert tokens.info(a["access_token"]) == {
            "principal_id": "p-a", "client_id": "client-vm-a", "vm": "vm-a", "resource": AUDIENCE,
            "expires_on": int(a["expires_on"])}
        assert token(servers[0])["access_token"] == a["access_token"]  # handed out again while fresh
        other = token(servers[0], "https://vault.azure.net")  # another audience, another token
        assert other["access_token"] != a["access_token"]
        assert tokens.info(other["access_token"])["resource"] == "https://vault.azure.net"
        # A token with under 5 minutes left is replaced at the next ask.
        tokens.lifetime_s = 60
        c = token(servers[1], "https://management.azure.com/")
        assert int(c["expires_in"]) <= 60 and token(servers[1], "https://management.azure.com/")[
            "access_token"] != c["access_token"]
        assert tokens.info("eyJ0eXAiOiJKV1QifQ.made-up") is None
    finally:
        for s in servers:
            s.stop()


@pytest.fixture
def cloud(azurite, tmp_path):
    """(env for the CLI, home, ARM stand-in that boots, the store's identity proxy,
    container): operator and nodes reach Azurite only through the proxy, UAI granted."""
    fake = FakeArm()
    proxy = AzureIdentityProxy(azurite.endpoint, fake.token_info,
                               grants={AZURITE_ACCOUNT: {PRINCIPAL}}, allowed_tokens={fake.token},
                               # what launch grants through ARM, conditions included
                               assignments=lambda: fake.resources("Microsoft.Authorization/roleAssignments"),
                               role_definitions=lambda: fake.resources("Microsoft.Authorization/roleDefinitions"))
    fake.start()
    define_node_store_role(fake)  # the operator's one-time step (infra/azure/README.md)
    # The route to "Azure Storage": what a real VM gets from DNS and its image's CAs.
    trust = tmp_path / "ca.pem"
    trust.write_bytes(Path(proxy.ca_file).read_bytes() + fake.ca_path.read_bytes())
    route = {"AZURE_STORAGE_SERVICE_ENDPOINT": proxy.blob_endpoint, "SSL_CERT_FILE": str(trust),
             "REQUESTS_CA_BUNDLE": str(trust)}
    fake.enable_boot(BootConfig(node_image(tmp_path / "image"), tmp_path / "nodes", {**NODE_NET, **route}))
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "GOOGLE_", "GCE_", "AZURE_", "GEOTRAIN_", "IDENTITY_",
                                "MSI_", "STORAGE_EMULATOR", "SSL_CERT", "REQUESTS_CA"))}
    env.update(bundle_cache())
    env.update(GEOTRAIN_HOME=str(home), NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1",
               AZURE_STORAGE_ACCOUNT_NAME=AZURITE_ACCOUNT, **azure_env(fake), **route)
    try:
        yield env, home, fake, proxy, azurite.bucket
    finally:
        fake.stop()
        proxy.close()


def recipe(container: str, identity: str) -> dict:
    return {"name": "boot-azure",
            "model": {"preset": "tiny", "n_layer": 1, "d_model": 32, "n_head": 2},
            "train": {"rounds": 2, "inner_steps": 3, "batch_size": 2, "seq_len": 32,
                      "warmup_steps": 1, "eval_batches": 1},
            "store": {"url": f"az://{container}/runs"},
            "sync": {"boot_timeout_s": 1800, "max_replacements": 0},
            "sites": [{"name": "east", "provider": "azure", "region": "eastus",
                       "instance_type": "Standard_D2s_v5", "azure": {"identity": identity}}]}


def launch(env: dict, spec: dict, tmp_path: Path) -> str:
    path = tmp_path / "boot.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return cli_json(env, "launch", str(path), "--detach", timeout=180)["run"]


def booted(fake: FakeArm):
    """(the booted VM's node, its IMDS) once there is one."""
    with fake._lock:
        found = list(fake._booter.nodes.items())
        return (found[0][1], fake._booter.metadata[found[0][0]]) if found else None


def booted_by_site(fake: FakeArm) -> dict:
    """{site: (node, its IMDS)} of the VMs booted so far (by the VM's tag geotrain-site)."""
    with fake._lock:
        found = [(node, fake._booter.metadata[iid]) for iid, node in fake._booter.nodes.items()]
    return {{t["name"]: t["value"] for t in imds.compute["tagsList"]}["geotrain-site"]: (node, imds)
            for node, imds in found}


def events(env: dict, run_id: str) -> list[dict]:
    return [json.loads(line) for line in cli(env, "logs", run_id, "--json").stdout.splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vms_fetch_with_their_managed_identities_install_and_train(cloud, tmp_path):
    """One run, two sites (one boot each; each boot costs a minute of CI):
    - east runs as a user-assigned identity granted on the account by the operator;
    - west as its own system identity, which launch grants the run store's container
      under a condition (its run's folder only, no delete) that the store enforces
      (tests/fakes/azure_abac.py).
    Both fetch geotrain as themselves, install it and train to the end."""
    from providers.azure.network import store_condition

    env, home, fake, proxy, container = cloud
    spec = recipe(container, UAI)
    west = copy.deepcopy(spec["sites"][0])
    west["name"] = "west"
    west["azure"] = {"identity": "system", "store_scope": (
        f"/subscriptions/{fake.subscription}/resourceGroups/data/providers/Microsoft.Storage/"
        f"storageAccounts/{AZURITE_ACCOUNT}/blobServices/default/containers/{container}")}
    spec["sites"].append(west)
    t0 = time.monotonic()
    run_id = launch(env, spec, tmp_path)
    vms = wait_for(lambda: (lambda v: v if len(v) == 2 else None)(booted_by_site(fake)), 120, every=0.5)
    # Read while the VM lives: a finished run's nodes are terminated and their grants revoked.
    [grant] = wait_for(lambda: fake.resources("Microsoft.Authorization/roleAssignments"), 120, every=0.2)
    assert grant["properties"]["condition"] == store_condition(f"runs/{run_id}", "west")
    final = wait_succeeded(env, home, run_id, lambda: "\n".join(
        n.console_text()[-3000:] for n, _ in vms.values()), PATIENCE_S)
    assert final["rounds_done"] == 2 and final["eval_loss"] is not None
    for node, _ in vms.values():
        text = node.console_text()
        assert "geotrain-0.1.0-py3-none-any.whl verified" in text and fatal_line(text) is None, text
        if netns.available() is None:  # its own network (tests/fakes/netns.py), where possible
            assert node.network == "isolated" and node.link.stats.bytes_out > 0
    # The custom data named az:// blobs and the account, not SAS URLs: each VM read them
    # as itself.
    for body in fake.bodies("PUT", "virtualMachines"):
        custom = base64.b64decode(body["properties"]["osProfile"]["customData"]).decode()
        assert f"WHEEL_URL=az://{container}/runs/{run_id}/_boot/" in custom, custom
        assert f"STORE_ACCOUNT={AZURITE_ACCOUNT}\n" in custom and "sig=" not in custom
    starting = {e["source"].split("~")[0]: e for e in events(env, run_id) if e["kind"] == "starting"}
    for site, (node, _) in vms.items():
        assert starting[site]["geotrain"].startswith(str(Path(node.root) / "opt" / "geotrain"))
    # east: everything it did in the store it did with tokens its own IMDS issued to it
    # as the user-assigned identity (the proxy refuses any other).
    east_node, east_imds = vms["east"]
    by_east = [r for r in proxy.requests if r["vm"] == east_imds.compute["name"]]
    assert by_east and {(r["principal"], r["client_id"]) for r in by_east} == {(PRINCIPAL, CLIENT)}
    assert any(r["method"] == "PUT" for r in by_east)  # it wrote, not only read
    assert east_imds.token_requests >= 2  # the boot fetch, then azure-identity in geotrain
    assert not proxy.denied(), proxy.denied()
    # west: as its system identity, allowed only in its own folder; it never asked to delete.
    by_west = [r for r in proxy.requests if r["principal"] == grant["properties"]["principalId"]]
    assert by_west and any(r["method"] == "PUT" for r in by_west)
    assert all(r["path"].startswith(f"/{AZURITE_ACCOUNT}/{container}/runs/{run_id}/") or
               r["path"] == f"/{AZURITE_ACCOUNT}/{container}" for r in by_west)
    assert not [r for r in by_west if r["method"] == "DELETE"]
    assert not proxy.condition_errors, proxy.condition_errors
    cli(env, "down", run_id, timeout=120)
    for node, _ in vms.values():
        wait_for(lambda node=node: not tagged_pids(node.instance_id), 120, every=0.5)
    assert not fake.resources("Microsoft.Authorization/roleAssignments")  # revoked with the VM
    print(f"\nboot-azure: launch to succeeded {time.monotonic() - t0:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_vm_whose_identity_cannot_use_the_store_is_reported_not_silent(cloud, tmp_path):
    """The VM runs as its own system-assigned identity, which nobody granted on the
    account (no `store_scope`: the operator was to grant it): the store answers 403, the
    VM says so on its console, the controller reads it through boot diagnostics and the
    site is lost with that reason — long before boot_timeout_s (1800 s here)."""
    env, home, fake, proxy, container = cloud
    run_id = launch(env, recipe(container, "system"), tmp_path)
    node, imds = wait_for(lambda: booted(fake), 120, every=0.5)
    wait_for(lambda: fatal_line(node.console_text()), PATIENCE_S, every=0.5)
    printed = time.monotonic()
    said = fatal_line(node.console_text())
    assert said.startswith("could not fetch geotrain-0.1.0-py3-none-any.whl from the run store"), said
    # In the store's own words, and not retried: no access does not pass by waiting.
    assert "HTTP 403" in said and "AuthorizationPermissionMismatch" in said, said
    by_node = [r for r in proxy.requests if r["principal"] != "operator"]
    assert len(by_node) == 1 and by_node[0]["denied"], by_node
    vm = fake.get(imds.compute["resourceId"])
    assert (by_node[0]["principal"], by_node[0]["status"]) == (vm["identity"]["principalId"], 403)

    def lost():
        found = [e for e in events(env, run_id) if e["kind"] == "site-lost"]
        return found[0] if found else None
    event = wait_for(lost, PATIENCE_S, every=0.5)
    reported_s = time.monotonic() - printed
    assert event["reason"] == f"node failed to boot: {said}", event
    [site] = wait_for(lambda: (lambda s: s["sites"] if s["sites"][0]["lost"] else None)(
        cli_json(env, "status", run_id)), PATIENCE_S, every=0.5)
    assert site["lost"]["reason"] == event["reason"], site
    # max_replacements 0: the run fails, saying why.
    s = wait_for(lambda: (lambda s: s if s["state"] == "failed" else None)(cli_json(env, "status", run_id)),
                 PATIENCE_S, every=1.0)
    assert "could not fetch" in s["error"], s
    cli(env, "down", run_id, timeout=120)
    wait_for(lambda: not tagged_pids(node.instance_id), 120, every=0.5)
    print(f"\nnot granted: reported {reported_s:.1f} s after the node printed it")


def test_an_az_store_takes_its_blob_endpoint_from_the_environment_https_only(monkeypatch):
    """adlfs reads the account but not the endpoint from the environment; geotrain takes
    it from AZURE_STORAGE_SERVICE_ENDPOINT (the az CLI's name), https only, and a
    connection string's own endpoint wins. The store knows its account (a node is told it)."""
    from geotrain.errors import StoreError
    from geotrain.store import ObjectStore
    from geotrain.store.objects import backend_options

    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_KEY",
                 "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "geotrainruns")
    monkeypatch.setenv("AZURE_STORAGE_SERVICE_ENDPOINT", "https://127.0.0.1:9/geotrainruns")
    store = ObjectStore("az://runs/r1", skip_instance_cache=True)
    assert store.azure_account == "geotrainruns" and store.fs.account_url == "https://127.0.0.1:9/geotrainruns"
    assert "AZURE_STORAGE_SERVICE_ENDPOINT" in store.settings()["environment"]
    assert ObjectStore("file:///tmp/x").azure_account is None

    endpoint = {"AZURE_STORAGE_SERVICE_ENDPOINT": "https://127.0.0.1:8443/devstoreaccount1/"}
    assert backend_options("az", endpoint) == {"account_host": "127.0.0.1:8443/devstoreaccount1"}
    assert backend_options("az", {}) == {} and backend_options("gs", endpoint) == {}
    assert backend_options("az", {**endpoint, "AZURE_STORAGE_CONNECTION_STRING": "x"}) == {}
    with pytest.raises(StoreError, match="not an https:// blob endpoint"):
        backend_options("az", {"AZURE_STORAGE_SERVICE_ENDPOINT": "http://127.0.0.1:10000/a"})
