"""A GCP site whose node really boots: `geotrain launch` → the GCE stand-in creates the
instance → its startup-script runs → it fetches geotrain from a gs:// run store with its
own service account (a token from its metadata server; the operator's credentials here
cannot sign a URL) → installs, verified → trains to the end on the GCS emulator.

Like tests/test_boot_aws.py, nothing of the test process reaches the node but the
stand-in network and its metadata server; its image has geotrain's dependencies, not
geotrain. The store is the GCS emulator behind an identity proxy (tests/fakes/
gcs_identity.py): it accepts a node's requests only with a token the node's own
metadata server issued to a service account granted on the bucket (by
infra/gcp/run-bucket-policy.json: objects under the store's prefix only), and the operator's
own token (the fake's API token, which the CLI's google-auth fetches from the fake's
metadata server). A node whose account is not granted is refused by the store and
reported on its site, not left hanging (a site with no service account at all is refused
by launch itself).

With `gcp.run_account` the node runs as the service account launch made for its site,
and the proxy enforces the bindings launch wrote in the bucket's IAM policy: its run's
folder, not another run's (tests/test_gcp_run_account.py tests the rest of it).

The first tests check the proxy and the per-instance tokens alone (seconds); the boot
tests take minutes.

Run: .venv/bin/python -m pytest -q tests/test_boot_gcp.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

import geotrain.store.objects  # noqa: F401 - gcsfs must not probe for HNS on the emulator
from geotrain.site.node_info import fatal_line
from tests.cloud_helpers import ROOT, cli, cli_json, gcp_env, wait_succeeded
from tests.fakes.gce_boot import BootConfig, GceInstanceMetadata
from tests.fakes.gce_server import FakeGCE
from tests.fakes.gcs_iam import infra_policy
from tests.fakes.gcs_identity import GcsIdentityProxy
from tests.fakes.node import node_image, tagged_pids
from tests.helpers import bundle_cache, wait_for

PATIENCE_S = 600  # a hang detector, not a speed bound
ACCOUNT = "geotrain-node@my-project.iam.gserviceaccount.com"  # granted on the bucket
OUTSIDER = "someone-else@my-project.iam.gserviceaccount.com"  # a real account, not granted
READ_WRITE = "https://www.googleapis.com/auth/devstorage.read_write"
ZONE = "us-central1-a"
PREFIX = "runs"  # the run store's folder in the bucket: gs://<bucket>/runs
NODE_NET = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}


def gcs(url: str, token: str | None, path: str, method: str = "GET") -> tuple[int, dict]:
    """(status, JSON body) of one raw GCS JSON API call through `url`."""
    req = urllib.request.Request(url + path, method=method, data=b"" if method == "POST" else None,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read() or b"{}")


def gcsfs_as(url: str, token: str):
    import gcsfs
    from google.oauth2.credentials import Credentials

    return gcsfs.GCSFileSystem(endpoint_url=url, token=Credentials(token), skip_instance_cache=True)


@pytest.fixture
def store(gcs_emulator):
    """(proxy in front of the emulator, the FakeGCE issuing tokens, bucket); ACCOUNT granted."""
    fake = FakeGCE()
    proxy = GcsIdentityProxy(gcs_emulator.endpoint, fake.token_info,
                             grants={gcs_emulator.bucket: {ACCOUNT}}, allowed_tokens={fake.token})
    try:
        yield proxy, fake, gcs_emulator.bucket
    finally:
        proxy.close()


@pytest.mark.timeout(120)
def test_the_store_takes_granted_accounts_and_the_operator_only(store):
    proxy, fake, bucket = store
    granted, _ = fake.issue_token(ACCOUNT, f"{ZONE}/node-a", [READ_WRITE])
    outsider, _ = fake.issue_token(OUTSIDER, f"{ZONE}/node-b", [READ_WRITE])
    key = f"{bucket}/proxy-check/hello.txt"
    node = gcsfs_as(proxy.url, granted)
    node.pipe(key, b"hello" * 1000)
    assert node.cat(key) == b"hello" * 1000
    assert gcsfs_as(proxy.url, fake.token).cat(key) == b"hello" * 1000  # the operator
    assert not proxy.denied()
    assert {(r["email"], r["instance"]) for r in proxy.requests} == {
        (ACCOUNT, f"{ZONE}/node-a"), ("operator", None)}

    # Not granted: 403, which gcsfs raises at once (no retry), naming who and what.
    with pytest.raises(OSError, match="Forbidden") as refused:
        gcsfs_as(proxy.url, outsider).cat(key)
    assert OUTSIDER in str(refused.value) and "storage.objects.get" in str(refused.value)
    [denial] = proxy.denied()
    assert (denial["email"], denial["instance"], denial["status"]) == (OUTSIDER, f"{ZONE}/node-b", 403)
    status, doc = gcs(proxy.url, outsider, f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name=x",
                      "POST")
    assert status == 403 and doc["error"]["errors"][0]["reason"] == "forbidden"
    assert "storage.objects.create" in doc["error"]["message"]
    # Revoked: the same token is refused from then on.
    proxy.revoke(bucket, ACCOUNT)
    assert gcs(proxy.url, granted, f"/storage/v1/b/{bucket}/o")[0] == 403
    proxy.grant(bucket, ACCOUNT)
    assert gcs(proxy.url, granted, f"/storage/v1/b/{bucket}/o")[0] == 200

    # No token, a token nobody issued, an expired one: 401, as GCS answers.
    expired, _ = fake.issue_token(ACCOUNT, f"{ZONE}/node-a", [READ_WRITE], lifetime_s=0)
    for token in (None, "ya29.made-up", expired):
        status, doc = gcs(proxy.url, token, f"/storage/v1/b/{bucket}/o")
        assert status == 401 and doc["error"]["code"] == 401, (token, doc)
    # Granted, but the token's scopes do not cover storage.
    no_scope, _ = fake.issue_token(ACCOUNT, f"{ZONE}/node-a", ["https://www.googleapis.com/auth/compute"])
    assert gcs(proxy.url, no_scope, f"/storage/v1/b/{bucket}/o")[0] == 403
    # The emulator saw none of the refused calls: the object is still the one written.
    assert gcsfs_as(proxy.url, fake.token).ls(f"{bucket}/proxy-check") == [key]


@pytest.mark.timeout(60)
def test_each_instance_gets_its_own_token_until_it_nears_expiry():
    fake = FakeGCE(token_lifetime_s=3600)
    servers = []

    def metadata(name: str) -> GceInstanceMetadata:
        md = GceInstanceMetadata(
            name=name, instance_id=str(len(servers)), zone=ZONE, project=fake.project,
            project_number=fake.project_number, machine_type="g2-standard-4", attributes={},
            service_account=ACCOUNT, scopes=[READ_WRITE], token=None,
            mint=lambda: fake.issue_token(ACCOUNT, f"{ZONE}/{name}", [READ_WRITE])).start()
        servers.append(md)
        return md

    def token(md) -> dict:
        req = urllib.request.Request(f"{md.url}/computeMetadata/v1/instance/service-accounts/"
                                     "default/token", headers={"Metadata-Flavor": "Google"})
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as r:
            return json.load(r)
    try:
        node_a, node_b = metadata("node-a"), metadata("node-b")
        a, b = token(node_a), token(node_b)
        assert a["access_token"] != b["access_token"] != fake.token
        assert 3500 < a["expires_in"] <= 3600
        assert fake.token_info(a["access_token"])["instance"] == f"{ZONE}/node-a"
        assert fake.token_info(b["access_token"])["email"] == ACCOUNT
        assert token(node_a)["access_token"] == a["access_token"]  # handed out again while fresh
        # A token with under GCE's 5 minutes of reuse left is replaced at the next ask.
        fake.token_lifetime_s = 60
        node_c = metadata("node-c")
        c = token(node_c)
        assert c["expires_in"] <= 60 and token(node_c)["access_token"] != c["access_token"]
        assert fake.token_for(ACCOUNT) == list(fake.access_tokens)[-1]
        assert fake.token_info("ya29.made-up") is None
    finally:
        for md in servers:
            md.stop()


@pytest.fixture
def cloud(gcs_emulator, tmp_path):
    """(env for the CLI, home, fake GCE that boots, the store's identity proxy, bucket):
    operator and nodes reach the emulator only through the proxy, ACCOUNT granted by
    infra/gcp/run-bucket-policy.json itself (objects under PREFIX/ only, list on the
    bucket), which the proxy enforces per object name."""
    fake = FakeGCE()
    proxy = GcsIdentityProxy(gcs_emulator.endpoint, fake.token_info, allowed_tokens={fake.token})
    proxy.apply_policy(gcs_emulator.bucket, *infra_policy(gcs_emulator.bucket, PREFIX))
    route = {"STORAGE_EMULATOR_HOST": proxy.url}  # the route to "GCS"
    fake.enable_boot(BootConfig(node_image(tmp_path / "image"), tmp_path / "nodes",
                                {**NODE_NET, **route}))
    fake.start()
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "GOOGLE_", "GCE_", "AZURE_", "GEOTRAIN_", "IDENTITY_",
                                "MSI_", "STORAGE_EMULATOR"))}
    env.update(bundle_cache())
    env.update(GEOTRAIN_HOME=str(home), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
               NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1", **gcp_env(fake), **route)
    try:
        yield env, home, fake, proxy, gcs_emulator.bucket
    finally:
        fake.stop()
        proxy.close()


def recipe(bucket: str, account: str | None) -> dict:
    return {"name": "boot-gcp",
            "model": {"preset": "tiny", "n_layer": 1, "d_model": 32, "n_head": 2},
            "train": {"rounds": 2, "inner_steps": 3, "batch_size": 2, "seq_len": 32,
                      "warmup_steps": 1, "eval_batches": 1},
            "store": {"url": f"gs://{bucket}/{PREFIX}"},
            "sync": {"boot_timeout_s": 1800, "max_replacements": 0},
            "sites": [{"name": "west", "provider": "gcp", "region": "us-central1",
                       "zones": [ZONE], "instance_type": "g2-standard-4",
                       "gcp": {"service_account": account} if account else {}}]}


def launch(env: dict, spec: dict, tmp_path: Path) -> str:
    path = tmp_path / "boot.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return cli_json(env, "launch", str(path), "--detach", timeout=180)["run"]


def booted(fake: FakeGCE):
    with fake._lock:
        return next(iter(fake._booter.nodes.values()), None)


def events(env: dict, run_id: str) -> list[dict]:
    return [json.loads(line) for line in cli(env, "logs", run_id, "--json").stdout.splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_gce_node_fetches_with_its_service_account_installs_and_trains(cloud, tmp_path):
    env, home, fake, proxy, bucket = cloud
    t0 = time.monotonic()
    run_id = launch(env, recipe(bucket, ACCOUNT), tmp_path)
    node = wait_for(lambda: booted(fake), 120, every=0.5)
    # What the controller reads when a node cannot boot: its console, through the API
    # (in a process of its own: google-auth fixes the metadata address at import).
    read_console = ("import sys, providers; gcp = providers.get('gcp'); "
                    "[n] = gcp.query(sys.argv[1]); print(gcp.console(n))")

    def console_says_verified():
        out = subprocess.run([sys.executable, "-c", read_console, run_id], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return "verified" in out.stdout
    wait_for(console_says_verified, PATIENCE_S, every=1.0)

    final = wait_succeeded(env, home, run_id, lambda: node.console_text()[-3000:], PATIENCE_S)
    assert final["rounds_done"] == 2 and final["eval_loss"] is not None
    text = node.console_text()
    assert "geotrain-0.1.0-py3-none-any.whl verified" in text and fatal_line(text) is None, text
    # The boot data named gs:// objects, not signed URLs: the node read them as itself.
    [body] = fake.bodies("POST", "/instances")  # the insert request (the instance is gone now)
    startup = next(item["value"] for item in body["metadata"]["items"]
                   if item["key"] == "startup-script")
    assert f"WHEEL_URL=gs://{bucket}/runs/{run_id}/_boot/" in startup
    [starting] = [e for e in events(env, run_id) if e["kind"] == "starting"]
    assert starting["geotrain"].startswith(str(Path(node.root) / "opt" / "geotrain"))
    # Everything the node did in the store it did with tokens its own metadata server
    # issued to it as ACCOUNT (the proxy refuses any other).
    instance = f"{ZONE}/{body['name']}"
    by_node = [r for r in proxy.requests if r["email"] != "operator"]
    assert by_node and {(r["email"], r["instance"]) for r in by_node} == {(ACCOUNT, instance)}
    assert any(r["method"] == "POST" for r in by_node)  # it wrote, not only read
    # ... and the prefix-scoped policy sufficed: nothing refused, nothing unjudgeable.
    assert not proxy.denied() and not proxy.errors, (proxy.denied(), proxy.errors)
    cli(env, "down", run_id, timeout=120)
    wait_for(lambda: not tagged_pids(node.instance_id), 120, every=0.5)
    print(f"\nboot-gcp: launch to succeeded {time.monotonic() - t0:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_node_whose_account_cannot_use_the_store_is_reported_not_silent(cloud, tmp_path):
    """The node runs as a service account that is not granted on the bucket (launch
    refuses a GCP site with none at all before creating anything): the store answers
    403, the node says so on its console, the controller reads it there and the site is
    lost with that reason — long before boot_timeout_s (1800 s here)."""
    env, home, fake, proxy, bucket = cloud
    run_id = launch(env, recipe(bucket, OUTSIDER), tmp_path)
    node = wait_for(lambda: booted(fake), 120, every=0.5)
    wait_for(lambda: fatal_line(node.console_text()), PATIENCE_S, every=0.5)
    printed = time.monotonic()
    said = fatal_line(node.console_text())
    assert said.startswith("could not fetch geotrain-0.1.0-py3-none-any.whl from the run store"), said
    # In the store's own words (who, which permission), and not retried: no access
    # does not pass by waiting.
    assert "HTTP 403" in said and f"{OUTSIDER} does not have storage.objects.get" in said, said
    # The store itself refused it, knowing whose token it was, and let nothing through.
    by_node = [r for r in proxy.requests if r["email"] != "operator"]
    assert len(by_node) == 1 and by_node[0]["denied"], by_node
    assert {(r["email"], r["status"]) for r in by_node} == {(OUTSIDER, 403)}, by_node

    def lost():
        found = [e for e in events(env, run_id) if e["kind"] == "site-lost"]
        return found[0] if found else None
    event = wait_for(lost, PATIENCE_S, every=0.5)
    reported_s = time.monotonic() - printed
    assert event["reason"] == f"node failed to boot: {said}", event
    # The site's state says why too (what `geotrain status` shows).
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


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_node_under_a_run_account_keeps_to_its_run_folder(cloud, tmp_path):
    """gcp.run_account: launch makes the site its own service account and grants it, in
    the bucket's IAM policy (served and enforced by the proxy), its run's folder only. The
    node boots and trains as that account, nothing refused; with its own token it is
    refused another run's folder of the same bucket; `down` removes account and bindings.
    The run has more rounds than the test waits for, so the grant is there while probed."""
    from providers.gcp import accounts

    env, home, fake, proxy, bucket = cloud
    # The bucket's standing policy, its custom lister role in the fake's project.
    proxy.apply_policy(bucket, *infra_policy(bucket, PREFIX, project=fake.project))
    standing = len(proxy.policies[bucket]["bindings"])
    fake.accounts_must_exist = True  # the instance's account must be one IAM made
    env = {**env, accounts.ENDPOINT_ENV: fake.url}
    spec = recipe(bucket, None)
    spec["sites"][0]["gcp"] = {"run_account": True}
    spec["train"]["rounds"] = 10000
    run_id = launch(env, spec, tmp_path)
    node = wait_for(lambda: booted(fake), 120, every=0.5)
    email = accounts.account_email(fake.project, run_id, "west")
    assert accounts.parse_account(fake.service_accounts[email])["run"] == run_id
    [body] = fake.bodies("POST", "/instances")
    assert [a["email"] for a in body["serviceAccounts"]] == [email]
    wait_for(lambda: (cli_json(env, "status", run_id).get("rounds_done") or 0) >= 1
             or fatal_line(node.console_text()), PATIENCE_S, every=1.0)
    assert fatal_line(node.console_text()) is None, node.console_text()[-3000:]
    # It fetched, installed and trained a round in its run's folder as the run account.
    by_node = [r for r in proxy.requests if r["email"] not in ("operator", None)]
    assert by_node and {r["email"] for r in by_node} == {email}
    assert any(r["method"] == "POST" for r in by_node)  # it wrote, not only read
    assert not proxy.denied() and not proxy.errors, (proxy.denied(), proxy.errors)
    # Its own token: its run's folder yes, another run's folder of the same bucket no.
    token = fake.token_for(email)
    assert gcs(proxy.url, token, f"/storage/v1/b/{bucket}/o/{PREFIX}%2F{run_id}%2Frun.json")[0] == 200
    gcsfs_as(proxy.url, fake.token).pipe(f"{bucket}/{PREFIX}/other-run/run.json", b"{}")
    status, doc = gcs(proxy.url, token, f"/storage/v1/b/{bucket}/o/{PREFIX}%2Fother-run%2Frun.json")
    assert status == 403 and f"{email} does not have storage.objects.get" in doc["error"]["message"]
    status, _ = gcs(proxy.url, token, f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
                    f"{PREFIX}%2Fother-run%2Fx", "POST")
    assert status == 403
    # In its own run's folder it writes only what its site writes: not run.json, not
    # another site's liveness (geotrain/store/roster.py member_writes).
    for key in ("run.json", "sites%2Feast%2Falive"):
        status, _ = gcs(proxy.url, token, f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
                        f"{PREFIX}%2F{run_id}%2F{key}", "POST")
        assert status == 403, key
    cli(env, "down", run_id, timeout=120)
    wait_for(lambda: not tagged_pids(node.instance_id), 120, every=0.5)
    assert email not in fake.service_accounts
    bindings = proxy.policies[bucket]["bindings"]
    assert len(bindings) == standing and not any(f"serviceAccount:{email}" in b["members"]
                                                 for b in bindings)
