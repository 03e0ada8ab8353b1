"""Azure role assignment conditions (ABAC, conditionVersion 2.0) for the test proxy
in front of Azurite (tests/fakes/azure_identity.py): a parser and evaluator of the
subset geotrain and Azure's own Blob Storage examples use, the data action each Blob
REST request needs, and the data actions of the built-in blob roles.

The grammar (learn.microsoft.com: "Azure role assignment condition format and syntax"):

    expr       := term (('AND' | '&&') term)*  |  term (('OR' | '||') term)*
    term       := ('!' | 'NOT') term  |  '(' expr ')'  |  call  |  comparison
    call       := 'ActionMatches' '{' STRING '}'  |  'SubOperationMatches' '{' STRING '}'
    comparison := '@' ('Resource' | 'Request') '[' ATTRIBUTE ']' OPERATOR (STRING | '{' STRING, ... '}')

AND and OR may not be mixed at one level without parentheses (Azure requires them
from three expressions on). Strings are single-quoted, without escapes. Anything
else (an unknown operator, attribute or function, a stray token) raises
`ConditionError`, so a typo in a condition fails a test instead of passing it.

Evaluation: an ActionMatches pattern is case-insensitive with `*` as a wildcard; a
comparison on an attribute the request does not have is false (List Blobs has no
blob path, only the Request attribute blob prefix, and a List Blobs without a
`prefix` query has none); StringLike takes `*` and `?`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote

BLOBS = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs"
CONTAINERS = "Microsoft.Storage/storageAccounts/blobServices/containers"
PATH = f"{BLOBS}:path"          # @Resource: the blob's name, no container, no leading /
PREFIX = f"{BLOBS}:prefix"      # @Request: a List Blobs' prefix
CONTAINER_NAME = f"{CONTAINERS}:name"
ACCOUNT_NAME = "Microsoft.Storage/storageAccounts:name"
ATTRIBUTES = {("Resource", PATH.lower()), ("Request", PREFIX.lower()),
              ("Resource", CONTAINER_NAME.lower()), ("Resource", ACCOUNT_NAME.lower())}

# Built-in roles: (Actions, DataActions), as their definitions list them.
BUILT_IN_NAMES = {"ba92f5b4-2d11-453d-a403-e96b0029c9fe": "Storage Blob Data Contributor",
                  "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1": "Storage Blob Data Reader"}
ROLES = {
    "ba92f5b4-2d11-453d-a403-e96b0029c9fe": (  # Storage Blob Data Contributor
        {f"{CONTAINERS}/{a}" for a in ("delete", "read", "write")},
        {f"{BLOBS}/{a}" for a in ("delete", "read", "write", "move/action", "add/action")}),
    "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1": (  # Storage Blob Data Reader
        {f"{CONTAINERS}/read"}, {f"{BLOBS}/read"}),
}


class ConditionError(ValueError):
    """A condition the evaluator does not understand (Azure would refuse it too, or it
    is outside the subset)."""


@dataclass(frozen=True)
class BlobRequest:
    """What a storage request asks for: its action, suboperation and attributes
    ({(source, attribute name lower-cased): value})."""

    action: str
    suboperation: str | None = None
    attributes: dict = field(default_factory=dict)


TOKEN = re.compile(r"\s*(?:(?P<str>'[^'\\]*')|(?P<op>&&|\|\||[!(){},])|"
                   r"(?P<attr>@(?:Resource|Request)\[[^\]]*\])|(?P<word>[A-Za-z][\w:]*))")
OPERATORS = {
    "StringEquals": lambda v, w: v == w,
    "StringNotEquals": lambda v, w: v != w,
    "StringEqualsIgnoreCase": lambda v, w: v.lower() == w.lower(),
    "StringStartsWith": lambda v, w: v.startswith(w),
    "StringNotStartsWith": lambda v, w: not v.startswith(w),
    "StringStartsWithIgnoreCase": lambda v, w: v.lower().startswith(w.lower()),
    "StringLike": lambda v, w: _like(w).fullmatch(v) is not None,
}


def _like(pattern: str) -> re.Pattern:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern),
                      re.DOTALL)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos, text = [], 0, text.rstrip()
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if m is None:
            raise ConditionError(f"cannot read the condition at {text[pos:pos + 30]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str):
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value) or (kind and tok[0] != kind):
            want = value or kind
            raise ConditionError(f"expected {want!r} at token {self.i}, found "
                                 f"{tok[1] if tok else 'the end'!r}")
        self.i += 1
        return tok[1]

    def expr(self):
        terms, joins = [self.term()], set()
        while (tok := self.peek()) is not None and tok[1] in ("AND", "&&", "OR", "||"):
            self.i += 1
            joins.add("and" if tok[1] in ("AND", "&&") else "or")
            terms.append(self.term())
        if len(joins) > 1:
            raise ConditionError("AND and OR mixed without parentheses")
        if not joins:
            return terms[0]
        return ("and" if joins == {"and"} else "or", terms)

    def term(self):
        tok = self.peek()
        if tok is None:
            raise ConditionError("the condition ends where an expression was expected")
        if tok[1] in ("!", "NOT"):
            self.i += 1
            return ("not", self.term())
        if tok[1] == "(":
            self.i += 1
            inner = self.expr()
            self.take(")")
            return inner
        if tok[1] in ("ActionMatches", "SubOperationMatches"):
            self.i += 1
            self.take("{")
            value = self.take(kind="str")[1:-1]
            self.take("}")
            return ("action" if tok[1] == "ActionMatches" else "subop", value)
        if tok[0] == "attr":
            return self.comparison()
        raise ConditionError(f"unexpected {tok[1]!r} at token {self.i}")

    def comparison(self):
        raw = self.take(kind="attr")
        source, name = raw[1:].split("[", 1)
        name = name[:-1]
        if (source, name.lower()) not in ATTRIBUTES:
            raise ConditionError(f"unknown attribute @{source}[{name}]")
        op = self.take(kind="word")
        if op not in OPERATORS:
            raise ConditionError(f"unknown operator {op!r}")
        if self.peek() is not None and self.peek()[1] == "{":
            self.i += 1
            values = [self.take(kind="str")[1:-1]]
            while self.peek() is not None and self.peek()[1] == ",":
                self.i += 1
                values.append(self.take(kind="str")[1:-1])
            self.take("}")
        else:
            values = [self.take(kind="str")[1:-1]]
        return ("cmp", (source, name.lower()), op, values)


def parse(condition: str):
    """The condition's syntax tree; raises ConditionError on anything not understood."""
    p = _Parser(condition)
    tree = p.expr()
    if p.peek() is not None:
        raise ConditionError(f"unexpected {p.peek()[1]!r} after the end of the condition")
    return tree


def evaluate(condition: str, request: BlobRequest) -> bool:
    """Whether `condition` allows `request`."""
    return _eval(parse(condition), request)


def _eval(node, req: BlobRequest) -> bool:
    kind = node[0]
    if kind == "and":
        return all(_eval(n, req) for n in node[1])
    if kind == "or":
        return any(_eval(n, req) for n in node[1])
    if kind == "not":
        return not _eval(node[1], req)
    if kind == "action":
        return _like(node[1].lower()).fullmatch(req.action.lower()) is not None
    if kind == "subop":
        return (req.suboperation or "").lower() == node[1].lower()
    _, key, op, values = node
    value = req.attributes.get(key)
    if value is None:  # the request has no such attribute
        return False
    return any(OPERATORS[op](value, w) for w in values)


def blob_request(method: str, path: str, query: str) -> tuple[str, str | None, BlobRequest]:
    """(account, container or None, what it asks) for a path-style Blob REST request
    `/ACCOUNT[/CONTAINER[/BLOB]]?QUERY`."""
    parts = path.lstrip("/").split("/", 2)
    account = parts[0]
    container = parts[1] if len(parts) > 1 and parts[1] else None
    blob = unquote(parts[2]) if len(parts) > 2 and parts[2] else None
    q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    attrs = {("Resource", ACCOUNT_NAME.lower()): account}
    if container:
        attrs[("Resource", CONTAINER_NAME.lower())] = container
    method = method.upper()
    if blob is None:
        if container and q.get("comp") == "list":  # List Blobs
            if "prefix" in q:
                attrs[("Request", PREFIX.lower())] = q["prefix"]
            return account, container, BlobRequest(f"{BLOBS}/read", "Blob.List", attrs)
        verb = {"PUT": "write", "DELETE": "delete"}.get(method, "read")
        return account, container, BlobRequest(f"{CONTAINERS}/{verb}", None, attrs)
    attrs[("Resource", PATH.lower())] = blob
    if q.get("comp") == "tags":
        verb = "tags/write" if method == "PUT" else "tags/read"
    else:
        verb = {"GET": "read", "HEAD": "read", "PUT": "write", "DELETE": "delete"}.get(method, "unknown")
    return account, container, BlobRequest(f"{BLOBS}/{verb}", None, attrs)


def scope_covers(scope: str, account: str, container: str | None) -> bool:
    """Whether an assignment's scope (an ARM id) holds this account's (container's) data:
    it must name the storage account, and the container if it names one."""
    parts = [p.lower() for p in scope.strip("/").split("/")]
    try:
        at = parts.index("storageaccounts")
    except ValueError:
        return False  # a subscription or group scope: the proxy cannot tell; not modelled
    if parts[at + 1] != account.lower():
        return False
    rest = parts[at + 2:]
    if not rest:
        return True
    return len(rest) == 4 and rest[2] == "containers" and container is not None \
        and rest[3] == container.lower()


def custom_roles(definitions: list[dict]) -> dict[str, tuple[set[str], set[str]]]:
    """{guid: (Actions, DataActions)} of custom role definitions as ARM renders them
    (`properties.permissions[]`); NotActions / NotDataActions are not used here and refused."""
    out = {}
    for d in definitions:
        actions, data_actions = set(), set()
        for p in (d.get("properties") or {}).get("permissions") or []:
            if p.get("notActions") or p.get("notDataActions"):
                raise ConditionError(f"role {d.get('name')}: NotActions are outside this stand-in")
            actions |= set(p.get("actions") or ())
            data_actions |= set(p.get("dataActions") or ())
        out[str(d["name"]).lower()] = (actions, data_actions)
    return out


def allows(assignment: dict, request: BlobRequest,
           roles: dict[str, tuple[set[str], set[str]]] | None = None) -> bool:
    """Whether one role assignment's properties (roleDefinitionId, condition) allow the
    request: its role (built in, or one of `roles`: custom_roles) has the action, and
    its condition (if any) is true."""
    role = assignment["roleDefinitionId"].rstrip("/").rsplit("/", 1)[-1].lower()
    actions, data_actions = {**ROLES, **(roles or {})}.get(role, (set(), set()))
    if request.action not in actions | data_actions:
        return False
    condition = assignment.get("condition")
    if not condition:
        return True
    if str(assignment.get("conditionVersion", "2.0")) != "2.0":
        raise ConditionError(f"conditionVersion {assignment.get('conditionVersion')!r} is not 2.0")
    return evaluate(condition, request)
