"""Cloud runs end to end from the CLI, against the local stand-ins: never a real cloud.

Every command is a real `geotrain` subprocess, as a user would type it:
`launch RECIPE --detach --json`, `status RUN --json`, `down RUN`, `check --json`.
AWS is moto server (EC2 through the fault proxy of tests/fakes/aws_faults.py, S3
straight to moto for the run store); GCP is the fake Compute Engine + metadata server
of tests/fakes/gce_server.py; Azure the fake TLS ARM server + managed-identity endpoint
of tests/fakes/arm_server.py (fixtures and helpers: tests/cloud_helpers.py). No VM ever
boots here, so every site stays `starting` until `down`; the assertions read what the
providers hold (by tag) and what went on the wire. Here: recipes/multicloud.yaml across
all three at once, `geotrain check`, and each provider's boot script; AWS alone (failover,
a killed controller, `down --orphans`, the boot timeout): tests/test_cloud_aws.py.

Run: GEOTRAIN_HOME=$(mktemp -d) .venv/bin/python -m pytest -q tests/test_cloud_e2e.py
"""

from __future__ import annotations

import base64
import json
import re
import time

import pytest
import yaml

from tests.cloud_helpers import (BUCKET, OPEN, PROFILE, ROOT, SECRET_KEY, arm, aws_env, run_profiles,  # noqa: F401 - fixtures
                                 azure_env, cli, cli_json, enforce_operator_policy, events_from_db, gce, gcp_env,
                                 refused, small,
                                 tagged, user_data, wait_started, write_recipe)
from tests.helpers import wait_for


# -- 4 + 6: recipes/multicloud.yaml across moto, the fake GCE and the fake ARM at once -----

@pytest.mark.timeout(300)
def test_multicloud_recipe_launch_status_down(aws_env, moto_server, gce, arm, tmp_path):
    proxy, env, home = aws_env
    env.update(**gcp_env(gce), **azure_env(arm))
    env.pop("NO_GCE_CHECK")  # the GCE credentials find the fake metadata server
    # The operator's machine holds only infra/aws/geotrain-user-policy.json: every AWS call
    # it makes (a spot launch, its spot request tagged; status; down) is judged under it.
    enforce_operator_policy(proxy, env)
    # The shipped recipe, sites, store and all; only the model is made tiny: its `large`
    # preset would write a ~1.2 GB round-0 model into moto at launch.
    recipe = small(yaml.safe_load((ROOT / "recipes/multicloud.yaml").read_text()))
    path = write_recipe(tmp_path / "multicloud.yaml", recipe)
    t0 = time.monotonic()
    run_id = cli_json(env, "launch", str(path), "--detach", timeout=120)["run"]
    status = wait_started(env, home, run_id, sites=3, timeout=150)
    started_s = time.monotonic() - t0
    sites = {s["name"]: s for s in status["sites"]}
    assert {n: (s["provider"], s["region"]) for n, s in sites.items()} == {
        "aws": ("aws", "us-east-1"), "gcp": ("gcp", "us-central1"), "azure": ("azure", "eastus")}

    # AWS: a spot p4d (the catalog's cheapest 8 x A100) tagged with the run.
    [inst] = tagged(moto_server, run_id, ["us-east-1", "us-west-2"])["instances"]["us-east-1"]
    assert inst["InstanceLifecycle"] == "spot" and inst["InstanceType"] == "p4d.24xlarge"
    [aws_call] = proxy.calls("RunInstances")
    # GCP: a spot instance labelled with the run, behind a tag-to-tag firewall only.
    [(zone, name)] = [k for k, i in gce.instances.items()
                      if i["labels"]["geotrain-run"] == run_id.lower()]
    assert zone == "us-central1-a" and gce.instances[(zone, name)]["scheduling"]["provisioningModel"] == "SPOT"
    [fw] = gce.firewalls.values()
    assert "sourceRanges" not in fw or not set(fw["sourceRanges"]) & set(OPEN)
    [gce_body] = gce.bodies("POST", f"/zones/{zone}/instances")
    # Azure: a spot VM in the run's resource group, tagged with the run.
    [vm] = arm.resources("Microsoft.Compute/virtualMachines")
    from geotrain.state import owner_id
    owner = owner_id(home)  # every node carries the launching home's owner id (down --orphans)
    assert vm["tags"] == {"geotrain-run": run_id, "geotrain-site": "azure", "geotrain-owner": owner}
    assert gce.instances[(zone, name)]["labels"]["geotrain-owner"] == owner
    assert {t["Key"]: t["Value"] for t in inst["Tags"]}["geotrain-owner"] == owner
    assert vm["properties"]["priority"] == "Spot"
    [vm_body] = arm.bodies("PUT", "Microsoft.Compute/virtualMachines")
    # Each node runs as the identity the recipe names, with no public address.
    [made] = run_profiles(moto_server)  # aws.run_role: this run's site's own role, under /geotrain/
    assert aws_call["IamInstanceProfile.Arn"] == made["Arn"] and made["Roles"][0]["RoleName"] != PROFILE
    assert aws_call["NetworkInterface.1.AssociatePublicIpAddress"] == "false"
    assert [a["email"] for a in gce_body["serviceAccounts"]] == [
        "geotrain-node@my-project.iam.gserviceaccount.com"]
    assert "accessConfigs" not in gce_body["networkInterfaces"][0]
    assert vm_body["identity"] == {"type": "SystemAssigned"}
    assert not arm.resources("Microsoft.Network/publicIPAddresses")

    # Each node boots with GEOTRAIN_PROVIDER set to its own cloud (the agent's
    # preemption watcher reads that cloud's metadata service).
    scripts = {"aws": user_data(aws_call),
               "gcp": {i["key"]: i["value"] for i in gce_body["metadata"]["items"]}["startup-script"],
               "azure": base64.b64decode(vm_body["properties"]["osProfile"]["customData"]).decode()}
    for provider, script in scripts.items():
        assert f"export GEOTRAIN_PROVIDER={provider}\n" in script
        assert f"export GEOTRAIN_SITE={provider}\n" in script  # the sites are named after them
        assert f"STORE=s3://{BUCKET}/runs/{run_id}\n" in script

    # Never booting: still starting, nothing replaced, over a few of the controller's
    # ticks (each asks EC2 about the aws node), however long those take.
    ticks = len(proxy.calls("DescribeInstances"))
    wait_for(lambda: len(proxy.calls("DescribeInstances")) >= ticks + 3, 120, every=0.25)
    status = cli_json(env, "status", run_id)
    assert [s["state"] for s in status["sites"]] == ["starting"] * 3
    assert not [e for e in events_from_db(env, run_id) if e["kind"] in ("site-lost", "failed")]

    t1 = time.monotonic()
    out = cli_json(env, "down", run_id, timeout=150)
    down_s = time.monotonic() - t1
    assert out["state"] == "stopped" and len(out["terminated"]) == 3  # by the controller's teardown
    assert inst["InstanceId"] in out["terminated"] and name in out["terminated"]
    assert tagged(moto_server, run_id) == {"instances": {}, "groups": {}}
    assert run_profiles(moto_server) == []  # the site's role went with its node
    assert not gce.instances and not gce.firewalls
    assert [r for r in arm.resources() if (r.get("tags") or {}).get("geotrain-run") == run_id
            or run_id in r.get("name", "")] == []
    assert refused(proxy) == []
    print(f"\nmulticloud: three sites launched {started_s:.1f} s, down {down_s:.1f} s")


# -- 7: geotrain check with all three stand-ins ----------------------------------------------

@pytest.mark.timeout(120)
def test_check_shows_each_providers_endpoint_and_no_secret(aws_env, gce, arm):
    proxy, env, home = aws_env
    env.update(**gcp_env(gce), **azure_env(arm))
    env.pop("NO_GCE_CHECK")  # the GCE credentials find the fake metadata server
    p = cli(env, "check", "--json")
    rows = {r["provider"]: r for r in json.loads(p.stdout)}
    assert all(rows[n]["ok"] for n in ("local", "aws", "gcp", "azure")), rows
    assert rows["aws"]["settings"]["AWS_ENDPOINT_URL"] == proxy.url
    assert f"endpoint {proxy.url} (AWS_ENDPOINT_URL)" in rows["aws"]["detail"]
    assert rows["gcp"]["settings"] == {"GEOTRAIN_GCE_ENDPOINT": gce.url, "GCE_METADATA_HOST": gce.host}
    assert f"{gce.url} (GEOTRAIN_GCE_ENDPOINT)" in rows["gcp"]["detail"]
    assert "project geotrain-test" in rows["gcp"]["detail"]
    assert rows["azure"]["settings"] == {"GEOTRAIN_ARM_ENDPOINT": arm.base_url,
                                         "GEOTRAIN_ARM_CA_BUNDLE": str(arm.ca_path),
                                         "AZURE_SUBSCRIPTION_ID": arm.subscription}
    for shown in (arm.base_url, str(arm.ca_path), arm.subscription):
        assert shown in rows["azure"]["detail"]
    table = cli(env, "check").stdout
    secrets = (SECRET_KEY, gce.token, arm.token, arm.identity_header)
    for text in (p.stdout, p.stderr, table):
        for secret in secrets:
            assert secret not in text
    for shown in ("AWS_ENDPOINT_URL", "GEOTRAIN_GCE_ENDPOINT", "GEOTRAIN_ARM_ENDPOINT", "GEOTRAIN_ARM_CA_BUNDLE"):
        assert shown in table

    # Unreachable endpoints: every provider answers no, with its endpoint, and nothing raises.
    dead = "http://127.0.0.1:9"
    env.update(AWS_ENDPOINT_URL=dead, GEOTRAIN_GCE_ENDPOINT=dead, GEOTRAIN_ARM_ENDPOINT="https://127.0.0.1:9",
               IDENTITY_ENDPOINT=f"{dead}/msi/token")
    rows = {r["provider"]: r for r in cli_json(env, "check", timeout=120)}
    assert not rows["aws"]["ok"] and dead in rows["aws"]["detail"]
    assert not rows["azure"]["ok"] and "https://127.0.0.1:9" in rows["azure"]["detail"]
    assert SECRET_KEY not in json.dumps(rows)


# -- 6: every provider's boot script names its provider for the preemption watcher --------

@pytest.mark.parametrize("provider,watcher", [("aws", "AwsWatcher"), ("gcp", "GceWatcher"),
                                              ("azure", "AzureWatcher")])
def test_boot_script_exports_the_provider_the_agent_watches(provider, watcher):
    import shlex

    from geotrain import bootstrap
    from geotrain.site.preemption import DEFAULT_ENDPOINTS, watcher_for
    from providers import SitePlan

    plan = SitePlan(run_id="r-1", site="s", provider=provider, store_url="s3://b/runs/r-1",
                    region="x", nodes=2)
    script = bootstrap.render(plan, 1, "t" * 64)
    exports = dict(re.findall(r"^export (\w+)=(.*)$", script, re.M))
    assert shlex.split(exports["GEOTRAIN_PROVIDER"]) == [provider]
    w = watcher_for(shlex.split(exports["GEOTRAIN_PROVIDER"])[0])
    assert type(w).__name__ == watcher and w.endpoint == DEFAULT_ENDPOINTS[provider]
