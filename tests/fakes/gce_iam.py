"""The IAM v1 half of the Compute Engine stand-in (tests/fakes/gce_server.py): a project's
service accounts, as the IAM REST API serves them under `/v1/projects/{project}/`:

    POST   serviceAccounts            create ({"accountId", "serviceAccount": {...}})
    GET    serviceAccounts            list (pageSize, pageToken)
    GET    serviceAccounts/{email}    get
    DELETE serviceAccounts/{email}    delete

answered with the API's JSON (camelCase) and its error document
(`{"error": {"code", "message", "status"}}`: 400 INVALID_ARGUMENT, 404 NOT_FOUND,
409 ALREADY_EXISTS). The accounts live on the fake (`FakeGCE.service_accounts`), where
an instance insert can see them (`FakeGCE.account_visible`). The bearer token is checked
by the handler, as for Compute Engine calls.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.fakes.gce_server import FakeGCE

ACCOUNT_ID = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]")
STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 409: "ALREADY_EXISTS"}


def iam_error(code: int, message: str) -> dict:
    return {"error": {"code": code, "message": message, "status": STATUS[code]}}


def handle(gce: FakeGCE, method: str, path: str, query: dict, body: dict | None) -> tuple[int, dict]:
    """(status, JSON) for one IAM request whose path starts with /v1/ (caller holds the lock)."""
    m = re.fullmatch(r"/v1/projects/([^/]+)/serviceAccounts(?:/([^/]+))?", path)
    if not m or m[1] not in (gce.project, "-"):
        return 404, iam_error(404, f"Requested entity was not found: {path}")
    email = m[2]
    if email is None and method == "POST" and m[1] == gce.project:
        return _create(gce, body or {})
    if email is None and method == "GET":
        return _list(gce, query)
    if email is not None and method in ("GET", "DELETE"):
        account = gce.service_accounts.get(email)
        if account is None:
            return 404, iam_error(404, f"Unknown service account: {email}")
        if method == "DELETE":
            del gce.service_accounts[email]
            gce.account_made_at.pop(email, None)
            return 200, {}
        return 200, dict(account)
    return 404, iam_error(404, f"no route for {method} {path}")


def _create(gce: FakeGCE, body: dict) -> tuple[int, dict]:
    account_id = body.get("accountId") or ""
    spec = body.get("serviceAccount") or {}
    if not ACCOUNT_ID.fullmatch(account_id):
        return 400, iam_error(400, f"Invalid account id {account_id!r}: it must be 6-30 "
                              "characters, [a-z][a-z0-9-]*[a-z0-9].")
    if len(spec.get("description", "").encode()) > 256 or len(spec.get("displayName", "")) > 100:
        return 400, iam_error(400, "Description (256 bytes) or display name (100 characters) "
                              "too long.")
    email = f"{account_id}@{gce.project}.iam.gserviceaccount.com"
    if email in gce.service_accounts:
        return 409, iam_error(409, f"Service account {account_id} already exists within project "
                              f"projects/{gce.project}.")
    unique = str(100000000000000000000 + next(gce._ids))
    account = {"name": f"projects/{gce.project}/serviceAccounts/{email}", "projectId": gce.project,
               "uniqueId": unique, "email": email, "displayName": spec.get("displayName", ""),
               "description": spec.get("description", ""), "etag": secrets.token_urlsafe(8),
               "oauth2ClientId": unique}
    gce.service_accounts[email] = account
    gce.account_made_at[email] = time.monotonic()
    return 200, dict(account)


def _list(gce: FakeGCE, query: dict) -> tuple[int, dict]:
    size = int(query.get("pageSize") or 100)
    start = int(query.get("pageToken") or 0)
    emails = sorted(gce.service_accounts)
    page = {"accounts": [dict(gce.service_accounts[e]) for e in emails[start:start + size]]}
    if start + size < len(emails):
        page["nextPageToken"] = str(start + size)
    return 200, page
