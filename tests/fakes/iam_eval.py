"""A small, strict AWS IAM policy evaluator for the stand-in S3 (tests/fakes/aws_identity.py).

It evaluates identity policies the way AWS does for the subset geotrain's documents
use (infra/aws/*.json): `Effect` Allow/Deny, `Action` and `Resource` (string or list,
`*` and `?` wildcards), `Condition` with `StringEquals` / `StringLike` (several keys:
all must match; several values: any may) and `Null` ("true": the key is absent from the
request, "false": present). Default deny; an explicit Deny wins over any Allow. Anything
else in a document (NotAction, NotResource, Principal, other condition operators,
`...IfExists`, `ForAnyValue:`, policy variables, a `Null` value other than "true" /
"false") raises `PolicyError`, so a typo or a construct this evaluator does not know can
never pass silently.

    decision = evaluate([doc], "s3:GetObject", "arn:aws:s3:::b/runs/x", {})
    decision.allowed, decision.reason

One API call is often authorized as several checks (EC2's RunInstances: once per
resource it touches, each with its own condition context; IAM's CreateRole with tags:
iam:CreateRole and iam:TagRole). `evaluate_all` allows the call only when every check
is allowed, and says which one was not:

    evaluate_all([doc], [("ec2:RunInstances", "arn:aws:ec2:...:instance/*", {...}), ...])
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

VERSIONS = ("2012-10-17", "2008-10-17")
STATEMENT_KEYS = frozenset({"Sid", "Effect", "Action", "Resource", "Condition"})
OPERATORS = frozenset({"StringEquals", "StringLike", "Null"})


class PolicyError(ValueError):
    """A policy document this evaluator does not understand (or that is malformed)."""


@dataclass(frozen=True)
class Statement:
    sid: str
    effect: str  # "Allow" | "Deny"
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    conditions: tuple[tuple[str, str, tuple[str, ...]], ...]  # (operator, key, values)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # "allowed by <sid>", "explicitly denied by <sid>", "no statement allows it"
    refused: tuple[str, str, dict] | None = None  # evaluate_all: the (action, resource, context) refused


@lru_cache(maxsize=1024)
def _pattern(glob: str, ignore_case: bool) -> re.Pattern:
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob)
    return re.compile(f"^{body}$", re.S | (re.I if ignore_case else 0))


def _strings(value, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
        raise PolicyError(f"{where}: expected a non-empty string or list of strings, got {value!r}")
    for v in items:
        if "${" in v:
            raise PolicyError(f"{where}: policy variables are not supported ({v!r})")
    return tuple(items)


def parse(document: dict) -> tuple[Statement, ...]:
    """The statements of one identity policy document; PolicyError on anything unknown."""
    if not isinstance(document, dict):
        raise PolicyError(f"a policy document is a JSON object, got {type(document).__name__}")
    unknown = set(document) - {"Version", "Id", "Statement"}
    if unknown:
        raise PolicyError(f"unknown top-level keys {sorted(unknown)}")
    if document.get("Version") not in VERSIONS:
        raise PolicyError(f"Version must be one of {VERSIONS}, got {document.get('Version')!r}")
    raw = document.get("Statement")
    raw = [raw] if isinstance(raw, dict) else raw
    if not isinstance(raw, list) or not raw:
        raise PolicyError("Statement must be an object or a non-empty list of objects")
    out = []
    for i, st in enumerate(raw):
        where = f"Statement[{i}]"
        if not isinstance(st, dict):
            raise PolicyError(f"{where}: expected an object, got {st!r}")
        unknown = set(st) - STATEMENT_KEYS
        if unknown:
            raise PolicyError(f"{where}: unsupported keys {sorted(unknown)} (this evaluator knows "
                              f"{sorted(STATEMENT_KEYS)})")
        if st.get("Effect") not in ("Allow", "Deny"):
            raise PolicyError(f"{where}: Effect must be Allow or Deny, got {st.get('Effect')!r}")
        for key in ("Action", "Resource"):
            if key not in st:
                raise PolicyError(f"{where}: {key} is required")
        actions = _strings(st["Action"], f"{where}.Action")
        for a in actions:
            if a != "*" and not re.fullmatch(r"[a-z0-9-]+:[A-Za-z0-9*?]+", a):
                raise PolicyError(f"{where}.Action: {a!r} is not service:Action")
        resources = _strings(st["Resource"], f"{where}.Resource")
        for r in resources:
            if r != "*" and not r.startswith("arn:"):
                raise PolicyError(f"{where}.Resource: {r!r} is not an ARN")
        conditions = []
        cond = st.get("Condition", {})
        if not isinstance(cond, dict):
            raise PolicyError(f"{where}.Condition: expected an object, got {cond!r}")
        for op, block in cond.items():
            if op not in OPERATORS:
                raise PolicyError(f"{where}.Condition: operator {op!r} is not supported "
                                  f"(supported: {sorted(OPERATORS)})")
            if not isinstance(block, dict) or not block:
                raise PolicyError(f"{where}.Condition.{op}: expected a non-empty object")
            for key, values in block.items():
                values = _strings(values, f"{where}.Condition.{op}.{key}")
                if op == "Null" and not set(values) <= {"true", "false"}:
                    raise PolicyError(f"{where}.Condition.Null.{key}: expected \"true\" or "
                                      f"\"false\", got {list(values)}")
                conditions.append((op, key, values))
        out.append(Statement(str(st.get("Sid", f"#{i}")), st["Effect"], actions, resources,
                             tuple(conditions)))
    return tuple(out)


def _condition_holds(op: str, values: tuple[str, ...], actual: str | None) -> bool:
    if op == "Null":  # "true": the request has no such key; "false": it has one
        return ("true" if actual is None else "false") in values
    if actual is None:  # a key absent from the request matches nothing (no ...IfExists here)
        return False
    if op == "StringEquals":
        return actual in values
    return any(_pattern(v, False).match(actual) for v in values)


def matches(statement: Statement, action: str, resource: str, context: dict[str, str]) -> bool:
    """Whether the statement applies to this request (action, resource and conditions)."""
    if not any(_pattern(a, True).match(action) for a in statement.actions):
        return False
    if not any(_pattern(r, False).match(resource) for r in statement.resources):
        return False
    return all(_condition_holds(op, values, context.get(key))
               for op, key, values in statement.conditions)


def evaluate(documents: list[dict], action: str, resource: str,
             context: dict[str, str] | None = None) -> Decision:
    """AWS's verdict for one request under these identity policies (all parsed first:
    PolicyError if any of them is not understood)."""
    statements = [st for doc in documents for st in parse(doc)]
    context = context or {}
    applying = [st for st in statements if matches(st, action, resource, context)]
    denied = [st for st in applying if st.effect == "Deny"]
    if denied:
        return Decision(False, f"explicitly denied by {denied[0].sid}")
    allowed = [st for st in applying if st.effect == "Allow"]
    if allowed:
        return Decision(True, f"allowed by {allowed[0].sid}")
    return Decision(False, "no statement allows it")


def evaluate_all(documents: list[dict], checks: list[tuple[str, str, dict[str, str]]]) -> Decision:
    """AWS's verdict for one call authorized as several (action, resource, context) checks:
    allowed when every one is (a call of none, such as sts:GetCallerIdentity, needs no
    permission); otherwise the first refused one, in `refused` and named in the reason."""
    reasons = []
    for action, resource, context in checks:
        decision = evaluate(documents, action, resource, context)
        if not decision.allowed:
            return Decision(False, f"{action} on {resource}: {decision.reason}",
                            (action, resource, context))
        reasons.append(f"{action}: {decision.reason}")
    return Decision(True, "; ".join(dict.fromkeys(reasons)) or "needs no permission")
