"""`gcp.run_account`: launch makes each site of a run its own service account, granted in
the run bucket's IAM policy only its run's folder (and listing), and removes both with the
site's nodes (providers/gcp/accounts.py) — made through the IAM REST API and
google-cloud-storage against the stand-ins (the fake GCE serves IAM and refuses an
instance whose account it does not see yet; the GCS identity proxy serves the bucket
policy and enforces what launch wrote there, conditions included).

The boot test (a node under a run account trains in its run's folder and is refused
another run's) is in tests/test_boot_gcp.py.

Run: .venv/bin/python -m pytest -q tests/test_gcp_run_account.py
"""

from __future__ import annotations

import json

import pytest

from geotrain import checks
from geotrain.errors import CapacityError, ProviderError
from geotrain.recipe import GcpOptions, loads
from providers import SitePlan
from providers.gcp import accounts
from tests.fakes.gcs_iam import bindings_from, infra_policy
from tests.fakes.gcs_identity import GcsIdentityProxy
from tests.test_boot_gcp import gcs, gcsfs_as
from tests.test_provider_gcp import SCOPE, gce, gcp  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(180)
RUN = "exp-20261202-174821-c536"
ZONES = ("us-central1-a", "us-central1-b")


def site_plan(bucket: str, run: str = RUN, nodes: int = 2, zones=ZONES, owner: str | None = None,
              **kw) -> SitePlan:
    return SitePlan(run_id=run, site="west", provider="gcp", store_url=f"gs://{bucket}/team/{run}",
                    region="us-central1", zones=zones, nodes=nodes, instance_type="g2-standard-4",
                    spot=True, owner=owner, provider_options=GcpOptions(**{"run_account": True, **kw}))


def normal(bindings: list[dict]) -> list[tuple]:
    """Bindings in a comparable form (order of bindings and members does not matter)."""
    return sorted((b["role"], tuple(sorted(b.get("members") or ())),
                   json.dumps(b.get("condition"), sort_keys=True)) for b in bindings)


# -- names, descriptions, bindings (pure) -------------------------------------------------

def test_account_ids_fit_iam_and_differ_by_run_and_site():
    long_run = "a" * 40 + "-20261202-174821-c536"
    ids = {accounts.account_id(long_run, s) for s in ("east", "west")}
    ids.add(accounts.account_id("r", "east"))
    assert len(ids) == 3
    for i in ids:
        assert 6 <= len(i) <= 30 and i[0].isalpha() and i[-1].isalnum()
        assert set(i) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    assert accounts.account_id("r", "east") == accounts.account_id("r", "east")
    assert accounts.account_email("p-1", "r", "east").endswith("@p-1.iam.gserviceaccount.com")


def test_the_description_says_whose_the_account_is_and_is_read_back_strictly():
    text = accounts.description(RUN, "west", "0123456789abcdef", "bkt")
    email = accounts.account_email("p", RUN, "west")
    assert accounts.parse_account({"email": email, "description": text}) == {
        "email": email, "run": RUN, "site": "west", "owner": "0123456789abcdef", "bucket": "bkt"}
    no_owner = accounts.description(RUN, "west", None, "bkt")
    assert accounts.parse_account({"email": email, "description": no_owner})["owner"] is None
    # Anything else is not ours: another account's id, other keys, not JSON, no description.
    for account in ({"email": accounts.account_email("p", RUN, "east"), "description": text},
                    {"email": email, "description": text[:-1] + ',"x":"y"}'},
                    {"email": email, "description": '{"run":"%s","site":"west"}' % RUN},
                    {"email": email, "description": '{"run":"%s","site":"west","bucket":1}' % RUN},
                    {"email": email, "description": "geotrain node"}, {"email": email}):
        assert accounts.parse_account(account) is None, account
    with pytest.raises(ProviderError, match="256-byte description"):
        accounts.description(RUN, "west", None, "b" * 250)


@pytest.mark.parametrize("url", ["gs://geotrain-runs", "gs://geotrain-runs/", "s3://b/run",
                                 "gs://geotrain-runs/a*b", 'gs://geotrain-runs/a"b'])
def test_a_store_without_a_run_folder_of_its_own_is_refused(url):
    with pytest.raises(ProviderError, match="gcp.run_account needs the run store in a gs:// "
                                            "bucket, in a folder of its own"):
        accounts.run_folder(url)


def test_the_bindings_grant_the_run_folder_and_listing_only_and_come_off_cleanly():
    email, store = accounts.account_email("p", RUN, "west"), f"gs://bkt/team/{RUN}"
    cond = accounts.condition(store, RUN, "west")
    writes = accounts.write_condition(store, RUN, "west")
    assert cond["expression"] == \
        f'resource.name.startsWith("projects/_/buckets/bkt/objects/team/{RUN}/")'
    assert RUN in cond["title"] and "west" in cond["title"] and len(cond["title"]) <= 100
    standing, roles = infra_policy("bkt", "team", project="p")
    before = [dict(b, members=set(b["members"])) for b in standing["bindings"]]
    after = accounts.granted(before, email, (cond, writes), accounts.lister_role("p"))
    assert accounts.granted(after, email, (cond, writes), accounts.lister_role("p")) == after  # once
    member = f"serviceAccount:{email}"
    assert [b for b in after if member in b["members"]] == [
        {"role": "projects/p/roles/geotrainNodeLister",  # joins the existing binding
         "members": {member, "serviceAccount:geotrain-node@p.iam.gserviceaccount.com"}},
        {"role": "roles/storage.objectViewer", "members": {member}, "condition": cond},
        {"role": "roles/storage.objectUser", "members": {member}, "condition": writes}]
    # Judged as GCS would (the stand-in's evaluator, which also holds IAM's limit of 12
    # logical operators): its run's objects, nothing else.
    mine = [b for b in bindings_from({"bindings": [dict(b, members=sorted(b["members"]))
                                                   for b in after]}, roles) if email in b.emails]

    def allowed(perm, resource):
        return any(perm in b.permissions and (b.holds is None or b.holds(resource)) for b in mine)
    obj = f"projects/_/buckets/bkt/objects/team/{RUN}/rounds/000001/west.bin"
    for perm in ("storage.objects.get", "storage.objects.create", "storage.objects.delete"):
        assert allowed(perm, obj)
        for other in (f"team/{RUN}x/run.json", "team/other-run/run.json", "team/run.json"):
            assert not allowed(perm, f"projects/_/buckets/bkt/objects/{other}"), other
        assert not allowed(perm, f"projects/_/buckets/other/objects/team/{RUN}/run.json")
    # Inside its run's folder it reads everything and writes only what its member writes
    # (the same keys aws.run_role's policy allows: geotrain/store/roster.py member_writes).
    run = f"projects/_/buckets/bkt/objects/team/{RUN}/"
    own = ["sites/west/alive", "sites/west/head.json", "rounds/000003/west.json",
           "rounds/000003/results/west.json", "rounds/000003/_members.json",
           "rounds/000003/_members.7.json", "global/000003/COMMITTED", "global/000000/_claim"]
    others = ["sites/east/alive", "sites/west~1/alive", "rounds/000003/east.bin", "rounds/000003/xwest.bin",
              "rounds/000003/results/east.json", "run.json", "control/roster.json", "final/summary.json",
              "events.jsonl", "_boot/abc/geotrain.whl"]
    for key in own:
        assert allowed("storage.objects.create", run + key) and allowed("storage.objects.delete", run + key), key
    for key in others:
        assert allowed("storage.objects.get", run + key), key
        assert not allowed("storage.objects.create", run + key), key
        assert not allowed("storage.objects.delete", run + key), key
    assert allowed("storage.objects.list", "projects/_/buckets/bkt")
    assert not allowed("storage.buckets.setIamPolicy", "projects/_/buckets/bkt")
    # Removing it leaves the policy as it was; IAM's form of a deleted member goes too.
    assert normal(accounts.revoked(after, email)) == normal(before)
    gone = [dict(b, members={f"deleted:{member}?uid=123"}) for b in after if member in b["members"]]
    assert normal(accounts.revoked(before + gone, email)) == normal(before)


def test_only_a_refusal_naming_the_unseen_account_is_retried(monkeypatch):
    from google.api_core import exceptions as gexc

    monkeypatch.setattr(accounts, "RETRY_EVERY_S", 0.0)
    email = accounts.account_email("p", RUN, "west")
    unseen = gexc.BadRequest(f"Invalid value for field 'resource.serviceAccounts[0].email': "
                             f"'{email}'. Service account {email} does not exist.")
    calls = []

    def flaky(errors):
        def call():
            calls.append(1)
            if errors:
                raise errors.pop(0)
            return "done"
        return call
    assert accounts.while_unseen(flaky([unseen, unseen]), email) == "done" and len(calls) == 3
    calls.clear()
    with pytest.raises(gexc.Forbidden):
        accounts.while_unseen(flaky([gexc.Forbidden("no"), unseen]), email)
    assert len(calls) == 1
    other = gexc.BadRequest("Service account someone@p.iam.gserviceaccount.com does not exist.")
    with pytest.raises(gexc.BadRequest):
        accounts.while_unseen(flaky([other]), email)
    with pytest.raises(gexc.BadRequest):  # not forever
        accounts.while_unseen(flaky([unseen] * 1000), email, wait_s=0.01)


# -- the recipe ------------------------------------------------------------------------

SITE = ("sites:\n  - {name: west, provider: gcp, region: us-central1, instance_type: g2-standard-4,"
        " gcp: %s}\n")


def test_the_recipe_takes_run_account_instead_of_a_service_account_for_a_gs_store():
    from geotrain.migrate import store_scoped_sites

    ok = loads("name: x\nstore: {url: 'gs://b/team'}\n" + SITE % "{run_account: true}")
    assert ok.sites[0].gcp.run_account and checks.store_access(ok) is None
    assert ok.sites[0].gcp.makes_run_resources() and store_scoped_sites(ok) == ["site west"]
    with pytest.raises(Exception, match="set service_account or run_account, not both"):
        loads("name: x\nstore: {url: 'gs://b/team'}\n"
              + SITE % "{run_account: true, service_account: n@p.iam.gserviceaccount.com}")
    s3 = loads("name: x\nstore: {url: 's3://b/team'}\n"
               + SITE % "{run_account: true, store_credentials: 'arn:aws:iam::123456789012:role/r'}")
    assert "run_account scopes a service account to a gs:// run store" in checks.store_access(s3)
    neither = loads("name: x\nstore: {url: 'gs://b/team'}\n" + SITE % "{}")
    assert "set sites[0].gcp.service_account" in checks.store_access(neither)
    assert not GcpOptions(service_account="n@p.iam.gserviceaccount.com").makes_run_resources()


# -- against the stand-ins -----------------------------------------------------------------

@pytest.fixture
def cloud(gce, gcs_emulator, monkeypatch):  # noqa: F811
    """(fake GCE serving IAM, GCS identity proxy, bucket): the bucket's policy starts as
    infra/gcp/run-bucket-policy.json (the operator, a standing node account on `team/`),
    and the fake refuses an instance whose account it does not know."""
    bucket = gcs_emulator.bucket
    gce.accounts_must_exist = True
    proxy = GcsIdentityProxy(gcs_emulator.endpoint, gce.token_info, allowed_tokens={gce.token})
    try:
        proxy.apply_policy(bucket, *infra_policy(bucket, "team", project=gce.project))
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        monkeypatch.setenv(accounts.ENDPOINT_ENV, gce.url)
        monkeypatch.setattr(accounts, "RETRY_EVERY_S", 0.05)
        yield gce, proxy, bucket
    finally:
        proxy.close()


def node_can(proxy, token: str, bucket: str, name: str) -> bool:
    """Whether a node holding `token` may write (and read back) `name` in the bucket."""
    fs = gcsfs_as(proxy.url, token)
    try:
        fs.pipe(f"{bucket}/{name}", b"probe")
        return fs.cat(f"{bucket}/{name}") == b"probe"
    except OSError as e:
        if "Forbidden" not in str(e):
            raise
        return False


def test_launch_makes_the_account_nodes_run_as_it_and_terminate_removes_it(cloud, gcp):  # noqa: F811
    fake, proxy, bucket = cloud
    standing = normal(proxy.policies[bucket]["bindings"])
    fake.account_propagation_s = 0.5  # GCE sees the new account only after a while
    nodes = gcp.launch(site_plan(bucket, owner="0123456789abcdef"))
    email = accounts.account_email(fake.project, RUN, "west")
    assert [r.method for r in fake.iam_requests()] == ["POST"]
    assert accounts.parse_account(fake.service_accounts[email]) == {
        "email": email, "run": RUN, "site": "west", "owner": "0123456789abcdef", "bucket": bucket}
    # The first insert was refused until GCE saw the account, then both went through.
    inserts = fake.bodies("POST", "/instances")
    assert len(inserts) > 2 and len(nodes) == 2
    assert {json.dumps(b["serviceAccounts"]) for b in inserts} == {
        json.dumps([{"email": email, "scopes": [SCOPE]}])}
    member = f"serviceAccount:{email}"
    mine = [b for b in proxy.policies[bucket]["bindings"] if member in b["members"]]
    standing_node = f"serviceAccount:geotrain-node@{fake.project}.iam.gserviceaccount.com"
    assert normal(mine) == normal([  # listing: it joins the standing account's binding
        {"role": f"projects/{fake.project}/roles/geotrainNodeLister",
         "members": [member, standing_node]},
        {"role": "roles/storage.objectViewer", "members": [member],
         "condition": accounts.condition(f"gs://{bucket}/team/{RUN}", RUN, "west")},
        {"role": "roles/storage.objectUser", "members": [member],
         "condition": accounts.write_condition(f"gs://{bucket}/team/{RUN}", RUN, "west")}])
    assert proxy.policies[bucket]["version"] == 3
    # The store enforces what launch wrote: a token of this account writes its run's
    # folder and nothing else (the standing account's `team/` is not its own).
    token, _ = fake.issue_token(email, "us-central1-a/x", [SCOPE])
    assert node_can(proxy, token, bucket, f"team/{RUN}/sites/west/probe.txt")
    assert not node_can(proxy, token, bucket, f"team/{RUN}/sites/east/probe.txt")  # another site's
    assert not node_can(proxy, token, bucket, "team/other-run/probe.txt")
    assert not node_can(proxy, token, bucket, "team/probe.txt")
    assert gcs(proxy.url, token, f"/storage/v1/b/{bucket}/iam")[0] == 403  # no policy for nodes

    # A replacement launched while the first nodes run shares the account; terminating
    # the first leaves it, terminating the last removes it and its bindings.
    again = gcp.launch(site_plan(bucket, nodes=1, zones=ZONES[1:], owner="0123456789abcdef"))
    gcp.terminate(nodes)
    assert email in fake.service_accounts
    gcp.terminate(again)
    assert email not in fake.service_accounts
    assert normal(proxy.policies[bucket]["bindings"]) == standing
    assert not node_can(proxy, token, bucket, f"team/{RUN}/sites/west/probe.txt")
    assert gcp.query(RUN) == [] and gcp.leftovers(RUN) == []


def test_a_failed_launch_leaves_no_account_and_no_binding(cloud, gcp, monkeypatch):  # noqa: F811
    fake, proxy, bucket = cloud
    standing = normal(proxy.policies[bucket]["bindings"])
    email = accounts.account_email(fake.project, RUN, "west")
    # Any refusal but the unseen account fails at once ...
    fake.fail_zone("us-central1-a", "forbidden", status=403, message="Required 'compute.instances"
                   ".create' permission")
    with pytest.raises(ProviderError, match="GCE refused site west in us-central1-a"):
        gcp.launch(site_plan(bucket, zones=("us-central1-a",)))
    assert len(fake.bodies("POST", "/instances")) == 1
    assert email not in fake.service_accounts and normal(proxy.policies[bucket]["bindings"]) == standing
    # ... no room anywhere too ...
    fake.failures.clear()
    for zone in ZONES:
        fake.fail_zone(zone)
    with pytest.raises(CapacityError):
        gcp.launch(site_plan(bucket))
    assert email not in fake.service_accounts and normal(proxy.policies[bucket]["bindings"]) == standing
    # ... and an account GCE never sees, once the wait is over.
    fake.failures.clear()
    fake.account_propagation_s = 3600
    monkeypatch.setattr(accounts, "ACCOUNT_WAIT_S", 0.3)
    with pytest.raises(ProviderError, match=f"Service account {email} does not exist"):
        gcp.launch(site_plan(bucket))
    assert email not in fake.service_accounts and normal(proxy.policies[bucket]["bindings"]) == standing
    assert gcp.query(RUN) == [] and not fake.firewalls


def test_a_policy_write_that_loses_a_race_is_done_again(cloud, gcp):  # noqa: F811
    fake, proxy, bucket = cloud
    proxy.interleave_writes(2)  # another writer changes the policy after each of 2 reads
    nodes = gcp.launch(site_plan(bucket, nodes=1))
    puts = [r for r in proxy.requests if r["path"].endswith("/iam") and r["method"] == "PUT"]
    assert [r["status"] for r in puts] == [412, 412, 200]
    email = accounts.account_email(fake.project, RUN, "west")
    assert any(f"serviceAccount:{email}" in b["members"] for b in proxy.policies[bucket]["bindings"])
    gcp.terminate(nodes)
    assert email not in fake.service_accounts


def test_a_standing_account_site_never_touches_iam(cloud, gcp):  # noqa: F811
    fake, proxy, bucket = cloud
    fake.accounts_must_exist = False
    plan = site_plan(bucket, nodes=1, run_account=False,
                     service_account=f"geotrain-node@{fake.project}.iam.gserviceaccount.com")
    gcp.terminate(gcp.launch(plan))
    assert fake.iam_requests() == []
    assert not [r for r in proxy.requests if r["path"].endswith("/iam")]


def test_check_names_the_iam_endpoint(cloud, gcp):  # noqa: F811
    fake, _, _ = cloud
    detail = gcp.check().detail
    assert f"IAM {fake.url} ({accounts.ENDPOINT_ENV})" in detail and fake.token not in detail


def test_an_account_whose_launch_died_before_any_node_is_swept_by_down(  # noqa: F811
        cloud, gcp, tmp_path, monkeypatch):
    """A launch killed between making the account and inserting the instances leaves an
    account no `terminate` will meet. `down --orphans` removes this home's (owner id) of
    runs unknown here or over, after a dry run has listed them; another owner's stays, and
    so does an account that is not a run account. `down RUN` removes its run's, by what
    its recipe in the state db says (gcp.run_account)."""
    import google.auth
    from google.cloud import storage

    import providers
    from geotrain.cleanup import down_orphans, terminate_run
    from geotrain.state import StateDB, owner_id

    fake, proxy, bucket = cloud
    standing = normal(proxy.policies[bucket]["bindings"])
    home = tmp_path / "home"
    me = owner_id(home)
    monkeypatch.setattr(providers, "PROVIDERS", ("gcp",))
    creds, _ = google.auth.default()
    iam = accounts.Iam(creds, fake.project)
    run_bucket = storage.Client(project=fake.project, credentials=creds).bucket(bucket)

    def made(run_id, owner):  # what launch does before inserting instances, then dies
        return accounts.ensure_run_account(iam, run_bucket, run_id, "west", owner,
                                           f"gs://{bucket}/team/{run_id}")
    gone, team = made("run-gone", me), made("run-team", "fedcba9876543210")
    iam.create("someones-own", "not geotrain's", json.dumps({"run": "run-gone", "site": "west",
                                                             "bucket": bucket, "owner": me}))
    assert {x.name for x in gcp.leftovers()} == {gone, team}

    dry = down_orphans(home, dry_run=True)
    assert [(x["run_id"], x["kind"], x["name"]) for x in dry["leftovers"]] == [
        ("run-gone", "service-account", gone)]
    assert dry["removed"] == [] and gone in fake.service_accounts
    done = down_orphans(home)
    assert [x["name"] for x in done["removed"]] == [gone]
    assert gone not in fake.service_accounts and team in fake.service_accounts
    assert f"someones-own@{fake.project}.iam.gserviceaccount.com" in fake.service_accounts
    assert not any(f"serviceAccount:{gone}" in b["members"] for b in proxy.policies[bucket]["bindings"])

    # `down RUN`: a run of this db whose recipe has gcp.run_account; no node was ever made.
    db = StateDB(home)
    recipe = loads(f"name: x\nstore: {{url: 'gs://{bucket}/team'}}\n" + SITE % "{run_account: true}")
    db.add_run("run-mine", "x", "x.yaml", recipe.to_dict(), f"gs://{bucket}/team/run-mine", 1,
               [{"name": "west", "provider": "gcp", "region": "us-central1"}])
    mine = made("run-mine", me)
    assert terminate_run(db, "run-mine") == [] and mine not in fake.service_accounts
    assert {x.name for x in gcp.leftovers()} == {team}
    gcp.remove(gcp.leftovers())
    assert normal(proxy.policies[bucket]["bindings"]) == standing


def test_an_account_that_is_not_a_run_account_is_never_removed(cloud, gcp):  # noqa: F811
    """An account with a run account's id but a description that is not ours (made by
    someone else) is left alone by `remove`, bindings and all."""
    fake, _, bucket = cloud
    api = gcp._Api()
    iam = accounts.Iam(api.credentials, api.project)
    email = accounts.account_email(api.project, RUN, "west")
    iam.create(accounts.account_id(RUN, "west"), "someone's", "not geotrain's")
    assert accounts.run_accounts(iam) == []  # not listed as a leftover either
    assert accounts.remove_run_account(iam, lambda name: pytest.fail("no bucket is touched"),
                                       email) is False
    assert iam.get(email)["email"] == email
