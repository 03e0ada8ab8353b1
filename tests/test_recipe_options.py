"""The recipe's provider options (node identity, network, image, disk) and launch's
check that every cloud site's nodes can reach the run store: one precise error each.
(Split from tests/test_recipe.py.)"""

from pathlib import Path

import pytest
import yaml

from geotrain import recipe
from geotrain.recipe import Recipe, load, loads
from tests.test_recipe import SITES, error

pytestmark = pytest.mark.timeout(30)


# -- provider options: node identity, network, image, disk -------------------------------

OPTIONS_MISTAKES = {
    "options of another provider": (
        "    aws: {instance_profile: geotrain-node}\n    gcp: {service_account: a@b.iam.gserviceaccount.com}\n",
        7, "sites[0].gcp", "options for provider 'gcp' on a placement whose provider is 'aws'; "
        "use `aws:` here"),
    "bad subnet id": (
        "    aws: {subnets: [subnet-0123456789abcdef0, subnet-0abc]}\n", 6, "sites[0].aws.subnets[1]",
        "expected a subnet id, 'subnet-' and 8 or 17 hex digits, e.g. 'subnet-0123456789abcdef0' "
        "(got 'subnet-0abc')"),
    "unknown option": (
        "    aws:\n      instance_profile: geotrain-node\n      iam_role: x\n", 8,
        "sites[0].aws.iam_role", "unknown field 'iam_role'; did you mean 'run_role'? valid fields: "
        "instance_profile, run_role, subnets, image, disk_gb, public_ip, store_credentials"),
    "bad ami": (
        "    aws: {image: ubuntu-22.04}\n", 6, "sites[0].aws.image",
        "expected an AMI id, 'ami-' and 8 or 17 hex digits, e.g. 'ami-0123456789abcdef0' "
        "(got 'ubuntu-22.04')"),
    "tiny disk": ("    aws: {disk_gb: 4}\n", 6, "sites[0].aws.disk_gb", "must be >= 8 (got 4)"),
    "public ip not a bool": ("    aws: {public_ip: sometimes}\n", 6, "sites[0].aws.public_ip",
                             "expected true or false (got 'sometimes')"),
    "candidate with another provider's options": (
        "    candidates:\n      - provider: gcp\n        instance_type: g2-standard-4\n"
        "        azure: {identity: system}\n", 9, "sites[0].candidates[0].azure",
        "options for provider 'azure' on a placement whose provider is 'gcp'; use `gcp:` here"),
    "regional option without a region": (
        "    candidates:\n      - provider: aws\n        instance_type: g5.xlarge\n"
        "        aws: {subnets: [subnet-0123456789abcdef0]}\n", 9,
        "sites[0].candidates[0].aws.subnets",
        "is tied to one region: give this placement a `region`"),
    "bad service account": (
        "    candidates:\n      - provider: gcp\n        instance_type: g2-standard-4\n"
        "        gcp: {service_account: geotrain-node}\n", 9,
        "sites[0].candidates[0].gcp.service_account",
        "expected a service account email, e.g. 'geotrain-node@PROJECT.iam.gserviceaccount.com' "
        "(got 'geotrain-node')"),
    "bad azure identity": (
        "    candidates:\n      - provider: azure\n        instance_type: Standard_D2s_v5\n"
        "        azure: {identity: geotrain-node}\n", 9,
        "sites[0].candidates[0].azure.identity",
        "expected 'system' or the resource id of a user-assigned managed identity, "
        "'/subscriptions/SUB/resourceGroups/RG/providers/Microsoft.ManagedIdentity/"
        "userAssignedIdentities/NAME' (got 'geotrain-node')"),
}
OPTIONS_SITE = "name: x\nsites:\n  - name: east\n    provider: aws\n    instance_type: g5.xlarge\n"


@pytest.mark.parametrize("extra, line, field, message", OPTIONS_MISTAKES.values(),
                         ids=OPTIONS_MISTAKES.keys())
def test_provider_option_mistakes(extra, line, field, message):
    e = error(OPTIONS_SITE + extra)
    assert (e.line, e.field, e.message) == (line, field, message)
    assert str(e).startswith(f"r.yaml:{line}: {field}: ")


def test_local_placements_take_no_options():
    e = error("name: x\nsites:\n  - name: a\n    aws: {disk_gb: 20}\n")
    assert (e.line, e.field) == (4, "sites[0].aws") and "'local' placement" in e.message


INHERITING = """\
name: x
sites:
  - name: east
    provider: aws
    region: us-east-1
    instance_type: g5.xlarge
    aws: {instance_profile: geotrain-node, subnets: [subnet-0123456789abcdef0], disk_gb: 200}
    candidates:
      - {provider: aws, region: us-east-1, instance_type: g5.2xlarge}
      - {provider: aws, region: us-east-2, instance_type: g5.xlarge, aws: {public_ip: true}}
      - provider: gcp
        instance_type: g2-standard-4
        gcp: {service_account: geotrain-node@p.iam.gserviceaccount.com}
      - {provider: local}
"""


def test_candidates_inherit_the_sites_options_on_its_provider_only():
    r = loads(INHERITING)
    same, other_region, gcp, local = r.sites[0].placements()[1:]
    # Same provider and region: every option; its own win.
    assert same.options() == r.sites[0].placements()[0].options() == recipe.AwsOptions(
        instance_profile="geotrain-node", subnets=["subnet-0123456789abcdef0"], disk_gb=200)
    # Another region: all but the region's own ids (subnets, image).
    assert other_region.options() == recipe.AwsOptions(instance_profile="geotrain-node",
                                                       disk_gb=200, public_ip=True)
    # Another provider: nothing from the site.
    assert gcp.aws is None and gcp.options() == recipe.GcpOptions(
        service_account="geotrain-node@p.iam.gserviceaccount.com")
    assert local.options() is None and local.aws is None
    assert Recipe.model_validate(r.to_dict()) == r  # resolved once; a round trip keeps it
    # A placement not in the recipe (a migration target) gets the recipe's for its provider.
    site = r.sites[0]
    assert site.options_for("aws", "us-east-1") == same.options()
    assert site.options_for("aws", "eu-west-1") == recipe.AwsOptions(
        instance_profile="geotrain-node", disk_gb=200)
    assert site.options_for("gcp", "us-central1") == gcp.options()
    assert site.options_for("azure", "eastus") is None and site.options_for("local", None) is None


def test_options_described_for_plan_and_schema():
    from geotrain.plan import options_of

    r = loads(INHERITING)
    assert [options_of(p) for p in r.sites[0].placements()][2:] == [
        {"instance_profile": "geotrain-node", "disk_gb": 200, "public_ip": True},
        {"service_account": "geotrain-node@p.iam.gserviceaccount.com"}, {}]
    defs = recipe.schema()["$defs"]
    assert {"AwsOptions", "GcpOptions", "AzureOptions"} <= set(defs)
    said = defs["AwsOptions"]["properties"]["store_credentials"]["description"].lower()
    assert "from a gcp or azure placement" in said and "from an aws placement" in said
    assert "workload identity pool provider" in said and "not built yet and is refused at launch" in said
    assert "inherits" in defs["SiteSpec"]["properties"]["candidates"]["description"]


def test_code_dir_resolves_and_needs_an_entrypoint(tmp_path: Path):
    r = loads("name: x\ntrain: {entrypoint: 'pkg.train:main', code_dir: ../src}\n" + SITES,
              base_dir=tmp_path / "recipes")
    assert r.train.code_dir == str(tmp_path / "src")
    assert loads("name: x\ntrain: {entrypoint: 'pkg.train:main'}\n" + SITES).train.code_dir is None
    e = error("name: x\ntrain:\n  code_dir: src\n" + SITES)
    assert (e.line, e.field) == (3, "train.code_dir") and "only allowed with `entrypoint`" in e.message


# -- launch refuses nodes that could not reach the run store -------------------------------

POOL_PROVIDER = ("//iam.googleapis.com/projects/123456789/locations/global/workloadIdentityPools/"
                 "geotrain-aws/providers/aws-nodes")
STORE_ACCESS = {
    "s3 store, aws site without a profile": (
        "s3://b/runs", "    provider: aws\n    instance_type: g5.xlarge\n",
        "site east: its aws nodes have no identity to write the run store s3://b/runs; set "
        "sites[0].aws.instance_profile (see infra/aws/README.md)"),
    "gs store, gcp candidate without an account": (
        "gs://b/runs", "    provider: gcp\n    instance_type: g2-standard-4\n"
        "    gcp: {service_account: n@p.iam.gserviceaccount.com}\n    candidates:\n"
        "      - {provider: gcp, region: europe-west4, instance_type: g2-standard-4, "
        "gcp: {service_account: null}}\n",
        "site east (candidates[0]): its gcp nodes have no identity to write the run store "
        "gs://b/runs; set sites[0].candidates[0].gcp.service_account (see infra/gcp/README.md)"),
    "az store, azure site without an identity": (
        "az://acct/runs", "    provider: azure\n    instance_type: Standard_D2s_v5\n",
        "site east: its azure nodes have no identity to write the run store az://acct/runs; set "
        "sites[0].azure.identity (see infra/azure/README.md)"),
    "gs store, aws site without cross-cloud credentials": (
        "gs://b/runs", "    provider: aws\n    instance_type: g5.xlarge\n"
        "    aws: {instance_profile: geotrain-node}\n",
        "site east: its aws nodes have no credential for the run store gs://b/runs on another "
        "cloud; set sites[0].aws.store_credentials to the full resource name of a GCP workload "
        "identity pool provider that trusts its AWS account, //iam.googleapis.com/projects/"
        "NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER (see "
        "infra/gcp/README.md)"),
    "gs store, aws site with a role ARN instead of a pool provider": (
        "gs://b/runs", "    provider: aws\n    instance_type: g5.xlarge\n"
        "    aws: {instance_profile: geotrain-node, store_credentials: "
        "'arn:aws:iam::123456789012:role/w'}\n",
        "site east: sites[0].aws.store_credentials must be the full resource name of a GCP "
        "workload identity pool provider that trusts its AWS account, //iam.googleapis.com/"
        "projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER (see "
        "infra/gcp/README.md) for the run store gs://b/runs (got "
        "'arn:aws:iam::123456789012:role/w')"),
    "gs store, aws site with a pool provider but no profile": (
        "gs://b/runs", "    provider: aws\n    instance_type: g5.xlarge\n"
        f"    aws: {{store_credentials: '{POOL_PROVIDER}'}}\n",
        "site east: its aws nodes have no identity of their own to exchange for the run store "
        "gs://b/runs; set sites[0].aws.instance_profile (see infra/gcp/README.md)"),
    "gs store, azure site": (
        "gs://b/runs", "    provider: azure\n    instance_type: Standard_D2s_v5\n"
        f"    azure: {{identity: system, store_credentials: '{POOL_PROVIDER}'}}\n",
        "site east: its azure nodes cannot reach the gs:// run store gs://b/runs on another cloud "
        "(not built yet: only GCP and Azure nodes writing an s3:// store, and AWS nodes a gs:// "
        "store); place the site on gcp or put the store in S3"),
    "az store, aws site": (
        "az://acct/runs", "    provider: aws\n    instance_type: g5.xlarge\n"
        f"    aws: {{instance_profile: geotrain-node, store_credentials: '{POOL_PROVIDER}'}}\n",
        "site east: its aws nodes cannot reach the az:// run store az://acct/runs on another "
        "cloud (not built yet: only GCP and Azure nodes writing an s3:// store, and AWS nodes a "
        "gs:// store); place the site on azure or put the store in S3"),
    "s3 store, azure site without cross-cloud credentials": (
        "s3://b/runs", "    provider: azure\n    instance_type: Standard_D2s_v5\n"
        "    azure: {identity: system}\n",
        "site east: its azure nodes have no credential for the run store s3://b/runs on another "
        "cloud; set sites[0].azure.store_credentials to the ARN of an AWS role it assumes by web "
        "identity (see infra/aws/README.md)"),
    "s3 store, azure site with a client id instead of a role": (
        "s3://b/runs", "    provider: azure\n    instance_type: Standard_D2s_v5\n"
        "    azure: {identity: system, store_credentials: 0000aaaa-0000-0000-0000-000000000000}\n",
        "site east: sites[0].azure.store_credentials must be the ARN of an AWS role it assumes by "
        "web identity (see infra/aws/README.md) for the run store s3://b/runs (got "
        "'0000aaaa-0000-0000-0000-000000000000')"),
    "file store, cloud site": (
        "/srv/runs", "    provider: aws\n    instance_type: g5.xlarge\n"
        "    aws: {instance_profile: geotrain-node}\n",
        "site east: its aws nodes cannot reach the run store file:///srv/runs, which is on this "
        "machine's disk; set store.url to an s3://, gs:// or az:// bucket"),
}


@pytest.mark.parametrize("store, site, message", STORE_ACCESS.values(), ids=STORE_ACCESS.keys())
def test_store_access_names_the_site_and_the_option(store, site, message):
    from geotrain.checks import store_access

    r = loads(f"name: x\nstore: {{url: '{store}'}}\nsites:\n  - name: east\n{site}")
    assert store_access(r) == message


def test_store_access_passes_local_sites_and_named_identities():
    from geotrain.checks import store_access

    assert store_access(loads("name: x\nstore: {url: 's3://b/r'}\nsites: [{name: a}]\n")) is None
    assert store_access(loads("name: x\nsites: [{name: a}]\n")) is None
    assert store_access(loads(
        "name: x\nstore: {url: 's3://a/r'}\nsites:\n  - name: a\n    provider: aws\n"
        "    instance_type: g5.xlarge\n    aws: {run_role: true}\n    candidates:\n"
        "      - {provider: azure, region: eastus, instance_type: Standard_D2s_v5,\n"
        "         azure: {identity: system, store_credentials: 'arn:aws:iam::123456789012:role/w'}}\n"
        )) is None
    # An AWS node federating its instance profile's role for a gs:// store.
    assert store_access(loads(
        "name: x\nstore: {url: 'gs://b/r'}\nsites:\n  - name: a\n    provider: aws\n"
        "    instance_type: g5.xlarge\n"
        f"    aws: {{instance_profile: geotrain-node, store_credentials: '{POOL_PROVIDER}'}}\n"
        )) is None


@pytest.mark.parametrize("name", ["aws.yaml", "multicloud.yaml", "twin.yaml"])
def test_shipped_cloud_recipes_name_their_node_identities(name):
    from geotrain.checks import store_access

    assert store_access(load(Path(__file__).resolve().parent.parent / "recipes" / name)) is None


@pytest.mark.timeout(60)
def test_launch_refuses_a_node_without_identity_before_creating_anything(tmp_path: Path):
    """Through the real CLI: one line, exit 1, no traceback, no run, no cloud call (the AWS
    endpoint is a closed port, so any call would fail differently)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nstore: {url: 's3://b/runs'}\nsites:\n  - name: east\n"
                    "    provider: aws\n    region: us-east-1\n    instance_type: g5.xlarge\n")
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GEOTRAIN_"))}
    env.update(GEOTRAIN_HOME=str(home), AWS_ENDPOINT_URL=closed, AWS_ACCESS_KEY_ID="x",
               AWS_SECRET_ACCESS_KEY="x", AWS_EC2_METADATA_DISABLED="true")
    p = subprocess.run([sys.executable, "-m", "geotrain", "launch", str(path)], env=env,
                       capture_output=True, text=True, timeout=50)
    assert p.returncode != 0
    lines = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert lines[0].endswith("site east: its aws nodes have no identity to write the run store "
                             "s3://b/runs; set sites[0].aws.instance_profile (see "
                             "infra/aws/README.md)")
    from geotrain.state import StateDB

    assert not home.exists() or StateDB(home).runs() == []


def test_migration_targets_must_reach_the_run_store(tmp_path):
    """`geotrain migrate` asks before it sends: a site moved to a cloud the recipe gives
    it no identity on, or a store moved where a cloud site could not reach it, is refused."""
    from geotrain.migrate import target_problem

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "r", "store": {"url": "s3://bucket/runs"},
        "sites": [{"name": "a", "provider": "aws", "region": "us-east-1", "instance_type": "g5.xlarge",
                   "aws": {"instance_profile": "geotrain-node"},
                   "candidates": [{"provider": "aws", "region": "us-west-2",
                                   "instance_type": "g5.xlarge"}]},
                  {"name": "b", "provider": "local"}]}))
    r = load(path)
    store = "s3://bucket/runs/r-1"
    assert target_problem(r, store, "a", "aws:us-east-2:g5.xlarge") is None  # its aws identity
    assert target_problem(r, store, "b", "local") is None
    why = target_problem(r, store, "b", "aws:us-east-1:g5.xlarge")
    assert why == ("site b on aws:us-east-1:g5.xlarge: its aws nodes have no identity to write "
                   "the run store s3://bucket/runs/r-1; set sites[1].aws.instance_profile (see "
                   "infra/aws/README.md); a run migrates only to a provider whose node options "
                   "the recipe gives the site (e.g. as one of its candidates)")
    assert "store_credentials" in target_problem(r, store, "a", "gcp:us-central1:g2-standard-4")
    assert target_problem(r, store, new_store="file:///tmp/elsewhere").startswith(
        "cannot move the store to file:///tmp/elsewhere: site a: its aws nodes cannot reach")
    assert target_problem(r, store, new_store="s3://other-bucket/runs") is None


def test_a_store_move_is_refused_while_a_site_is_granted_only_the_runs_folder(tmp_path):
    """aws.run_role and azure.store_scope grant a node this run's folder of the current
    store; the move would leave those nodes refused by the new one, so it is refused first."""
    from geotrain.migrate import target_problem

    base = {"name": "r", "store": {"url": "s3://bucket/runs"},
            "sites": [{"name": "a", "provider": "aws", "region": "us-east-1",
                       "instance_type": "g5.xlarge", "aws": {"run_role": True}},
                      {"name": "b", "provider": "local"}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base))
    why = target_problem(load(path), "s3://bucket/runs/r-1", new_store="s3://other-bucket/runs")
    assert why.startswith("cannot move the store to s3://other-bucket/runs: the nodes of site a "
                          "are granted only this run's folder of the current store"), why
    # A candidate with it counts too; without any, the move is fine.
    base["sites"][0]["aws"] = {"instance_profile": "geotrain-node"}
    base["sites"][0]["candidates"] = [{"provider": "aws", "region": "us-west-2",
                                       "instance_type": "g5.xlarge", "aws": {"run_role": True,
                                                                             "instance_profile": None}}]
    path.write_text(yaml.safe_dump(base))
    assert "site a" in target_problem(load(path), "s3://bucket/runs/r-1", new_store="s3://o/runs")
    del base["sites"][0]["candidates"]
    path.write_text(yaml.safe_dump(base))
    assert target_problem(load(path), "s3://bucket/runs/r-1", new_store="s3://o/runs") is None
