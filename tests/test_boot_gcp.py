"""A GCP site whose node really boots: `geotrain launch` → the GCE stand-in creates the
instance → its startup-script runs → it fetches geotrain from a gs:// run store with its
own service account (a token from its metadata server; the operator's credentials here
cannot sign a URL) → installs, verified → trains to the end on the GCS emulator.

Like tests/test_boot_aws.py, nothing of the test process reaches the node but the
stand-in network (the emulator's address) and its metadata server; its image has
geotrain's dependencies, not geotrain.

Not yet here: the GCS emulator accepts any token, so a node without store access is
not refused by the store (the AWS test covers that path through an identity proxy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from geotrain.site.node_info import fatal_line
from tests.cloud_helpers import ROOT, cli, cli_json, gcp_env, wait_succeeded
from tests.fakes.gce_boot import BootConfig
from tests.fakes.gce_server import FakeGCE
from tests.fakes.node import node_image, tagged_pids
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
PATIENCE_S = 600  # a hang detector, not a speed bound
ACCOUNT = "geotrain-node@my-project.iam.gserviceaccount.com"
NODE_NET = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}


@pytest.fixture
def cloud(gcs_emulator, tmp_path):
    """(env for the CLI, home, fake GCE that boots, the emulator's bucket)."""
    node_env = {**NODE_NET, **gcs_emulator.env}  # the route to "GCS"
    fake = FakeGCE(boot=BootConfig(node_image(tmp_path / "image"), tmp_path / "nodes", node_env))
    fake.start()
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "GOOGLE_", "GCE_", "AZURE_", "GEOTRAIN_", "IDENTITY_",
                                "MSI_", "STORAGE_EMULATOR"))}
    env.update(GEOTRAIN_HOME=str(home), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
               NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1", **gcp_env(fake),
               **gcs_emulator.env)
    try:
        yield env, home, fake, gcs_emulator.bucket
    finally:
        fake.stop()


def test_a_gce_node_fetches_with_its_service_account_installs_and_trains(cloud, tmp_path):
    env, home, fake, bucket = cloud
    recipe = {"name": "boot-gcp",
              "model": {"preset": "tiny", "n_layer": 1, "d_model": 32, "n_head": 2},
              "train": {"rounds": 2, "inner_steps": 3, "batch_size": 2, "seq_len": 32,
                        "warmup_steps": 1, "eval_batches": 1},
              "store": {"url": f"gs://{bucket}/runs"},
              "sync": {"max_replacements": 0},
              "sites": [{"name": "west", "provider": "gcp", "region": "us-central1",
                         "zones": ["us-central1-a"], "instance_type": "g2-standard-4",
                         "gcp": {"service_account": ACCOUNT}}]}
    path = tmp_path / "boot.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    t0 = time.monotonic()
    run_id = cli_json(env, "launch", str(path), "--detach", timeout=180)["run"]

    def booted():
        with fake._lock:
            return next(iter(fake._booter.nodes.values()), None)
    node = wait_for(booted, 120, every=0.5)
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
    events = [json.loads(line) for line in cli(env, "logs", run_id, "--json").stdout.splitlines()]
    [starting] = [e for e in events if e["kind"] == "starting"]
    assert starting["geotrain"].startswith(str(Path(node.root) / "opt" / "geotrain"))
    cli(env, "down", run_id, timeout=120)
    wait_for(lambda: not tagged_pids(node.instance_id), 120, every=0.5)
    print(f"\nboot-gcp: launch to succeeded {time.monotonic() - t0:.0f} s")
