"""One run across three clouds whose nodes really boot: an AWS, a GCP and an Azure
site, one s3:// run store, through the CLI.

The AWS node writes the store as its instance profile's role. The GCP and Azure nodes
have no AWS identity: each asks its own metadata service for a token of its identity
(the GCE service account's identity token; the Azure VM's managed identity's token for
api://AzureADTokenExchange) and exchanges it at (a stand-in for) AWS STS for the role
named in its `store_credentials` (geotrain/site/store_identity.py). The S3 stand-in
accepts only keys that an identity was given: the instance profile's, or those STS
issued to a trusted identity. All three nodes install geotrain from the store and
train the same model to the end.

The whole scenario of recipes/twin.yaml (a spot notice failing over to the other cloud,
a cross-cloud migration, a node without store access, leftovers) is benchmarks/twin.py.
"""

from __future__ import annotations

import ipaddress
import json

import boto3
import pytest

from geotrain.site.node_info import fatal_line
from geotrain.site.store_identity import AZURE_AUDIENCE
from tests.cloud_helpers import PROFILE, STORE_URL, aws_env, azure_env, cli, cli_json, \
    enforce_operator_policy, gcp_env, refused, wait_succeeded, write_recipe  # noqa: F401 - aws_env is a fixture
from tests.fakes import netns
from tests.fakes.arm_server import FakeArm
from tests.fakes.aws_identity import S3IdentityProxy, StsWebIdentity, grant_store
from tests.fakes.azure_boot import BootConfig as AzureBoot
from tests.fakes.ec2_boot import Ec2Booter
from tests.fakes.gce_boot import BootConfig
from tests.fakes.gce_server import FakeGCE
from tests.fakes.node import node_image, tagged_pids
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
PATIENCE_S = 600
ACCOUNT = "geotrain-node@my-project.iam.gserviceaccount.com"
ROLE_ARN = "arn:aws:iam::123456789012:role/geotrain-node-web"
NODE_NET = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}
AZURE_ROLE_ARN = "arn:aws:iam::123456789012:role/geotrain-node-azure"
UAI = ("/subscriptions/00000000-0000-0000-0000-0000000000aa/resourceGroups/ids/providers/"
       "Microsoft.ManagedIdentity/userAssignedIdentities/geotrain-node")
AZURE_PRINCIPAL, _ = FakeArm.user_identity(UAI)


@pytest.fixture
def clouds(aws_env, moto_server, tmp_path):
    proxy, env, home = aws_env
    # The web-identity role the GCP node assumes carries the same node policy.
    iam = boto3.client("iam", endpoint_url=moto_server, region_name="us-east-1",
                       aws_access_key_id="x", aws_secret_access_key="x")
    iam.create_role(RoleName=ROLE_ARN.rsplit("/", 1)[-1], AssumeRolePolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{  # StsWebIdentity applies the trust itself
            "Effect": "Allow", "Principal": {"Federated": "accounts.google.com"},
            "Action": "sts:AssumeRoleWithWebIdentity"}]}))
    grant_store(iam, ROLE_ARN.rsplit("/", 1)[-1], STORE_URL)
    s3 = S3IdentityProxy(moto_server)
    image = node_image(tmp_path / "image")
    gce_net = {**NODE_NET, "AWS_ENDPOINT_URL_S3": s3.url, "AWS_DEFAULT_REGION": "us-east-1",
               "NO_PROXY": "127.0.0.1,localhost"}
    gce = FakeGCE(boot=BootConfig(image, tmp_path / "gce-nodes", gce_net))
    sts = StsWebIdentity(gce.claims_of, {ROLE_ARN: {ACCOUNT}}, s3_proxy=s3)
    gce_net["AWS_ENDPOINT_URL_STS"] = sts.url  # the route to "AWS STS" (BootConfig holds the dict)
    gce.start()
    # Azure: its own role (trusting Entra's tokens for the managed identity), its own STS
    # stand-in (which trusts those tokens for api://AzureADTokenExchange).
    iam.create_role(RoleName=AZURE_ROLE_ARN.rsplit("/", 1)[-1], AssumeRolePolicyDocument="{}")
    grant_store(iam, AZURE_ROLE_ARN.rsplit("/", 1)[-1], STORE_URL)
    arm = FakeArm()
    sts_azure = StsWebIdentity(lambda t: (lambda i: i and {"aud": i["resource"], "sub": i["principal_id"],
                                                           "email": i["principal_id"]})(arm.token_info(t)),
                               {AZURE_ROLE_ARN: {AZURE_PRINCIPAL}}, s3_proxy=s3,
                               audience=AZURE_AUDIENCE, provider="login.microsoftonline.com/T/v2.0")
    arm.start()
    arm.enable_boot(AzureBoot(image, tmp_path / "azure-nodes", {
        **NODE_NET, "AWS_ENDPOINT_URL_S3": s3.url, "AWS_ENDPOINT_URL_STS": sts_azure.url,
        "AWS_DEFAULT_REGION": "us-east-1", "NO_PROXY": "127.0.0.1,localhost"}))
    booter = Ec2Booter(moto_server, image, tmp_path / "ec2-nodes", NODE_NET, s3_proxy=s3,
                       store_roles={PROFILE})
    proxy.answer("GetConsoleOutput", booter.console_output)
    env.update(**gcp_env(gce), **azure_env(arm))
    env.pop("NO_GCE_CHECK", None)  # the operator's GCE credentials come from the fake's metadata
    # The operator holds only infra/aws/geotrain-user-policy.json on AWS: every AWS call it
    # makes (EC2, S3, the nodes' downloads by its signed URLs) is judged under it.
    enforce_operator_policy(proxy, env)
    try:
        yield env, home, booter, gce, arm, s3, sts, sts_azure, proxy
    finally:
        booter.close()
        gce.stop()
        arm.stop()
        sts.close()
        sts_azure.close()
        s3.close()


def test_an_aws_a_gcp_and_an_azure_node_train_one_model_through_an_s3_store(clouds, tmp_path):
    env, home, booter, gce, arm, s3, sts, sts_azure, proxy = clouds
    recipe = {"name": "twin", "model": {"preset": "tiny", "n_layer": 1, "d_model": 32, "n_head": 2},
              "train": {"rounds": 2, "inner_steps": 3, "batch_size": 2, "seq_len": 32,
                        "warmup_steps": 1, "eval_batches": 1},
              "store": {"url": STORE_URL},
              "sync": {"max_replacements": 0},
              "sites": [{"name": "east", "provider": "aws", "region": "us-east-1",
                         "instance_type": "t3.large", "aws": {"instance_profile": PROFILE}},
                        {"name": "west", "provider": "gcp", "region": "us-central1",
                         "zones": ["us-central1-a"], "instance_type": "g2-standard-4",
                         "gcp": {"service_account": ACCOUNT, "store_credentials": ROLE_ARN}},
                        {"name": "south", "provider": "azure", "region": "eastus",
                         "instance_type": "Standard_D2s_v5",
                         "azure": {"identity": UAI, "store_credentials": AZURE_ROLE_ARN}}]}
    path = write_recipe(tmp_path / "twin.yaml", recipe)
    run_id = cli_json(env, "launch", str(path), "--detach", timeout=180)["run"]
    [aws_node] = booter.wait_booted(1, timeout=120).values()
    profile_key = booter.imds(aws_node.instance_id).credentials["AccessKeyId"]

    def gce_node():
        with gce._lock:
            return next(iter(gce._booter.nodes.values()), None)
    gcp_node = wait_for(gce_node, 120, every=0.5)

    def azure_node():
        with arm._lock:
            return next(iter(arm._booter.nodes.values()), None) if arm._booter else None
    az_node = wait_for(azure_node, 120, every=0.5)
    nodes = (aws_node, gcp_node, az_node)

    def consoles() -> str:
        return "\n".join(f"--- {n.instance_id}\n{n.console_text()[-3000:]}" for n in nodes)

    final = wait_succeeded(env, home, run_id, consoles, PATIENCE_S)
    assert final["rounds_done"] == 2
    assert {s["provider"] for s in final["sites"]} == {"aws", "gcp", "azure"}
    for node in nodes:
        assert "verified" in node.console_text() and fatal_line(node.console_text()) is None
    # Each node had a network of its own where this machine allows it (tests/fakes/netns.py):
    # the three clouds' nodes trained together with all they sent crossing their links.
    if netns.available() is None:
        assert [n.network for n in nodes] == ["isolated"] * 3
        assert all(n.link.stats.bytes_out > 0 and n.link.stats.bytes_in > 0 for n in nodes)
        # Each on its cloud's private network, at the address its cloud assigned, which
        # its metadata service told the agent (the address its Ray bound).
        assert len({n.nic.network for n in nodes}) == 3
        for n in nodes:
            assert ipaddress.ip_address(n.private_ip).is_private and n.private_ip != "127.0.0.1"
            logs = "\n".join(f.read_text(errors="replace") for f in n.root.rglob("*.log"))
            assert f"private address from the metadata service: {n.private_ip}" in logs, logs[-2000:]

    # The GCP and Azure nodes got their AWS keys from STS for their own identities, and
    # only so.
    assert sts.calls and all(c["ok"] and c["email"] == ACCOUNT and c["role"] == ROLE_ARN
                             for c in sts.calls), sts.calls
    assert sts_azure.calls and all(c["ok"] and c["email"] == AZURE_PRINCIPAL
                                   and c["role"] == AZURE_ROLE_ARN for c in sts_azure.calls), sts_azure.calls
    used = {r["key_id"] for r in s3.requests if r["status"] < 400}
    web_keys = used - {profile_key}
    assert profile_key in used and web_keys and all(k.startswith("ASIA") for k in web_keys)
    assert {s3.roles[k] for k in web_keys} == {ROLE_ARN.rsplit("/", 1)[-1], AZURE_ROLE_ARN.rsplit("/", 1)[-1]}
    assert not s3.denied(), s3.denied()[:3]
    assert refused(proxy) == []  # nor did the operator's machine need more than its policy
    cli(env, "down", run_id, timeout=120)
    for node in nodes:
        wait_for(lambda node=node: not tagged_pids(node.instance_id), 120, every=0.5)
