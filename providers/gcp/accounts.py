"""A service account made for one site of one run (`gcp.run_account: true`): its nodes
may read objects only under their run's folder of the gs:// run store, write and
overwrite only the keys their site writes there, list object names in the bucket, and
do nothing else.

A standing account (`gcp.service_account`, infra/gcp/README.md) is granted a store's
folder by hand, once, so every run of that store shares it: one run's nodes can read and
overwrite another's. With `run_account`, `launch` makes, in the project:

- the service account `gt-<digest of run and site>@PROJECT.iam.gserviceaccount.com`.
  Service accounts carry no labels, so its description records, as JSON, the run, the
  site, the launching operator's owner id and the run bucket; `run_accounts` reads them
  back from there, strictly (a description that is not exactly that, or whose run and
  site do not digest to the account's id, is not ours);
- three bindings for it in the run bucket's IAM policy (version 3):
  `roles/storage.objectViewer` under the condition
  `resource.name.startsWith("projects/_/buckets/B/objects/<run folder>/")`;
  `roles/storage.objectUser` under `write_condition`, only the keys that site (the run's
  member) writes there; and the custom role `projects/PROJECT/roles/geotrainNodeLister`
  (storage.objects.list only: GCS checks listing on the bucket, which an object-name
  condition cannot grant).

`terminate` removes both bindings and deletes the account once no instance of the site
is left. IAM is eventually consistent: Compute Engine (and the bucket's setIamPolicy) may
say an account made a moment ago does not exist, so that one refusal is retried for up to
ACCOUNT_WAIT_S; any other fails at once. The bucket's policy is read, changed and written
back with its etag; a write that raced another (412) is done again from a fresh read.

Service accounts are made through the IAM v1 REST API with google-auth's authorized
session (google-cloud-iam's admin client speaks gRPC only), at $GEOTRAIN_GCP_IAM_ENDPOINT
when set (tests), else iam.googleapis.com; the bucket's policy through
google-cloud-storage, which honours $STORAGE_EMULATOR_HOST. Both use the operator's
Application Default Credentials, never logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable

from geotrain.errors import ProviderError

ENDPOINT_ENV = "GEOTRAIN_GCP_IAM_ENDPOINT"
DEFAULT_ENDPOINT = "https://iam.googleapis.com"
OBJECT_ROLE = "roles/storage.objectUser"  # written only under write_condition
VIEWER_ROLE = "roles/storage.objectViewer"  # read under the run's folder
LISTER_ROLE = "geotrainNodeLister"  # the custom role infra/gcp/geotrain-node-lister-role.yaml makes
ACCOUNT_WAIT_S = 90.0  # GCE may not see a new service account for a while
RETRY_EVERY_S = 3.0
POLICY_ATTEMPTS = 8  # writes of the bucket policy that lost a race (412) before giving up
DESCRIPTION_MAX = 256  # bytes, IAM's limit on a service account's description


def account_id(run_id: str, site: str) -> str:
    """The account id of one site of one run: IAM allows 6-30 characters, run ids are up
    to 61, so a digest names it; its description says whose it is."""
    return "gt-" + hashlib.sha256(f"{run_id}\0{site}".encode()).hexdigest()[:24]


def account_email(project: str, run_id: str, site: str) -> str:
    return f"{account_id(run_id, site)}@{project}.iam.gserviceaccount.com"


def run_folder(store_url: str) -> tuple[str, str]:
    """(bucket, the run's folder inside it) of a gs:// run store URL."""
    scheme, _, rest = store_url.partition("://")
    bucket, _, folder = rest.partition("/")
    folder = folder.strip("/")
    if scheme != "gs" or not bucket or not folder or any(c in folder for c in '*?"\\'):
        raise ProviderError(f"gcp.run_account needs the run store in a gs:// bucket, in a folder "
                            f"of its own (got {store_url!r}); use gcp.service_account otherwise")
    return bucket, folder


def description(run_id: str, site: str, owner: str | None, bucket: str) -> str:
    """What the account's description records (JSON), for `parse_account`."""
    doc = {"run": run_id, "site": site, "bucket": bucket, **({"owner": owner} if owner else {})}
    text = json.dumps(doc, separators=(",", ":"), sort_keys=True)
    if len(text.encode()) > DESCRIPTION_MAX:
        raise ProviderError(f"site {site}: gcp.run_account cannot record run {run_id!r} and bucket "
                            f"{bucket!r} in a service account's {DESCRIPTION_MAX}-byte description; "
                            "use a shorter run name or bucket, or gcp.service_account")
    return text


def parse_account(account: dict) -> dict | None:
    """{"email", "run", "site", "owner", "bucket"} of a run account (a service account as
    the IAM API returns it), None for any other account."""
    try:
        doc = json.loads(account.get("description") or "")
    except ValueError:
        return None
    keys = {"run", "site", "bucket"}
    if not isinstance(doc, dict) or not keys <= set(doc) <= keys | {"owner"} \
            or not all(isinstance(v, str) and v for v in doc.values()):
        return None
    email = account.get("email") or ""
    if email.partition("@")[0] != account_id(doc["run"], doc["site"]):
        return None
    return {"email": email, "run": doc["run"], "site": doc["site"], "owner": doc.get("owner"),
            "bucket": doc["bucket"]}


def condition(store_url: str, run_id: str, site: str) -> dict:
    """The IAM condition that limits the account's read role (VIEWER_ROLE) to its run's folder."""
    bucket, folder = run_folder(store_url)
    return {"title": f"geotrain run {run_id} site {site}"[:100],
            "description": f"Only objects under the run's folder {folder}/ of this bucket."[:256],
            "expression": f'resource.name.startsWith("projects/_/buckets/{bucket}/objects/{folder}/")'}


def write_condition(store_url: str, run_id: str, site: str) -> dict:
    """The IAM condition that limits the account's write role (OBJECT_ROLE: create, and the
    delete GCS needs to overwrite) to the keys its member writes in the run's folder
    (geotrain/store/roster.py `member_writes`): `sites/<site>/`, its contribution and result
    under `rounds/` (names ending `/<site>.json` or `.bin`), a round's decision slots
    (`_members.json`, `_members.1.json` ...) and `global/`. Never another member's keys,
    nor run.json, control/ or final/. IAM allows 12 logical operators; this uses 12."""
    from geotrain.errors import StoreError
    from geotrain.store import member_writes
    from geotrain.store.decisions import SLOTS

    bucket, folder = run_folder(store_url)
    try:
        member_writes(site)
    except StoreError as e:
        raise ProviderError(f"gcp.run_account: {e}") from None
    if '"' in site or "\\" in site:
        raise ProviderError(f"gcp.run_account: cannot scope writes to the member name {site!r}")
    obj = f"projects/_/buckets/{bucket}/objects/{folder}"
    ends = [f"/{site}.json", f"/{site}.bin", "/_members.json"] + [f"/_members.{i}.json" for i in range(1, SLOTS)]
    expression = (f'resource.name.startsWith("{obj}/sites/{site}/") || '
                  f'resource.name.startsWith("{obj}/global/") || '
                  f'(resource.name.startsWith("{obj}/rounds/") && ('
                  + " || ".join(f'resource.name.endsWith("{e}")' for e in ends) + "))")
    assert expression.count("&&") + expression.count("||") <= 12, expression
    return {"title": f"geotrain run {run_id} site {site}: writes"[:100],
            "description": f"Only what site {site} writes under {folder}/."[:256],
            "expression": expression}


def lister_role(project: str) -> str:
    return f"projects/{project}/roles/{LISTER_ROLE}"


def _copy(bindings: list[dict]) -> list[dict]:
    return [dict(b, members=set(b.get("members") or ())) for b in bindings]


def granted(bindings: list[dict], email: str, conds: tuple[dict, dict], lister: str) -> list[dict]:
    """The bucket policy's bindings with the account's three added: VIEWER_ROLE under the
    read condition, OBJECT_ROLE under the write condition (`conds`: condition(),
    write_condition()) and the lister role (a second call adds nothing). Bindings are
    {"role", "members" (a set), "condition"?}, as google.api_core.iam.Policy.bindings
    holds them."""
    member, out = f"serviceAccount:{email}", _copy(bindings)
    for role, cond in zip((VIEWER_ROLE, OBJECT_ROLE), conds):
        if not any(b["role"] == role and b.get("condition") == cond and member in b["members"]
                   for b in out):
            out.append({"role": role, "members": {member}, "condition": cond})
    listing = next((b for b in out if b["role"] == lister and not b.get("condition")), None)
    if listing is None:
        out.append({"role": lister, "members": {member}})
    else:
        listing["members"].add(member)
    return out


def revoked(bindings: list[dict], email: str) -> list[dict]:
    """The bindings without the account (also as IAM shows it once deleted,
    `deleted:serviceAccount:EMAIL?uid=N`); bindings left with no member are dropped."""
    member = f"serviceAccount:{email}"
    out = []
    for b in _copy(bindings):
        b["members"] = {m for m in b["members"] if m != member
                        and not m.startswith(f"deleted:{member}?uid=")}
        if b["members"]:
            out.append(b)
    return out


def is_unseen(exc: Exception, email: str) -> bool:
    """A refusal naming an account that does not exist yet, as far as the service
    answering knows (IAM is eventually consistent)."""
    from google.api_core import exceptions as gexc

    text = str(exc).lower()
    return (isinstance(exc, (gexc.BadRequest, gexc.NotFound)) and email.lower() in text
            and ("does not exist" in text or "not found" in text))


def while_unseen(call: Callable, email: str, wait_s: float | None = None):
    """`call()`, retried every RETRY_EVERY_S while it is refused because `email` is not
    visible yet, for up to `wait_s` (default ACCOUNT_WAIT_S)."""
    deadline = time.monotonic() + (ACCOUNT_WAIT_S if wait_s is None else wait_s)
    while True:
        try:
            return call()
        except Exception as e:
            if not is_unseen(e, email) or time.monotonic() > deadline:
                raise
        time.sleep(RETRY_EVERY_S)


class Iam:
    """The IAM v1 REST calls on a project's service accounts that run accounts need."""

    def __init__(self, credentials, project: str):
        from google.auth.transport.requests import AuthorizedSession

        self.session = AuthorizedSession(credentials)
        self.project = project
        self.base = (os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT).rstrip("/")

    def _call(self, method: str, path: str, **kw) -> dict:
        from google.api_core import exceptions as gexc

        resp = self.session.request(method, f"{self.base}/v1/projects/{self.project}/{path}",
                                    timeout=60, **kw)
        if resp.status_code >= 400:
            raise gexc.from_http_response(resp)
        return resp.json() if resp.content.strip() else {}

    def create(self, account: str, display_name: str, text: str) -> dict:
        return self._call("POST", "serviceAccounts", json={
            "accountId": account,
            "serviceAccount": {"displayName": display_name, "description": text}})

    def get(self, email: str) -> dict:
        return self._call("GET", f"serviceAccounts/{email}")

    def delete(self, email: str) -> None:
        self._call("DELETE", f"serviceAccounts/{email}")

    def accounts(self) -> list[dict]:
        out, token = [], None
        while True:
            page = self._call("GET", "serviceAccounts",
                              params={"pageSize": 100, **({"pageToken": token} if token else {})})
            out += page.get("accounts") or []
            token = page.get("nextPageToken")
            if not token:
                return out


def edit_policy(bucket, change: Callable[[list[dict]], list[dict]], email: str) -> None:
    """Read the bucket's IAM policy (version 3), apply `change` to its bindings and write
    it back with the etag read; a write that lost a race (412) is done again from a fresh
    read. `bucket`: a google.cloud.storage Bucket."""
    from google.api_core import exceptions as gexc

    for attempt in range(POLICY_ATTEMPTS):
        policy = bucket.get_iam_policy(requested_policy_version=3)
        bindings = change(policy.bindings)
        if bindings == _copy(policy.bindings):
            return
        policy.bindings, policy.version = bindings, 3
        try:
            while_unseen(lambda: bucket.set_iam_policy(policy), email)
            return
        except gexc.PreconditionFailed:
            if attempt == POLICY_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def ensure_run_account(iam: Iam, bucket, run_id: str, site: str, owner: str | None,
                       store_url: str) -> str:
    """Make (or find) the site's account and grant it its run's folder in `bucket` (the
    run bucket's google.cloud.storage Bucket); returns its email. Safe to call again: a
    replacement launch reuses the account, its bindings written once."""
    from google.api_core import exceptions as gexc

    name, _ = run_folder(store_url)
    email = account_email(iam.project, run_id, site)
    try:
        iam.create(account_id(run_id, site), f"geotrain run {run_id} site {site}"[:100],
                   description(run_id, site, owner, name))
    except gexc.Conflict:
        pass  # made by an earlier launch of this site
    conds = condition(store_url, run_id, site), write_condition(store_url, run_id, site)
    edit_policy(bucket, lambda b: granted(b, email, conds, lister_role(iam.project)), email)
    return email


def remove_run_account(iam: Iam, bucket_named: Callable[[str], object], email: str) -> bool:
    """Remove the account's bindings from its run bucket's policy (the bucket its
    description names), then delete it; False when it was gone already, or is not a run
    account (`parse_account`), which is left alone."""
    from google.api_core import exceptions as gexc

    try:
        found = parse_account(iam.get(email))
    except gexc.NotFound:
        return False
    if found is None:  # not a run account (its description is not ours): never deleted
        return False
    edit_policy(bucket_named(found["bucket"]), lambda b: revoked(b, email), email)
    try:
        iam.delete(email)
    except gexc.NotFound:
        return False
    return True


def run_accounts(iam: Iam) -> list[dict]:
    """Every run account in the project, from their descriptions (`parse_account`)."""
    return [found for account in iam.accounts() if (found := parse_account(account))]
