"""The GCE stand-in boots what it creates (tests/fakes/gce_server.py + gce_boot.py).

Instances are created and deleted through the real google-cloud-compute
`InstancesClient` (REST) against FakeGCE with booting on. Each instance's
`startup-script` runs as a process tree of its own (tests/fakes/node.py) that asks
its own metadata server for its name and, through google-auth's Compute Engine
credentials, for a token, writes what it got under its root and sleeps forever.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from geotrain.site.preemption import NoticeThread
from providers.gcp.watcher import GceWatcher
from tests.fakes.gce_boot import BootConfig
from tests.fakes.gce_server import FakeGCE
from tests.fakes.node import node_image, tagged_pids
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(180)

ZONE = "us-central1-a"
# In the test process only: a node must never see it.
TEST_SECRET_VARS = {"GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/test-process-adc.json",
                    "AWS_SECRET_ACCESS_KEY": "test-process-secret"}

REPORT = r'''
import json, os, urllib.request
base = os.environ["GEOTRAIN_METADATA_ENDPOINT"] + "/computeMetadata/v1/"
def md(path):
    req = urllib.request.Request(base + path, headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()
out = {"name": md("instance/name"), "zone": md("instance/zone"),
       "ip": md("instance/network-interfaces/0/ip"), "role": md("instance/attributes/role"),
       "project": md("project/project-id"), "env": sorted(os.environ)}
import google.auth.compute_engine
import google.auth.transport.requests
try:
    creds = google.auth.compute_engine.Credentials()
    creds.refresh(google.auth.transport.requests.Request())
    out.update(token=creds.token, email=creds.service_account_email)
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
root = os.environ["GEOTRAIN_NODE_ROOT"]
with open(root + "/report.tmp", "w") as f:
    json.dump(out, f)
os.replace(root + "/report.tmp", root + "/report.json")
'''

STARTUP = f"""#!/bin/bash
set -u
python3 - <<'EOF'
{REPORT}
EOF
setsid sleep infinity &   # leaves the process group: only the node tag finds it
sleep infinity
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    for k, v in TEST_SECRET_VARS.items():
        monkeypatch.setenv(k, v)
    config = BootConfig(node_image(tmp_path / "image"), tmp_path / "nodes",
                        node_env={"GEOTRAIN_STORE_HINT": "http://127.0.0.1:1"})
    gce = FakeGCE(boot=config)
    gce.start()
    try:
        yield gce
    finally:
        gce.stop()


class Clients:
    """InstancesClient + ZoneOperationsClient on the fake (an operation's own `result()`
    would poll compute.googleapis.com)."""

    def __init__(self, fake: FakeGCE):
        from google.api_core.client_options import ClientOptions
        from google.cloud import compute_v1
        from google.oauth2.credentials import Credentials

        kw = {"credentials": Credentials(token=fake.token), "transport": "rest",
              "client_options": ClientOptions(api_endpoint=fake.url)}
        self.instances = compute_v1.InstancesClient(**kw)
        self.ops = compute_v1.ZoneOperationsClient(**kw)
        self.project = fake.project

    def done(self, op) -> None:
        for _ in range(20):
            status = self.ops.wait(project=self.project, zone=ZONE, operation=op.name).status
            if status == status.DONE:
                return
        raise AssertionError(f"operation {op.name} never finished")

    def delete(self, name: str) -> None:
        self.done(self.instances.delete(project=self.project, zone=ZONE, instance=name))


@pytest.fixture
def client(fake):
    return Clients(fake)


def insert(client, fake, name: str, service_account: bool, script: str = STARTUP) -> None:
    from google.cloud import compute_v1

    body = {
        "name": name, "machineType": f"zones/{ZONE}/machineTypes/e2-small",
        "disks": [{"boot": True, "autoDelete": True, "initializeParams": {
            "sourceImage": "projects/debian-cloud/global/images/family/debian-12"}}],
        "networkInterfaces": [{"network": "global/networks/default"}],
        "metadata": {"items": [{"key": "startup-script", "value": script},
                               {"key": "role", "value": f"{name}-role"}]},
    }
    if service_account:
        body["serviceAccounts"] = [{"email": "default",
                                    "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}]
    resource = compute_v1.Instance.from_json(json.dumps(body))
    client.done(client.instances.insert(project=fake.project, zone=ZONE,
                                        instance_resource=resource))
    assert client.instances.get(project=fake.project, zone=ZONE, instance=name).status == "RUNNING"


def report(fake, name: str) -> dict:
    node = fake.node(name)
    path = node.root / "report.json"
    try:
        wait_for(path.exists, timeout=90, every=0.2)
    except TimeoutError:
        raise AssertionError(f"{name} wrote no report; console:\n{node.console_text()}") from None
    return json.loads(path.read_text())


def metadata_get(url: str, path: str, **headers) -> tuple[int, dict, str]:
    req = urllib.request.Request(f"{url}/computeMetadata/v1/{path}", headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers), e.read().decode()


def test_instance_with_service_account_boots_and_gets_a_token(fake, client):
    insert(client, fake, "node-sa", service_account=True)
    got = report(fake, "node-sa")
    # Its private address: the instance's networkIP where it has a network of its own
    # (tests/fakes/netns.py), else this machine's loopback.
    [nic] = client.instances.get(project=fake.project, zone=ZONE, instance="node-sa").network_interfaces
    want = nic.network_i_p if fake.node("node-sa").network == "isolated" else "127.0.0.1"
    assert got["name"] == "node-sa" and got["ip"] == want == fake.node("node-sa").private_ip
    assert got["zone"] == f"projects/{fake.project_number}/zones/{ZONE}"
    assert got["role"] == "node-sa-role" and got["project"] == fake.project
    assert "error" not in got, got.get("error")
    assert got["token"] == fake.token_for(fake.service_account) != fake.token
    assert got["email"] == fake.service_account
    md = fake.metadata_server("node-sa")
    assert md.token_requests >= 1
    # What the node's environment held: the stand-in's variables and node_env, never
    # a credential of the test process.
    env = set(got["env"])
    assert {"GCE_METADATA_HOST", "GCE_METADATA_IP", "GEOTRAIN_METADATA_ENDPOINT", "NO_PROXY",
            "GEOTRAIN_STORE_HINT"} <= env
    assert not env & set(TEST_SECRET_VARS)
    # The metadata server wants the flavor header and refuses forwarded requests.
    assert metadata_get(md.url, "instance/name")[0] == 403
    assert metadata_get(md.url, "instance/name", **{"Metadata-Flavor": "Google",
                                                    "X-Forwarded-For": "10.0.0.1"})[0] == 403
    status, headers, body = metadata_get(md.url, "instance/service-accounts/default/email",
                                         **{"Metadata-Flavor": "Google"})
    assert (status, headers["Metadata-Flavor"], body) == (200, "Google", fake.service_account)
    status, _, body = metadata_get(md.url, "instance/service-accounts/",
                                   **{"Metadata-Flavor": "Google"})
    assert status == 200 and "default/" in body.split()


def test_instance_without_service_account_is_refused_a_token(fake, client):
    insert(client, fake, "node-bare", service_account=False)
    got = report(fake, "node-bare")
    assert got["name"] == "node-bare"
    assert "token" not in got and "error" in got, got
    md = fake.metadata_server("node-bare")
    for path in ("instance/service-accounts/", "instance/service-accounts/default/token",
                 "instance/service-accounts/default/email"):
        assert metadata_get(md.url, path, **{"Metadata-Flavor": "Google"})[0] == 404, path
    assert md.token_requests == 0


def test_preempt_is_seen_by_the_gcp_watcher(fake, client):
    insert(client, fake, "node-spot", service_account=True)
    md = fake.metadata_server("node-spot")
    status, headers, body = metadata_get(md.url, "instance/preempted", **{"Metadata-Flavor": "Google"})
    assert (status, body) == (200, "FALSE") and headers.get("ETag")
    # A long wait: the notice must come from a hanging GET woken by the change.
    watcher = GceWatcher(md.url, wait_s=120)
    thread = NoticeThread(watcher).start()
    try:
        wait_for(md.waiting, timeout=30, every=0.1)
        assert not thread.fired.is_set()
        fake.preempt("node-spot")
        assert thread.fired.wait(20), "the watcher did not see the preemption"
        assert thread.notice.provider == "gcp" and thread.notice.kind == "preempt"
    finally:
        thread.stop()
    status, headers2, body = metadata_get(md.url, "instance/preempted", **{"Metadata-Flavor": "Google"})
    assert body == "TRUE" and headers2["ETag"] != headers["ETag"]


def test_delete_ends_the_whole_process_tree(fake, client):
    insert(client, fake, "node-del", service_account=False)
    report(fake, "node-del")
    node = fake.node("node-del")
    md_url = fake.metadata_server("node-del").url
    wait_for(lambda: len(tagged_pids(node.instance_id)) >= 3, timeout=30, every=0.2)  # bash + 2 sleeps
    client.delete("node-del")
    wait_for(lambda: not tagged_pids(node.instance_id) and not node.running(), timeout=60,
             every=0.3)
    # Its metadata server went with it.
    wait_for(lambda: _refused(md_url), timeout=30, every=0.3)


def _refused(url: str) -> bool:
    try:
        metadata_get(url, "instance/name", **{"Metadata-Flavor": "Google"})
    except OSError:
        return True
    return False


def test_stop_leaves_no_process(client, fake):
    insert(client, fake, "node-a", service_account=True)
    insert(client, fake, "node-b", service_account=False)
    nodes = [fake.node("node-a"), fake.node("node-b")]
    for n in ("node-a", "node-b"):
        report(fake, n)
    fake.stop()
    for node in nodes:
        assert not tagged_pids(node.instance_id)
        assert not node.running()


def test_booting_is_opt_in():
    gce = FakeGCE()
    gce.start()
    try:
        insert(Clients(gce), gce, "node-plain", service_account=True)
        with pytest.raises(KeyError):
            gce.node("node-plain")
    finally:
        gce.stop()
