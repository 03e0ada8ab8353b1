"""An AWS node whose run store is gs://, through GCP workload identity federation, no key
anywhere: `geotrain launch` → EC2 (moto) boots the instance with its instance profile →
its boot fetches geotrain from the gs:// store (the operator's credentials here cannot
sign a URL) with a federated token: GetCallerIdentity signed with the profile role's
keys from IMDSv2, exchanged at (a stand-in for) GCP STS through the pool provider named
in `aws.store_credentials` → installs, verified → the site agent's gcsfs does the same
exchange through google-auth's external_account credentials → trains to the end.

The stand-in STS (tests/fakes/gcp_sts.py) accepts only requests signed with keys the
stand-in IMDS issued; the stand-in GCS (tests/fakes/gcs_identity.py, in front of the
GCS emulator) accepts the federated token only for what the bucket's IAM policy grants
the role's principal set — infra/gcp/README.md's bindings (objects under the store's
folder, listing on the bucket), with the principal set as member. Without that
binding the node is refused by the store and says so, and the site is lost with that
reason, long before boot_timeout_s.

Run: .venv/bin/python -m pytest -q tests/test_boot_aws_gs.py
"""

from __future__ import annotations

import json
import time

import pytest

import geotrain.store.objects  # noqa: F401 - gcsfs must not probe for HNS on the emulator
from geotrain.site.node_info import fatal_line
from tests.cloud_helpers import PROFILE, aws_env, cli, cli_json, gcp_env, wait_succeeded, \
    write_recipe  # noqa: F401 - aws_env is a fixture
from tests.fakes.ec2_boot import Ec2Booter
from tests.fakes.ec2_imds import ACCOUNT_ID
from tests.fakes.gce_server import FakeGCE
from tests.fakes.gcp_sts import GcpSts, issued_by, principal_set
from tests.fakes.gcs_iam import infra_policy
from tests.fakes.gcs_identity import GcsIdentityProxy
from tests.fakes.node import node_image, tagged_pids
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
PATIENCE_S = 600  # a hang detector, not a speed bound
PREFIX = "runs"  # the run store's folder in the bucket: gs://<bucket>/runs
POOL_PROVIDER = ("//iam.googleapis.com/projects/123456789/locations/global/workloadIdentityPools/"
                 "geotrain-aws/providers/aws-nodes")
MEMBER = principal_set(POOL_PROVIDER, f"arn:aws:sts::{ACCOUNT_ID}:assumed-role/{PROFILE}")
NODE_NET = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}


def bucket_policy(bucket: str, member: str) -> tuple[dict, dict]:
    """infra/gcp/run-bucket-policy.json for the store's folder, the node account's bindings
    given to `member` instead (infra/gcp/README.md, AWS nodes)."""
    document, roles = infra_policy(bucket, PREFIX)
    node = "serviceAccount:geotrain-node@my-project.iam.gserviceaccount.com"
    for binding in document["bindings"]:
        binding["members"] = [member if m == node else m for m in binding["members"]]
    return document, roles


@pytest.fixture
def cloud(aws_env, moto_server, gcs_emulator, tmp_path):
    """(env for the CLI, home, booter, the GCS identity proxy, STS, bucket): EC2 that
    boots with IMDS, GCS behind identity, GCP STS that knows what IMDS issued."""
    proxy, env, home = aws_env
    fake = FakeGCE()  # the operator's Google credentials: a token from its metadata server
    fake.start()
    box: dict = {}
    sts = GcpSts(lambda key: issued_by(box["booter"])(key), {POOL_PROVIDER: ACCOUNT_ID})
    gcs = GcsIdentityProxy(gcs_emulator.endpoint, sts.token_info, allowed_tokens={fake.token})
    route = {"STORAGE_EMULATOR_HOST": gcs.url}  # the route to "GCS"
    booter = box["booter"] = Ec2Booter(moto_server, node_image(tmp_path / "image"), tmp_path / "nodes",
                                       {**NODE_NET, **route, "GEOTRAIN_GCP_STS_URL": sts.url})
    proxy.answer("GetConsoleOutput", booter.console_output)  # moto keeps no console
    env.update(**gcp_env(fake), **route)
    env.pop("NO_GCE_CHECK", None)  # the operator's GCE credentials come from the fake's metadata
    try:
        yield env, home, booter, gcs, sts, gcs_emulator.bucket
    finally:
        booter.close()
        fake.stop()
        gcs.close()
        sts.close()


def recipe(bucket: str) -> dict:
    return {"name": "boot-aws-gs", "model": {"preset": "tiny", "n_layer": 1, "d_model": 32, "n_head": 2},
            "train": {"rounds": 2, "inner_steps": 3, "batch_size": 2, "seq_len": 32,
                      "warmup_steps": 1, "eval_batches": 1},
            "store": {"url": f"gs://{bucket}/{PREFIX}"},
            "sync": {"boot_timeout_s": 1800, "max_replacements": 0},
            "sites": [{"name": "east", "provider": "aws", "region": "us-east-1",
                       "instance_type": "t3.large",
                       "aws": {"instance_profile": PROFILE, "store_credentials": POOL_PROVIDER}}]}


def events(env: dict, run_id: str) -> list[dict]:
    return [json.loads(line) for line in cli(env, "logs", run_id, "--json").stdout.splitlines()]


def test_an_aws_node_trains_through_a_gs_store_by_workload_identity_federation(cloud, tmp_path):
    env, home, booter, gcs, sts, bucket = cloud
    gcs.apply_policy(bucket, *bucket_policy(bucket, MEMBER))
    t0 = time.monotonic()
    path = write_recipe(tmp_path / "boot.yaml", recipe(bucket))
    run_id = cli_json(env, "launch", str(path), "--detach", timeout=180)["run"]
    [node] = booter.wait_booted(1, timeout=120).values()
    final = wait_succeeded(env, home, run_id, lambda: node.console_text()[-3000:], PATIENCE_S)
    assert final["rounds_done"] == 2 and final["eval_loss"] is not None
    text = node.console_text()
    assert "geotrain-0.1.0-py3-none-any.whl verified" in text and fatal_line(text) is None, text
    # The boot read gs:// objects with a federated token (the operator could not sign),
    # and so did the agent: every exchange STS took was the instance profile's role's.
    script = node.script.read_text()
    assert f"WHEEL_URL=gs://{bucket}/{PREFIX}/{run_id}/_boot/" in script
    assert f"GEOTRAIN_STORE_GCP_PROVIDER={POOL_PROVIDER}" in script
    assert sts.calls and all(c["ok"] and c["role"] == PROFILE for c in sts.calls), sts.calls
    scopes = {sts.tokens[t]["scope"] for t in sts.tokens}
    assert "https://www.googleapis.com/auth/devstorage.read_only" in scopes  # the boot fetch
    assert scopes - {"https://www.googleapis.com/auth/devstorage.read_only"}  # google-auth's
    # Everything the node did in the store it did as the role's principal set, within
    # the bindings of infra/gcp/README.md: nothing refused, nothing unjudgeable.
    by_node = [r for r in gcs.requests if r["email"] != "operator"]
    assert by_node and {r["email"] for r in by_node} == {MEMBER}
    assert any(r["method"] == "POST" for r in by_node)  # it wrote, not only read
    assert not gcs.denied() and not gcs.errors, (gcs.denied()[:3], gcs.errors)
    cli(env, "down", run_id, timeout=120)
    booter.wait_stopped(node.instance_id, timeout=120)
    assert tagged_pids(node.instance_id) == []
    print(f"\nboot-aws-gs: launch to succeeded {time.monotonic() - t0:.0f} s")


def test_a_node_whose_role_the_bucket_does_not_grant_is_reported_not_silent(cloud, tmp_path):
    """The pool trusts the account and STS federates the role, but the bucket's policy
    binds another principal set: the store answers 403, the node says so on its console,
    the controller reads it there and the site is lost with that reason — long before
    boot_timeout_s (1800 s here)."""
    env, home, booter, gcs, sts, bucket = cloud
    other = principal_set(POOL_PROVIDER, f"arn:aws:sts::{ACCOUNT_ID}:assumed-role/someone-else")
    gcs.apply_policy(bucket, *bucket_policy(bucket, other))
    path = write_recipe(tmp_path / "boot.yaml", recipe(bucket))
    run_id = cli_json(env, "launch", str(path), "--detach", timeout=180)["run"]
    [node] = booter.wait_booted(1, timeout=120).values()
    wait_for(lambda: fatal_line(node.console_text()), PATIENCE_S, every=0.5)
    printed = time.monotonic()
    said = fatal_line(node.console_text())
    assert said.startswith("could not fetch geotrain-0.1.0-py3-none-any.whl from the run store"), said
    # In the store's own words (who, which permission), and not retried.
    assert "HTTP 403" in said and f"{MEMBER} does not have storage.objects.get" in said, said
    assert [c["ok"] for c in sts.calls] == [True]  # federated, then refused by the bucket
    by_node = [r for r in gcs.requests if r["email"] != "operator"]
    assert [(r["email"], r["status"]) for r in by_node] == [(MEMBER, 403)], by_node

    def lost():
        found = [e for e in events(env, run_id) if e["kind"] == "site-lost"]
        return found[0] if found else None
    event = wait_for(lost, PATIENCE_S, every=0.5)
    reported_s = time.monotonic() - printed
    assert event["reason"] == f"node failed to boot: {said}", event
    [site] = wait_for(lambda: (lambda s: s["sites"] if s["sites"][0]["lost"] else None)(
        cli_json(env, "status", run_id)), PATIENCE_S, every=0.5)
    assert site["lost"]["reason"] == event["reason"], site
    cli(env, "down", run_id, timeout=120)
    booter.wait_stopped(node.instance_id, timeout=120)
    assert tagged_pids(node.instance_id) == []
    print(f"\nnot granted: reported {reported_s:.1f} s after the node printed it")
