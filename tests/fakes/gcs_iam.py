"""Bucket IAM bindings for the stand-in GCS (tests/fakes/gcs_identity.py), with conditions.

- `Binding` / `bindings_from(document, custom_roles)`: the bindings of a bucket IAM
  policy document as infra/gcp/run-bucket-policy.json writes them (role, members,
  optional condition {title, description, expression}). A member is an account's email
  (user:/serviceAccount:/group:) or, for workload identity federation, the whole
  `principalSet://iam.googleapis.com/...` (or `principal://`) member, which is what the
  stand-in STS's tokens are known by (tests/fakes/gcp_sts.py).
- `condition(expression)`: a tiny parser for the only CEL GCS conditions here use,
  `resource.name.startsWith("...")` / `endsWith("...")` joined by `&&` / `||` (and
  parentheses), at most 12 logical operators as IAM allows; anything
  else raises `ConditionError`, so a typo cannot grant silently.
- `request_checks(method, path, query, body)`: the (permission, resource name) pairs GCS
  checks for a JSON API request: objects are `projects/_/buckets/B/objects/NAME`, a
  bucket (listing its objects included) is `projects/_/buckets/B`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote

OBJECT_RW = frozenset({"storage.objects.get", "storage.objects.list", "storage.objects.create",
                       "storage.objects.delete", "storage.objects.update", "storage.objects.restore",
                       "storage.multipartUploads.create", "storage.multipartUploads.abort",
                       "storage.multipartUploads.listParts", "storage.multipartUploads.list"})
ROLES = {  # the predefined roles' storage permissions (object side), as Google lists them
    "roles/storage.objectUser": OBJECT_RW,
    "roles/storage.objectAdmin": OBJECT_RW | {"storage.objects.getIamPolicy", "storage.objects.setIamPolicy"},
    "roles/storage.objectViewer": frozenset({"storage.objects.get", "storage.objects.list"}),
    "roles/storage.objectCreator": frozenset({"storage.objects.create", "storage.multipartUploads.create",
                                              "storage.multipartUploads.abort",
                                              "storage.multipartUploads.listParts"}),
    "roles/storage.legacyBucketReader": frozenset({"storage.buckets.get", "storage.objects.list"}),
}
TOKEN = re.compile(r"\s*(?:resource\.name\.(?P<call>startsWith|endsWith)\s*\(\s*(?P<arg>\"(?:[^\"\\]|\\.)*\"|"
                   r"'(?:[^'\\]|\\.)*')\s*\)|(?P<op>&&|\|\|)|(?P<paren>[()]))")


MAX_LOGICAL_OPERATORS = 12  # IAM's limit per condition expression


class ConditionError(ValueError):
    """A condition expression (or a binding) this stand-in does not understand."""


def condition(expression: str) -> Callable[[str], bool]:
    """resource name -> whether the expression holds. `&&` binds tighter than `||`."""
    tokens, pos = [], 0
    while pos < len(expression.rstrip()):
        m = TOKEN.match(expression, pos)
        if not m:
            raise ConditionError(f"cannot parse condition at {expression[pos:pos + 40]!r} (this "
                                 "stand-in knows resource.name.startsWith / endsWith(\"...\") joined "
                                 "by && / ||)")
        if m["call"]:
            kind = "prefix" if m["call"] == "startsWith" else "suffix"
            tokens.append((kind, re.sub(r"\\(.)", r"\1", m["arg"][1:-1])))
        else:
            tokens.append(("op", m["op"] or m["paren"]))
        pos = m.end()
    if not tokens:
        raise ConditionError("empty condition expression")
    if sum(t in (("op", "&&"), ("op", "||")) for t in tokens) > MAX_LOGICAL_OPERATORS:
        raise ConditionError(f"more than {MAX_LOGICAL_OPERATORS} logical operators (IAM refuses "
                             f"the policy): {expression!r}")

    def parse_or(i):
        left, i = parse_and(i)
        while i < len(tokens) and tokens[i] == ("op", "||"):
            right, i = parse_and(i + 1)
            left = (lambda a, b: lambda name: a(name) or b(name))(left, right)
        return left, i

    def parse_and(i):
        left, i = parse_atom(i)
        while i < len(tokens) and tokens[i] == ("op", "&&"):
            right, i = parse_atom(i + 1)
            left = (lambda a, b: lambda name: a(name) and b(name))(left, right)
        return left, i

    def parse_atom(i):
        if i >= len(tokens):
            raise ConditionError(f"condition ends early: {expression!r}")
        kind, value = tokens[i]
        if kind == "prefix":
            return (lambda p: lambda name: name.startswith(p))(value), i + 1
        if kind == "suffix":
            return (lambda p: lambda name: name.endswith(p))(value), i + 1
        if value == "(":
            inner, i = parse_or(i + 1)
            if i >= len(tokens) or tokens[i] != ("op", ")"):
                raise ConditionError(f"unbalanced parentheses in {expression!r}")
            return inner, i + 1
        raise ConditionError(f"unexpected {value!r} in {expression!r}")

    test, end = parse_or(0)
    if end != len(tokens):
        raise ConditionError(f"unexpected {tokens[end][1]!r} in {expression!r}")
    return test


@dataclass(frozen=True)
class Binding:
    role: str
    permissions: frozenset[str]
    emails: frozenset[str]
    holds: Callable[[str], bool] | None  # the condition on the resource name; None: always
    expression: str | None = None


def bindings_from(document: dict, custom_roles: dict[str, set[str]] | None = None) -> list[Binding]:
    """The bindings of a bucket IAM policy document ({"bindings": [...]}); custom roles
    (`projects/P/roles/NAME` -> permissions) must be named in `custom_roles`."""
    roles = {**ROLES, **{k: frozenset(v) for k, v in (custom_roles or {}).items()}}
    out = []
    for i, b in enumerate(document.get("bindings") or []):
        unknown = set(b) - {"role", "members", "condition"}
        if unknown:
            raise ConditionError(f"bindings[{i}]: unknown keys {sorted(unknown)}")
        if b.get("role") not in roles:
            raise ConditionError(f"bindings[{i}]: role {b.get('role')!r} unknown to the stand-in "
                                 f"(known: {sorted(roles)})")
        emails = set()
        for m in b.get("members") or []:
            kind, _, email = m.partition(":")
            if kind in ("principalSet", "principal") and email.startswith("//iam.googleapis.com/"):
                emails.add(m)  # a federated identity, named whole (tests/fakes/gcp_sts.py)
                continue
            if kind not in ("user", "serviceAccount", "group") or not email:
                raise ConditionError(f"bindings[{i}]: member {m!r} is not user:/serviceAccount:/"
                                     "group:/principalSet:/principal:")
            emails.add(email)
        cond = b.get("condition")
        if cond is not None:
            if set(cond) - {"title", "description", "expression"} or not cond.get("title") \
                    or not cond.get("expression"):
                raise ConditionError(f"bindings[{i}].condition: needs title and expression, got {cond!r}")
        out.append(Binding(b["role"], roles[b["role"]], frozenset(emails),
                           condition(cond["expression"]) if cond else None,
                           cond["expression"] if cond else None))
    return out


def object_name(bucket: str, name: str) -> str:
    return f"projects/_/buckets/{bucket}/objects/{name}"


def _upload_name(query: dict, body: bytes) -> str | None:
    if query.get("name"):
        return query["name"]
    head = body[:64 * 1024].decode("utf-8", "replace")  # a multipart upload's metadata part
    m = re.search(r"\{.*?\"name\"\s*:\s*(\"(?:[^\"\\]|\\.)*\")", head, re.S)
    return json.loads(m[1]) if m else None


def request_checks(method: str, path: str, query: str, body: bytes) -> list[tuple[str, str]] | None:
    """[(permission, resource name)] a JSON API object request needs (creating an object
    that exists also needs storage.objects.delete: the caller adds that), or None when
    the request is not one this mapping knows (bucket-level calls but listing, batch)."""
    q = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
    m = re.fullmatch(r"(?:/upload|/download)?(?:/storage/v1)?/b/([^/]+)/o(?:/(.+))?", path)
    if not m:
        return None
    bucket, name = unquote(m[1]), unquote(m[2]) if m[2] else None
    if name is None:
        if method == "GET":
            return [("storage.objects.list", f"projects/_/buckets/{bucket}")]
        if method in ("POST", "PUT") and path.startswith("/upload/"):
            target = _upload_name(q, body)
            return [("storage.objects.create", object_name(bucket, target))] if target else None
        return None
    if re.search(r"/(copyTo|rewriteTo)/b/", "/" + name):
        src, _, rest = name.partition("/rewriteTo/b/") if "/rewriteTo/b/" in name else \
            name.partition("/copyTo/b/")
        dst_bucket, _, dst = rest.partition("/o/")
        return [("storage.objects.get", object_name(bucket, src)),
                ("storage.objects.create", object_name(dst_bucket, dst))]
    perm = {"GET": "storage.objects.get", "HEAD": "storage.objects.get",
            "DELETE": "storage.objects.delete", "PATCH": "storage.objects.update",
            "PUT": "storage.objects.update"}.get(method)
    return [(perm, object_name(bucket, name))] if perm else None


def infra_policy(bucket: str, prefix: str, project: str = "my-project",
                 operator: str = "me@example.com") -> tuple[dict, dict[str, set[str]]]:
    """(infra/gcp/run-bucket-policy.json with its placeholders filled, the custom roles it
    names -> their permissions from infra/gcp/*-role.yaml), for `apply_policy`."""
    from pathlib import Path

    import yaml

    infra = Path(__file__).resolve().parents[2] / "infra" / "gcp"
    text = (infra / "run-bucket-policy.json").read_text()
    for key, value in (("RUN_BUCKET", bucket), ("RUN_PREFIX", prefix.strip("/")),
                       ("PROJECT", project), ("OPERATOR_EMAIL", operator)):
        text = text.replace(key, value)
    lister = yaml.safe_load((infra / "geotrain-node-lister-role.yaml").read_text())
    return json.loads(text), {f"projects/{project}/roles/geotrainNodeLister":
                              set(lister["includedPermissions"])}
