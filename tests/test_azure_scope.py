"""An Azure node may touch only its own run's folder of the run store, and delete nothing
(issue 12): the role assignment condition geotrain writes (providers/azure/network.py
`store_condition`), and the evaluator the test store proxy enforces it with
(tests/fakes/azure_abac.py).

First the evaluator alone, on conditions from Azure's own Blob Storage examples; then
geotrain's condition through the proxy in front of Azurite with geotrain's own store
calls (adlfs); then a launch on the ARM stand-in whose role assignment, read back from
ARM, is what the proxy enforces. The boot test that trains under it is in
tests/test_boot_azure.py.

Run: .venv/bin/python -m pytest -q tests/test_azure_scope.py
"""

from __future__ import annotations

import time

import pytest

import providers.azure as az
from geotrain.errors import ProviderError
from providers.azure.network import BLOB_CONTRIBUTOR, store_condition, store_prefix
from tests.cloud_helpers import define_node_store_role
from tests.emulators import AZURITE_ACCOUNT
from tests.fakes.azure_abac import BLOBS, ConditionError, blob_request, evaluate, parse
from tests.fakes.azure_boot import NodeTokens
from tests.fakes.azure_identity import AUDIENCE, AzureIdentityProxy
from tests.test_provider_azure import arm, plan  # noqa: F401 - the ARM stand-in fixture

READ, WRITE, DELETE = f"{BLOBS}/read", f"{BLOBS}/write", f"{BLOBS}/delete"
NAMED_PATH_READ = (  # Azure's example "Read blobs in named containers with a path"
    "((!(ActionMatches{'" + READ + "'} AND NOT SubOperationMatches{'Blob.List'})) OR "
    "(@Resource[Microsoft.Storage/storageAccounts/blobServices/containers:name] StringEquals "
    "'blobs-example-container' AND @Resource[" + BLOBS + ":path] StringLike 'readonly/*'))")
NAMED_CONTAINERS = (  # "Read, write, or delete blobs in named containers" (Contributor)
    "((!(ActionMatches{'" + DELETE + "'}) AND !(ActionMatches{'" + READ + "'}) AND "
    "!(ActionMatches{'" + WRITE + "'}) AND !(ActionMatches{'" + BLOBS + "/add/action'})) OR "
    "(@Resource[Microsoft.Storage/storageAccounts/blobServices/containers:name] StringEquals "
    "'blobs-example-container'))")
LIST_WITH_PATH = (  # "Read or list blobs in named containers with a path", its list half
    "((!(ActionMatches{'" + READ + "'} AND SubOperationMatches{'Blob.List'})) OR "
    "(@Request[" + BLOBS + ":prefix] StringStartsWith 'readonly/'))")


def req(method: str, path: str, query: str = ""):
    return blob_request(method, path, query)[2]


def test_the_evaluator_on_azures_example_conditions():
    assert evaluate(NAMED_PATH_READ, req("GET", "/acct/blobs-example-container/readonly/a.txt"))
    assert not evaluate(NAMED_PATH_READ, req("GET", "/acct/blobs-example-container/Ungranted.txt"))
    assert not evaluate(NAMED_PATH_READ, req("HEAD", "/acct/other/readonly/a.txt"))
    assert evaluate(NAMED_PATH_READ, req("PUT", "/acct/other/x"))  # not a read: untouched
    # A listing has no blob path: the read-a-blob condition does not apply to it ...
    listing = req("GET", "/acct/other", "restype=container&comp=list&prefix=readonly/")
    assert (listing.action, listing.suboperation) == (READ, "Blob.List")
    assert evaluate(NAMED_PATH_READ, listing)
    # ... the list condition does, on the listing's prefix; without one it is refused.
    assert evaluate(LIST_WITH_PATH, listing)
    assert not evaluate(LIST_WITH_PATH, req("GET", "/acct/c", "restype=container&comp=list&prefix=x/"))
    assert not evaluate(LIST_WITH_PATH, req("GET", "/acct/c", "restype=container&comp=list"))
    for method in ("GET", "PUT", "DELETE"):
        assert evaluate(NAMED_CONTAINERS, req(method, "/acct/blobs-example-container/a/b"))
        assert not evaluate(NAMED_CONTAINERS, req(method, "/acct/ungranted/a/b"))
    # ActionMatches takes a wildcard, case-insensitively; && || and NOT are spellings too.
    assert evaluate("ActionMatches{'microsoft.storage/*/blobs/*'}", req("DELETE", "/a/c/b"))
    assert not evaluate("ActionMatches{'" + BLOBS + "/read'} && !ActionMatches{'" + READ + "'}",
                        req("GET", "/a/c/b"))
    assert evaluate("NOT (ActionMatches{'" + READ + "'} || ActionMatches{'" + WRITE + "'})",
                    req("DELETE", "/a/c/b"))
    # The path attribute is the blob's name, URL-decoded, without container or slash.
    spaced = req("GET", "/acct/c/runs/my%20run/x")
    assert evaluate("@Resource[" + BLOBS + ":path] StringEquals 'runs/my run/x'", spaced)


@pytest.mark.parametrize("bad", [
    "ActionMatches{'" + READ + "'} AND ActionMatches{'x'} OR ActionMatches{'y'}",  # needs ( )
    "ActionMatch{'" + READ + "'}",                                      # unknown function
    "@Resource[" + BLOBS + ":path] StringBeginsWith 'a/'",              # unknown operator
    "@Resource[" + BLOBS + ":pth] StringStartsWith 'a/'",               # unknown attribute
    "@Resource[" + BLOBS + ":path] StringStartsWith \"a/\"",            # double quotes
    "@Resource[" + BLOBS + ":path] StringStartsWith 'a\\'",             # a backslash
    "(ActionMatches{'" + READ + "'}",                                   # unclosed
    "ActionMatches{'" + READ + "'})",                                   # stray token
    "ActionMatches{'" + READ + "'} AND",                                # ends early
    "",
])
def test_the_evaluator_refuses_what_it_does_not_understand(bad):
    with pytest.raises(ConditionError):
        parse(bad)


def test_geotrains_condition_allows_its_run_folder_only_and_no_delete():
    cond = store_condition(store_prefix("az://runs/exp/r1"), "s")
    parse(cond)  # the whole text is understood
    allowed = [req("GET", "/a/runs/exp/r1/run.json"), req("HEAD", "/a/runs/exp/r1/x"),
               req("PUT", "/a/runs/exp/r1/rounds/000001/s.bin"),
               req("GET", "/a/runs", "restype=container&comp=list&prefix=exp/r1/rounds"),
               req("GET", "/a/runs", "restype=container&comp=list&prefix=exp/r1/"),
               req("PUT", "/a/runs", "restype=container")]  # the role's own, untouched
    refused = [req("GET", "/a/runs/exp/r2/run.json"), req("PUT", "/a/runs/exp/r1x/a"),
               req("PUT", "/a/runs/exp/r1"), req("GET", "/a/runs/run.json"),
               req("DELETE", "/a/runs/exp/r1/rounds/000001/s.bin"), req("DELETE", "/a/runs/exp/r2/a"),
               req("GET", "/a/runs", "restype=container&comp=list&prefix=exp/r2/"),
               req("GET", "/a/runs", "restype=container&comp=list&prefix=exp/r1"),
               req("GET", "/a/runs", "restype=container&comp=list")]
    assert [evaluate(cond, r) for r in allowed] == [True] * len(allowed)
    assert [evaluate(cond, r) for r in refused] == [False] * len(refused)
    assert "StringStartsWith 'exp/r1/'" in cond and "'/" not in cond  # no leading slash
    assert store_prefix("az://c/runs/my run/exp-1/") == "runs/my run/exp-1"
    for url in ("az://c", "az://c/", "s3://b/runs/r1", "az://c/runs/it's", "az://c/a\\b/r"):
        with pytest.raises(ProviderError, match="cannot limit"):
            store_prefix(url)


def test_geotrains_condition_writes_only_what_its_member_writes():
    """Reads cover the whole run folder; writes only the member's own records and
    contributions and the shared round keys (geotrain/store/roster.py member_writes)."""
    cond = store_condition("exp/r1", "east")
    own = ["sites/east/alive", "sites/east/head.json", "sites/east/events.jsonl",
           "rounds/000003/east.json", "rounds/000003/east.bin", "rounds/000003/results/east.json",
           "rounds/000003/_members.json", "rounds/000003/_members.5.json",
           "global/000003/model.safetensors", "global/000003/COMMITTED", "global/000000/_claim"]
    others = ["sites/west/alive", "sites/east~1/heartbeat", "rounds/000003/west.bin",
              "rounds/000003/results/west.json", "rounds/000003/xeast.bin", "run.json",
              "control/roster.json", "control/switch.json", "final/model.safetensors", "events.jsonl",
              "_boot/abc/geotrain.whl"]
    for key in own:
        assert evaluate(cond, req("PUT", f"/a/runs/exp/r1/{key}")), key
    for key in others:
        assert not evaluate(cond, req("PUT", f"/a/runs/exp/r1/{key}")), key
        assert evaluate(cond, req("GET", f"/a/runs/exp/r1/{key}")), key
    with pytest.raises(ProviderError, match="cannot scope writes to the member name"):
        store_condition("exp/r1", "a*b")


class AsyncToken:
    """A fixed bearer token, as azure-core's AsyncTokenCredential (adlfs's clients are async)."""

    def __init__(self, token: str):
        self.token = token

    async def get_token(self, *scopes, **kwargs):
        from azure.core.credentials import AccessToken

        return AccessToken(self.token, int(time.time()) + 3600)

    async def close(self):
        pass


def store_as(token: str, url: str, proxy: AzureIdentityProxy):
    from geotrain.store import ObjectStore
    from geotrain.store_retry import RetryPolicy

    return ObjectStore(url, credential=AsyncToken(token), account_name=AZURITE_ACCOUNT,
                       account_host=proxy.blob_endpoint.split("://", 1)[1],
                       skip_instance_cache=True, retry_policy=RetryPolicy(attempts=1))


def trust(proxy: AzureIdentityProxy, monkeypatch) -> None:
    """Let this process's adlfs trust the proxy's certificate. aiohttp makes its verifying
    SSL context once, at import, so SSL_CERT_FILE (what a node gets) is read too early
    here; the context is swapped for the test's duration instead."""
    import ssl

    import aiohttp.connector

    monkeypatch.setattr(aiohttp.connector, "_SSL_CONTEXT_VERIFIED",
                        ssl.create_default_context(cafile=str(proxy.ca_file)))


def container_scope(container: str) -> str:
    return ("/subscriptions/00000000-0000-0000-0000-0000000000aa/resourceGroups/data/providers/"
            f"Microsoft.Storage/storageAccounts/{AZURITE_ACCOUNT}/blobServices/default/containers/{container}")


def assignment(principal: str, container: str, condition: str | None) -> dict:
    return {"properties": {
        "principalId": principal, "scope": container_scope(container),
        "roleDefinitionId": f"/subscriptions/s/providers/Microsoft.Authorization/roleDefinitions/{BLOB_CONTRIBUTOR}",
        **({"condition": condition, "conditionVersion": "2.0"} if condition else {})}}


def exercise(proxy: AzureIdentityProxy, token: str, container: str, run: str, member: str = "a") -> None:
    """What geotrain's member `member` does with its run's folder (adlfs): write, create,
    read, stat, list; then what it may not: another member's contribution, another run,
    a sibling whose name extends this one, delete."""
    from geotrain.errors import StoreError

    operator = store_as("operator-token", f"az://{container}/runs/other", proxy)
    operator.put("run.json", b"theirs")
    operator.put("../" + run + "x/run.json", b"sibling")
    mine = store_as(token, f"az://{container}/runs/{run}", proxy)
    mine.put(f"rounds/000001/{member}.bin", b"a")
    assert mine.create("rounds/000001/_members.json", b"b")  # first writer wins
    assert not mine.create("rounds/000001/_members.json", b"c")
    assert mine.get(f"rounds/000001/{member}.bin") == b"a"
    assert mine.exists("rounds/000001/_members.json") and not mine.exists(f"rounds/000002/{member}.bin")
    assert mine.listdir("rounds") == ["000001"]
    assert {"_members.json", f"{member}.bin"} <= set(mine.listdir("rounds/000001"))  # the container is shared
    assert not proxy.denied(), proxy.denied()
    with pytest.raises(StoreError):  # another member's contribution: read, never written
        mine.put("rounds/000001/zz.bin", b"forged")
    for other in (f"az://{container}/runs/other", f"az://{container}/runs/{run}x"):
        theirs = store_as(token, other, proxy)
        with pytest.raises(StoreError):
            theirs.get("run.json")
        with pytest.raises(StoreError):
            theirs.put("run.json", b"mine now")
    with pytest.raises(Exception):
        mine.fs.rm_file(f"{container}/runs/{run}/rounds/000001/{member}.bin")
    assert mine.get(f"rounds/000001/{member}.bin") == b"a" and operator.get("run.json") == b"theirs"
    refused = proxy.denied()
    assert {(r["method"], r["status"]) for r in refused} == {("GET", 403), ("PUT", 403), ("DELETE", 403)}
    assert all(f"/runs/{run}/" not in r["path"] or r["method"] == "DELETE"
               or r["path"].endswith("/rounds/000001/zz.bin") for r in refused), refused
    assert not proxy.condition_errors, proxy.condition_errors


@pytest.mark.timeout(120)
def test_through_the_store_a_node_keeps_to_its_run_and_cannot_delete(azurite, monkeypatch):
    tokens, found = NodeTokens(), []
    proxy = AzureIdentityProxy(azurite.endpoint, tokens.info, allowed_tokens={"operator-token"},
                               assignments=lambda: found)
    trust(proxy, monkeypatch)
    try:
        token, _ = tokens.issue("p-node", "c-node", "vm-a", AUDIENCE)
        found.append(assignment("p-node", azurite.bucket,
                                store_condition(store_prefix(f"az://{azurite.bucket}/runs/r1"), "a")))
        exercise(proxy, token, azurite.bucket, "r1")
        # Without the condition the same grant would have let it delete anything.
        found[:] = [assignment("p-node", azurite.bucket, None)]
        store_as(token, f"az://{azurite.bucket}/runs/other", proxy).fs.rm_file(
            f"{azurite.bucket}/runs/other/run.json")
        # A condition the evaluator cannot read refuses, and says so.
        found[:] = [assignment("p-node", azurite.bucket, "ActionMatches{'x'} OOPS")]
        with pytest.raises(Exception):
            store_as(token, f"az://{azurite.bucket}/runs/r1", proxy).get("rounds/000001/a.bin")
        assert proxy.condition_errors and "OOPS" in proxy.condition_errors[0]
    finally:
        proxy.close()


@pytest.mark.timeout(120)
def test_the_grant_launch_makes_through_arm_is_what_the_store_enforces(arm, azurite, monkeypatch):  # noqa: F811
    container = azurite.bucket
    define_node_store_role(arm)  # the operator's one-time step (infra/azure/README.md)
    nodes = az.launch(_plan_with_store(container))
    [vm] = arm.resources("Microsoft.Compute/virtualMachines")
    [grant] = arm.resources("Microsoft.Authorization/roleAssignments")
    site = _plan_with_store(container).site
    assert grant["properties"]["condition"] == store_condition("runs/r1", site)
    assert grant["properties"]["conditionVersion"] == "2.0"
    principal = vm["identity"]["principalId"]
    proxy = AzureIdentityProxy(azurite.endpoint, arm.token_info, allowed_tokens={"operator-token"},
                               assignments=lambda: arm.resources("Microsoft.Authorization/roleAssignments"),
                               role_definitions=lambda: arm.resources("Microsoft.Authorization/roleDefinitions"))
    trust(proxy, monkeypatch)
    try:
        token, _ = arm.tokens.issue(principal, "c-vm", vm["name"], AUDIENCE)
        exercise(proxy, token, container, "r1", member=site)
        az.terminate(nodes)  # revoked with the VM: refused from then on
        assert not arm.resources("Microsoft.Authorization/roleAssignments")
        with pytest.raises(Exception):
            store_as(token, f"az://{container}/runs/r1", proxy).get(f"rounds/000001/{site}.bin")
    finally:
        proxy.close()


def _plan_with_store(container: str):
    import dataclasses

    return dataclasses.replace(plan(nodes=1, zones=(), identity="system",
                                    store_scope=container_scope(container)),
                               store_url=f"az://{container}/runs/r1")
