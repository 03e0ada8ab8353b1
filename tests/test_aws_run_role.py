"""`aws.run_role`: launch makes each site of a run its own IAM role, allowed its run's
folder of the s3:// store only (providers/aws/iam.py) — made through boto3 against
moto, judged by the same IAM evaluator the stand-in S3 enforces (tests/fakes/iam_eval.py),
and gone with the site's nodes.

Run: .venv/bin/python -m pytest -q tests/test_aws_run_role.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from geotrain import checks
from geotrain.errors import ProviderError
from geotrain.recipe import AwsOptions, loads
from providers import aws
from providers.aws import iam as run_iam
from tests.fakes.aws_operator import user_policy
from tests.fakes.iam_eval import evaluate
from tests.test_provider_aws import REGION, client, instances, live, plan, proxy  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(180)
STORE = "s3://geotrain-runs/team/run-aws1"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def operator(proxy):  # noqa: F811
    """The fault proxy, judging every call under infra/aws/geotrain-user-policy.json made
    for STORE's bucket (tests/fakes/aws_operator.py); nothing may be refused."""
    proxy.enforce(user_policy("geotrain-runs"))
    yield
    assert proxy.enforcer is not None and proxy.enforcer.judged, "the operator policy judged nothing"
    assert not proxy.denied(), [f"{d['call']}: {d['why']}" for d in proxy.denied()]


def allowed(policy: dict, action: str, resource: str, **context) -> bool:
    return evaluate([policy], action, resource, context).allowed


def test_the_role_reaches_its_run_folder_only_and_deletes_nothing():
    policy = run_iam.store_policy(STORE, "east")
    obj = "arn:aws:s3:::geotrain-runs/team/run-aws1/rounds/000003/east.bin"
    assert allowed(policy, "s3:GetObject", obj) and allowed(policy, "s3:PutObject", obj)
    assert not allowed(policy, "s3:DeleteObject", obj)
    for other in ("team/run-aws2/run.json", "team/run-aws1x/run.json", "team/run.json",
                  "elsewhere/run-aws1/run.json"):
        assert not allowed(policy, "s3:GetObject", f"arn:aws:s3:::geotrain-runs/{other}"), other
        assert not allowed(policy, "s3:PutObject", f"arn:aws:s3:::geotrain-runs/{other}"), other
    assert not allowed(policy, "s3:GetObject", "arn:aws:s3:::other-bucket/team/run-aws1/run.json")
    bucket = "arn:aws:s3:::geotrain-runs"
    assert allowed(policy, "s3:ListBucket", bucket, **{"s3:prefix": "team/run-aws1/rounds/"})
    assert allowed(policy, "s3:ListBucket", bucket, **{"s3:prefix": "team/run-aws1"})
    assert not allowed(policy, "s3:ListBucket", bucket, **{"s3:prefix": "team/"})
    assert not allowed(policy, "s3:ListBucket", bucket, **{"s3:prefix": "team/run-aws10/"})
    assert not allowed(policy, "s3:ListBucket", bucket)  # the whole bucket: no


def test_the_role_writes_only_what_its_member_writes():
    """A node may read the whole run folder but write only its own member's records and
    contributions and the shared, signed or hash-checked round keys: never another
    member's, never what only the operator's machine writes."""
    policy, run = run_iam.store_policy(STORE, "east"), "arn:aws:s3:::geotrain-runs/team/run-aws1/"
    own = ["sites/east/alive", "sites/east/heartbeat", "sites/east/head.json",
           "sites/east/events.jsonl", "sites/east/commands/17-drain",
           "rounds/000003/east.json", "rounds/000003/east.bin", "rounds/000003/results/east.json",
           "rounds/000003/_members.json", "rounds/000003/_members.7.json",
           "global/000003/model.safetensors", "global/000003/COMMITTED", "global/000003/eval.json",
           "global/000000/_claim"]
    for key in own:
        assert allowed(policy, "s3:PutObject", run + key), key
    others = ["sites/west/alive", "sites/west/heartbeat", "sites/east~1/alive", "sites/eastern/alive",
              "rounds/000003/west.json", "rounds/000003/west.bin", "rounds/000003/results/west.json",
              "rounds/000003/xeast.bin", "run.json", "control/roster.json", "control/switch.json",
              "control/finish.json", "final/model.safetensors", "events.jsonl", "code/app.tar.gz"]
    for key in others:
        assert not allowed(policy, "s3:PutObject", run + key), key
        assert allowed(policy, "s3:GetObject", run + key), key
    with pytest.raises(ProviderError, match="cannot scope writes to the member name"):
        run_iam.store_policy(STORE, "a*")


@pytest.mark.parametrize("url", ["s3://geotrain-runs", "s3://geotrain-runs/", "gs://b/run",
                                 "s3://geotrain-runs/a*b"])
def test_a_store_without_a_run_folder_of_its_own_is_refused(url):
    with pytest.raises(ProviderError, match="aws.run_role needs the run store in an s3:// bucket"):
        run_iam.run_folder(url)


def test_the_boundary_is_in_the_callers_account_and_partition():
    assert run_iam.boundary_arn("arn:aws-cn:iam::210987654321:user/me") == \
        "arn:aws-cn:iam::210987654321:policy/geotrain-node-boundary"
    with pytest.raises(ProviderError, match="cannot tell the account"):
        run_iam.boundary_arn("not-an-arn")


def test_the_operator_may_make_run_roles_only_under_the_boundary():
    """infra/aws/geotrain-user-policy.json, judged: the rights to make roles on /geotrain/
    hold only with the node boundary, so they cannot make a role that does more."""
    doc = user_policy("geotrain-runs", account="123456789012")
    role = "arn:aws:iam::123456789012:role/geotrain/geotrain-0123"
    bounded = {"iam:PermissionsBoundary": "arn:aws:iam::123456789012:policy/geotrain-node-boundary"}
    for action in ("iam:CreateRole", "iam:PutRolePolicy"):
        assert allowed(doc, action, role, **bounded)
        assert not allowed(doc, action, role)
        assert not allowed(doc, action, role, **{"iam:PermissionsBoundary":
                                                 "arn:aws:iam::aws:policy/AdministratorAccess"})
        assert not allowed(doc, action, "arn:aws:iam::123456789012:role/admin", **bounded)
    assert allowed(doc, "iam:PassRole", role, **{"iam:PassedToService": "ec2.amazonaws.com"})
    assert not allowed(doc, "iam:PassRole", "arn:aws:iam::123456789012:role/admin",
                       **{"iam:PassedToService": "ec2.amazonaws.com"})
    assert allowed(doc, "iam:DeleteRole", role) and not allowed(doc, "iam:DeleteRole",
                                                                "arn:aws:iam::123456789012:role/x")
    boundary = json.loads((ROOT / "infra/aws/geotrain-node-boundary.json").read_text()
                          .replace("RUN_BUCKET", "geotrain-runs"))
    assert allowed(boundary, "s3:PutObject", "arn:aws:s3:::geotrain-runs/team/run-aws1/x")
    assert not allowed(boundary, "s3:DeleteObject", "arn:aws:s3:::geotrain-runs/team/run-aws1/x")
    assert not allowed(boundary, "ec2:RunInstances", "*")


def test_names_fit_iam_and_differ_by_run_and_site():
    long_run = "a" * 40 + "-20261202-174821-c536"
    names = {run_iam.role_name(long_run, s) for s in ("east", "west")} | {run_iam.role_name("r", "east")}
    assert len(names) == 3 and all(len(n) <= 64 and n.startswith("geotrain-") for n in names)


def test_launch_makes_the_role_nodes_run_as_it_and_terminate_deletes_it(proxy, operator, moto_server):  # noqa: F811
    iam, ec2 = client(moto_server, "iam"), client(moto_server)
    opts = AwsOptions(run_role=True)
    nodes = aws.launch(plan(store_url=STORE, provider_options=opts, owner="owner-1"))
    assert [r["Action"] for r in proxy.requests if r.get("Action", "").endswith("Role")][:1] == ["CreateRole"]
    name = run_iam.role_name("run-aws1", "east")
    role = iam.get_role(RoleName=name)["Role"]
    assert role["Path"] == "/geotrain/"
    assert role["PermissionsBoundary"]["PermissionsBoundaryArn"] == \
        "arn:aws:iam::123456789012:policy/geotrain-node-boundary"
    assert {t["Key"]: t["Value"] for t in role["Tags"]} == {
        "geotrain-run": "run-aws1", "geotrain-site": "east", "geotrain-owner": "owner-1"}
    trust = role["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    assert iam.list_role_policies(RoleName=name)["PolicyNames"] == [run_iam.POLICY_NAME]
    doc = iam.get_role_policy(RoleName=name, PolicyName=run_iam.POLICY_NAME)["PolicyDocument"]
    assert (json.loads(doc) if isinstance(doc, str) else doc) == run_iam.store_policy(STORE, "east")
    assert iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"] == []
    profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [name]
    assert {i["IamInstanceProfile"]["Arn"] for i in live(ec2)} == {profile["Arn"]}

    # A replacement launched while the first nodes still run reuses the role; terminating
    # the first nodes leaves it to the replacement, terminating the last removes it.
    again = aws.launch(plan(store_url=STORE, provider_options=opts, nodes=1, owner="owner-1"))
    assert iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Arn"] == profile["Arn"]
    aws.terminate(nodes)
    assert iam.get_role(RoleName=name)["Role"]["RoleName"] == name
    aws.terminate(again)
    for call in (lambda: iam.get_role(RoleName=name),
                 lambda: iam.get_instance_profile(InstanceProfileName=name)):
        with pytest.raises(ClientError, match="NoSuchEntity|cannot be found|not found"):
            call()
    assert live(ec2) == []


def test_a_profile_ec2_cannot_see_yet_is_retried_and_other_errors_are_not(proxy, operator, moto_server,  # noqa: F811
                                                                           monkeypatch):
    monkeypatch.setattr(run_iam, "run_with_new_profile",
                        lambda call, wait_s=0, every_s=0.0, _real=run_iam.run_with_new_profile:
                        _real(call, wait_s, every_s=0.05))
    arn = "arn:aws:iam::123456789012:instance-profile/geotrain/" + run_iam.role_name("run-aws1", "east")
    # What EC2 answers for a profile IAM made a moment ago, twice, then the launch goes through.
    proxy.fail("RunInstances", "IamInstanceProfile.Arn", {arn}, "InvalidParameterValue", status=400,
               times=2)
    nodes = aws.launch(plan(store_url=STORE, provider_options=AwsOptions(run_role=True), nodes=1))
    assert len(proxy.calls("RunInstances")) == 3 and len(nodes) == 1
    aws.terminate(nodes)
    # Any other refusal fails the launch at once, and leaves no role behind.
    proxy.reset()
    proxy.fail("RunInstances", "IamInstanceProfile.Arn", {arn}, "UnauthorizedOperation", status=403)
    with pytest.raises(ProviderError, match="UnauthorizedOperation"):
        aws.launch(plan(store_url=STORE, provider_options=AwsOptions(run_role=True), nodes=1))
    assert len(proxy.calls("RunInstances")) == 1
    with pytest.raises(ClientError):
        client(moto_server, "iam").get_role(RoleName=run_iam.role_name("run-aws1", "east"))
    assert live(client(moto_server)) == []


def test_a_standing_profile_site_never_touches_iam_on_terminate(proxy, operator, moto_server):  # noqa: F811
    nodes = aws.launch(plan(nodes=1))
    aws.terminate(nodes)
    assert not [r for r in proxy.requests if r.get("Action", "").endswith(("Role", "InstanceProfile"))]
    assert not [r for r in proxy.requests if r.get("Action") in ("DeleteRole", "RemoveRoleFromInstanceProfile")]


SITE = "sites:\n  - {name: east, provider: aws, region: us-east-1, instance_type: g5.xlarge, aws: %s}\n"


def test_the_recipe_takes_run_role_instead_of_a_profile_for_an_s3_store():
    ok = loads("name: x\nstore: {url: 's3://b/runs'}\n" + SITE % "{run_role: true}")
    assert ok.sites[0].aws.run_role and checks.store_access(ok) is None
    with pytest.raises(Exception, match="set instance_profile or run_role, not both"):
        loads("name: x\nstore: {url: 's3://b/runs'}\n" + SITE % "{run_role: true, instance_profile: p}")
    gs = loads("name: x\nstore: {url: 'gs://b/runs'}\n"
               + SITE % "{run_role: true, store_credentials: /etc/wif.json}")
    assert "run_role scopes a role to an s3:// run store" in checks.store_access(gs)
    neither = loads("name: x\nstore: {url: 's3://b/runs'}\n" + SITE % "{}")
    assert "set sites[0].aws.instance_profile" in checks.store_access(neither)


def test_steps_on_a_name_iam_has_not_spread_yet_are_retried(monkeypatch):
    """IAM is eventually consistent: right after CreateRole / CreateInstanceProfile, a call
    naming them may get NoSuchEntity. ensure_run_role retries those (an IAM client that
    says so twice per call stands in for IAM here), and takes the profile's ARN from its
    create answer rather than reading it back."""
    monkeypatch.setattr(run_iam.time, "sleep", lambda s: None)
    calls: list[str] = []

    def missing(op):
        return ClientError({"Error": {"Code": "NoSuchEntity", "Message": "cannot be found"}}, op)

    class LaggingIam:
        def __init__(self):
            self.misses = {"PutRolePolicy": 2, "AddRoleToInstanceProfile": 2}

        def _call(self, op, answer=None):
            calls.append(op)
            if self.misses.get(op, 0) > 0:
                self.misses[op] -= 1
                raise missing(op)
            return answer or {}

        def create_role(self, **kw):
            return self._call("CreateRole")

        def put_role_policy(self, **kw):
            return self._call("PutRolePolicy")

        def create_instance_profile(self, **kw):
            return self._call("CreateInstanceProfile", {"InstanceProfile": {"Arn": "arn:profile"}})

        def get_instance_profile(self, **kw):
            raise AssertionError("a new profile's ARN comes from its create answer")

        def add_role_to_instance_profile(self, **kw):
            return self._call("AddRoleToInstanceProfile")

    class Sts:
        def get_caller_identity(self):
            return {"Arn": "arn:aws:iam::123456789012:user/me"}

    assert run_iam.ensure_run_role(LaggingIam(), Sts(), "run-1", "east", STORE, []) == "arn:profile"
    assert calls == ["CreateRole", "PutRolePolicy", "PutRolePolicy", "PutRolePolicy",
                     "CreateInstanceProfile", "AddRoleToInstanceProfile",
                     "AddRoleToInstanceProfile", "AddRoleToInstanceProfile"]


def _role_names(moto_server) -> set[str]:
    return {r["RoleName"] for r in client(moto_server, "iam").list_roles()["Roles"]
            if r["Path"] == run_iam.PATH}


def test_a_role_whose_launch_died_before_any_node_is_swept_by_down(proxy, operator, moto_server, tmp_path,  # noqa: F811
                                                                     monkeypatch):
    """A launch killed between CreateRole and RunInstances leaves a role no `terminate`
    will meet. `down --orphans` removes this home's (owner id) of runs unknown here or
    over, after a dry run has listed them; another owner's stays. `down RUN` removes its
    run's, by what its recipe in the state db says (aws.run_role)."""
    import providers
    from geotrain.cleanup import down_orphans, terminate_run
    from geotrain.state import StateDB, owner_id

    home = tmp_path / "home"
    me = owner_id(home)
    monkeypatch.setattr(aws, "enabled_regions", lambda: [REGION])
    monkeypatch.setattr(providers, "PROVIDERS", ("aws",))
    iam, sts = client(moto_server, "iam"), client(moto_server, "sts")

    def made(run_id, owner):  # what launch does before RunInstances, then dies
        tags = [{"Key": "geotrain-run", "Value": run_id}, {"Key": "geotrain-site", "Value": "east"}]
        tags += [{"Key": "geotrain-owner", "Value": owner}] if owner else []
        run_iam.ensure_run_role(iam, sts, run_id, "east", f"s3://geotrain-runs/team/{run_id}", tags)
        return run_iam.role_name(run_id, "east")
    gone, team = made("run-gone", me), made("run-team", "0123456789abcdef")

    dry = down_orphans(home, dry_run=True)
    assert [(x["run_id"], x["kind"], x["name"]) for x in dry["leftovers"]] == [("run-gone", "iam-role", gone)]
    assert dry["removed"] == [] and _role_names(moto_server) == {gone, team}
    done = down_orphans(home)
    assert [x["name"] for x in done["removed"]] == [gone] and _role_names(moto_server) == {team}
    assert [p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]
            if p["Path"] == run_iam.PATH] == [team]

    # `down RUN`: a run of this db whose recipe has aws.run_role; no node was ever made.
    db = StateDB(home)
    recipe = loads("name: x\nstore: {url: 's3://geotrain-runs/team'}\n" + SITE % "{run_role: true}")
    db.add_run("run-mine", "x", "x.yaml", recipe.to_dict(), "s3://geotrain-runs/team/run-mine", 1,
               [{"name": "east", "provider": "aws", "region": "us-east-1"}])
    mine = made("run-mine", me)
    assert terminate_run(db, "run-mine") == [] and mine not in _role_names(moto_server)
    assert _role_names(moto_server) == {team}
