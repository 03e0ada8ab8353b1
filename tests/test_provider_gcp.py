"""The GCP provider against a local Compute Engine REST server.

The real `google-cloud-compute` client (REST transport) talks to
tests/fakes/gce_server.py over HTTP; the real google-auth Compute Engine
credentials get their bearer token from the same server's metadata half
(`GCE_METADATA_HOST`), and the fake refuses any API call without it. The
assertions read the JSON bodies the fake received, i.e. what went on the wire.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from geotrain.errors import CapacityError, ProviderError, RecipeError
from geotrain.recipe import GcpOptions, loads
from providers import SitePlan
from tests.conftest import free_port
from tests.fakes.gce_server import FakeGCE

RUN = "demo-20261122-063800-ab12"
STORE = "gs://geotrain-bucket/runs/it's here"
SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"


def _point_metadata_at(monkeypatch, host: str) -> None:
    monkeypatch.setenv("GCE_METADATA_HOST", host)
    monkeypatch.setenv("GCE_METADATA_IP", host)
    # google-auth reads GCE_METADATA_HOST once, at import; another test may
    # have imported it already, so set the value it cached as well.
    from google.auth.compute_engine import _metadata

    monkeypatch.setattr(_metadata, "_GCE_METADATA_HOST", host)


@pytest.fixture
def gce(monkeypatch, tmp_path):
    fake = FakeGCE()
    fake.start()
    try:
        _point_metadata_at(monkeypatch, fake.host)
        monkeypatch.setenv("GEOTRAIN_GCE_ENDPOINT", fake.url)
        monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no user ADC file
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        for var in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT",
                    "GCLOUD_PROJECT"):
            monkeypatch.delenv(var, raising=False)
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def gcp():
    from providers import get

    return get("gcp")


def plan(site="west", nodes=1, spot=True, zones=("us-central1-a", "us-central1-b"),
         run=RUN, instance_type="n1-standard-8", workers=1, **options) -> SitePlan:
    """A plan with the recipe's `gcp:` options (`accelerator=None`: none)."""
    opts = GcpOptions(**{"accelerator": "nvidia-tesla-t4:1", **options})
    return SitePlan(run_id=run, site=site, provider="gcp", store_url=STORE, region="us-central1",
                    zones=zones, nodes=nodes, workers=workers, instance_type=instance_type, spot=spot,
                    provider_options=opts)


def test_import_does_not_load_the_sdk():
    code = ("import sys, providers.gcp; "
            "assert 'google.cloud.compute_v1' not in sys.modules, 'SDK imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_names_follow_gcp_rules(gcp):
    run = "My.Run_" + "x" * 80
    for name in (gcp.network_tag(run, "Site1"), gcp.firewall_name(run, "Site1"),
                 gcp.instance_name(run, "Site1", 3)):
        assert len(name) <= 63 and name[0].isalpha() and name[-1].isalnum()
        assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-"), name
    assert gcp.firewall_name(run, "a") != gcp.firewall_name(run + "y", "a")  # hash keeps unique
    value = gcp.labels(run, "Site1")["geotrain-run"]
    assert len(value) <= 63 and value == value.lower() and "." not in value


def test_spot_launch_sends_the_right_instance(gce, gcp):
    nodes = gcp.launch(plan(nodes=2))
    bodies = gce.bodies("POST", "/zones/us-central1-a/instances")
    assert len(bodies) == 2 and len(nodes) == 2
    tag = gcp.network_tag(RUN, "west")
    scripts = []
    for i, body in enumerate(bodies):
        assert body["name"] == gcp.instance_name(RUN, "west", i)
        assert body["machineType"] == "zones/us-central1-a/machineTypes/n1-standard-8"
        assert body["scheduling"] == {"provisioningModel": "SPOT",
                                      "instanceTerminationAction": "DELETE",
                                      "onHostMaintenance": "TERMINATE",
                                      "automaticRestart": False}
        assert body["guestAccelerators"] == [{
            "acceleratorType": "projects/geotrain-test/zones/us-central1-a/acceleratorTypes/"
                               "nvidia-tesla-t4", "acceleratorCount": 1}]
        assert body["labels"] == {"geotrain-run": RUN, "geotrain-site": "west"}
        assert body["tags"] == {"items": [tag]}
        nic, = body["networkInterfaces"]
        assert nic == {"network": "global/networks/default"}  # no accessConfigs: no external IP
        assert "serviceAccounts" not in body  # none named: no Google identity at all
        disk, = body["disks"]
        assert disk["boot"] and disk["autoDelete"] and disk["initializeParams"]["diskSizeGb"] == "100"
        assert disk["initializeParams"]["sourceImage"].endswith("/global/images/family/"
                                                                "pytorch-latest-gpu")
        meta = {item["key"]: item["value"] for item in body["metadata"]["items"]}
        script = meta["startup-script"]
        assert f"GEOTRAIN_RUN={shlex.quote(RUN)}" in script
        assert f"STORE={shlex.quote(STORE)}" in script and f"GEOTRAIN_NODE_INDEX={i}" in script
        assert meta["install-nvidia-driver"] == "True"
        assert (meta["geotrain-run"], meta["geotrain-site"]) == (RUN, "west")
        scripts.append(script)
    tokens = {line.split("=", 1)[1] for s in scripts for line in s.splitlines()
              if line.startswith("export RAY_AUTH_TOKEN=")}
    assert len(tokens) == 1 and len(tokens.pop()) == 64  # one token per site, only in boot data
    assert [(n.instance_id, n.region, n.state) for n in nodes] == [
        (gcp.instance_name(RUN, "west", i), "us-central1-a", "running") for i in range(2)]
    assert all(n.private_ip.startswith("10.128.") for n in nodes)
    # Every API call carried the metadata server's token (the fake refuses others).
    api = gce.api_requests()
    assert api and all(r.authorization == f"Bearer {gce.token}" for r in api)
    assert any(r.path.endswith("/service-accounts/default/token") for r in gce.requests)


def test_recipe_options_reach_the_wire(gce, gcp):
    account = "geotrain-node@geotrain-test.iam.gserviceaccount.com"
    image = "projects/my-images/global/images/family/geotrain-gpu"
    gcp.launch(plan(service_account=account, network="global/networks/geotrain",
                    subnetwork="regions/us-central1/subnetworks/geotrain", image=image,
                    disk_gb=300))
    body, = gce.bodies("POST", "/instances")
    assert body["serviceAccounts"] == [{"email": account, "scopes": [SCOPE]}]
    assert body["networkInterfaces"] == [{"network": "global/networks/geotrain",
                                          "subnetwork": "regions/us-central1/subnetworks/geotrain"}]
    disk, = body["disks"]
    assert disk["initializeParams"] == {"sourceImage": image, "diskSizeGb": "300"}
    fw, = gce.firewalls.values()
    assert fw["network"] == "global/networks/geotrain"


def test_standard_gpu_machine_and_public_ip_option(gce, gcp):
    gcp.launch(plan(spot=False, instance_type="g2-standard-8", accelerator=None,
                    public_ip=True))
    body, = gce.bodies("POST", "/instances")
    assert body["scheduling"] == {"provisioningModel": "STANDARD",
                                  "onHostMaintenance": "TERMINATE", "automaticRestart": True}
    assert "guestAccelerators" not in body  # g2 carries its L4 implicitly
    assert body["networkInterfaces"][0]["accessConfigs"] == [
        {"name": "External NAT", "type": "ONE_TO_ONE_NAT"}]
    fw, = gce.firewalls.values()
    assert "sourceRanges" not in fw  # an external IP opens no port


def test_cpu_machine_migrates_and_gpu_count_defaults_to_workers(gce, gcp):
    gcp.launch(plan(site="cpu", spot=False, instance_type="n2-standard-8", accelerator=None))
    gcp.launch(plan(site="gpu", workers=4, accelerator="nvidia-tesla-t4"))
    cpu, gpu = gce.bodies("POST", "/instances")
    assert cpu["scheduling"]["onHostMaintenance"] == "MIGRATE"
    assert "install-nvidia-driver" not in {i["key"] for i in cpu["metadata"]["items"]}
    assert gpu["guestAccelerators"][0]["acceleratorCount"] == 4


def test_bad_accelerator_option_is_a_recipe_error():
    with pytest.raises(RecipeError) as e:
        loads("name: x\nsites:\n  - name: a\n    provider: gcp\n    instance_type: n1-standard-8\n"
              "    gcp: {accelerator: 'nvidia-l4:lots'}\n")
    assert (e.value.line, e.value.field) == (6, "sites[0].gcp.accelerator")
    assert "TYPE[:COUNT]" in e.value.message


def test_firewall_admits_only_the_site_itself(gce, gcp):
    gcp.launch(plan())
    tag = gcp.network_tag(RUN, "west")
    rule, = gce.bodies("POST", "/global/firewalls")
    assert rule["name"] == f"{tag}-intra"
    assert rule["direction"] == "INGRESS" and rule["network"] == "global/networks/default"
    assert rule["sourceTags"] == [tag] and rule["targetTags"] == [tag]
    assert rule["allowed"] == [{"IPProtocol": "all"}]
    assert not any("sourceRanges" in fw for fw in gce.firewalls.values())


@pytest.mark.parametrize("via", ["http", "operation"])
def test_zone_failover_on_pool_exhausted(gce, gcp, via):
    gce.fail_zone("us-central1-a", "ZONE_RESOURCE_POOL_EXHAUSTED", via=via)
    nodes = gcp.launch(plan(nodes=2))
    assert {n.region for n in nodes} == {"us-central1-b"}
    assert sorted(gce.instances) == [("us-central1-b", n.instance_id) for n in nodes]


def test_partial_site_in_a_zone_is_cleaned_up(gce, gcp):
    gce.fail_zone("us-central1-a", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", via="operation",
                  after=1)
    nodes = gcp.launch(plan(nodes=2))
    assert {n.region for n in nodes} == {"us-central1-b"}
    assert len(gce.bodies("POST", "/zones/us-central1-a/instances")) == 2
    assert [r for r in gce.requests if r.method == "DELETE" and "us-central1-a" in r.path]
    assert all(zone == "us-central1-b" for zone, _ in gce.instances)


def test_region_without_zones_tries_the_regions_zones_in_order(gce, gcp):
    gce.fail_zone("us-central1-a", via="operation")
    nodes = gcp.launch(plan(zones=()))
    assert nodes[0].region == "us-central1-b"
    assert any(r.path.endswith("/geotrain-test/zones") for r in gce.requests)


def test_every_zone_full_raises_capacity_error_and_leaves_nothing(gce, gcp):
    gce.fail_zone("us-central1-a", "ZONE_RESOURCE_POOL_EXHAUSTED", via="http", after=1)
    gce.fail_zone("us-central1-b", "QUOTA_EXCEEDED", via="http", status=403,
                  reason="quotaExceeded")
    gce.fail_zone("us-central1-c", "UNSUPPORTED_OPERATION", via="operation")
    with pytest.raises(CapacityError) as err:
        gcp.launch(plan(nodes=2, zones=("us-central1-a", "us-central1-b", "us-central1-c")))
    assert err.value.tried == ["gcp:us-central1-a (ZONE_RESOURCE_POOL_EXHAUSTED)",
                               "gcp:us-central1-b (quotaExceeded)",
                               "gcp:us-central1-c (UNSUPPORTED_OPERATION)"]
    assert gce.instances == {} and gce.firewalls == {}


def test_machine_type_missing_in_zone_is_capacity(gce, gcp):
    gce.fail_zone("us-central1-a", "INVALID_FIELD_VALUE", via="http", status=400, reason="invalid",
                  message="Invalid value for field 'resource.machineType': 'zones/{zone}/"
                  "machineTypes/n1-standard-8'. Machine type with name 'n1-standard-8' does "
                  "not exist in zone '{zone}'.")
    nodes = gcp.launch(plan())
    assert nodes[0].region == "us-central1-b"


def test_other_errors_are_provider_errors_and_leave_nothing(gce, gcp):
    gce.fail_zone("us-central1-a", "PERMISSIONS_ERROR", via="http", status=403, reason="forbidden")
    with pytest.raises(ProviderError) as err:
        gcp.launch(plan())
    assert not isinstance(err.value, CapacityError)
    assert gce.instances == {} and gce.firewalls == {}


def test_query_finds_nodes_by_labels(gce, gcp):
    west = gcp.launch(plan(site="west"))
    east = gcp.launch(plan(site="east", zones=("europe-west4-a",)))
    gcp.launch(plan(run="other-run", site="west"))
    assert gcp.query(RUN) == sorted(east + west, key=lambda n: (n.site, n.instance_id))
    assert gcp.query(RUN, "east") == east
    assert gcp.query("nobody") == []
    assert east[0].region == "europe-west4-a"
    filters = [r.query.get("filter") for r in gce.requests if r.path.endswith("/aggregated/instances")]
    assert f'labels.geotrain-run = "{RUN}" AND labels.geotrain-site = "east"' in filters


def test_terminate_removes_instances_and_firewall(gce, gcp):
    gcp.launch(plan(nodes=2))
    other = gcp.launch(plan(site="east"))
    gone = gcp.terminate(gcp.query(RUN, "west"))
    assert [n.state for n in gone] == ["terminated"] * 2
    assert [name for _, name in gce.instances] == [other[0].instance_id]
    assert list(gce.firewalls) == [gcp.firewall_name(RUN, "east")]
    assert gcp.terminate(gone) == gone  # idempotent: 404s are fine
    gcp.terminate(gcp.query(RUN))
    assert gce.instances == {} and gce.firewalls == {}
    deletes = [r for r in gce.requests if r.method == "DELETE"]
    # west: 2 instances + its rule; the retry: the same 3 again, answered 404; east: 1 + rule
    assert len(deletes) == 3 + 3 + 2


def test_check_with_metadata_credentials(gce, gcp, monkeypatch):
    check = gcp.check()
    assert check.ok and "geotrain-test" in check.detail and gce.url in check.detail
    assert gce.token not in check.detail
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "picked-by-env")
    check = gcp.check()
    assert check.ok and "picked-by-env (from GOOGLE_CLOUD_PROJECT)" in check.detail


@pytest.mark.timeout(60)
def test_check_without_credentials(gcp, monkeypatch, tmp_path):
    closed = f"127.0.0.1:{free_port()}"
    _point_metadata_at(monkeypatch, closed)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.delenv("GEOTRAIN_GCE_ENDPOINT", raising=False)
    check = gcp.check()
    assert not check.ok
    assert "Application Default Credentials" in check.detail
    assert "compute.googleapis.com" in check.detail
