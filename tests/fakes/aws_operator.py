"""What AWS authorizes for each call the operator's machine makes (the CLI and the
controller), so the stand-in cloud can judge them against the operator's IAM policy,
infra/aws/geotrain-user-policy.json (issue 12), as AWS would.

`OperatorCalls(moto_url).checks(request)` maps one signed request to the
(action, resource ARN, condition context) checks AWS makes for it, every one of which
must be allowed (tests/fakes/iam_eval.py `evaluate_all`), as AWS documents them:

- EC2 `Describe*`: `ec2:Describe...` on `*` (they have no resource-level permissions).
- `RunInstances`: `ec2:RunInstances` on every resource it touches: the new instance,
  volume, network interface (and spot request, for a spot launch) with
  `aws:RequestTag/...` from that resource type's tag specification; the image; the
  subnet; each security group with its tags as `aws:ResourceTag/...`; the key pair if
  named. Tags on create are `ec2:CreateTags` with `ec2:CreateAction`, and an instance
  profile is `iam:PassRole` on its role with `iam:PassedToService` ec2.amazonaws.com.
- `CreateSecurityGroup`: on the new group (request tags) and on its VPC, plus CreateTags.
- `AuthorizeSecurityGroupIngress`, `DeleteSecurityGroup`, `TerminateInstances`,
  `GetConsoleOutput`, `CreateTags`: on each named instance or group, with its current
  tags (read from moto) as `aws:ResourceTag/...`.
- IAM: on the role or instance profile ARN (with its path, from moto when it exists);
  `CreateRole` with `iam:PermissionsBoundary` and, with tags, `iam:TagRole` too;
  `PutRolePolicy` with the role's current boundary; `CreateInstanceProfile` with tags
  also `iam:TagInstanceProfile`; `AddRoleToInstanceProfile` also `iam:PassRole` on the
  role to EC2; `ListRoles` on `*` (it has no resource type).
- STS `GetCallerIdentity`: nothing (AWS allows it to everyone).
- S3 (path-style REST): tests/fakes/s3_actions.py `s3_checks`.

A call this module does not know, or a parameter of a known one that would touch a
resource it does not model (a launch template, a key pair by another route, ...), raises
`UnknownCall` naming it: the enforcing proxy denies it, so a new call in geotrain fails
the tests until the policy and this mapping cover it. A call naming an instance, group,
role or profile that does not exist raises `Missing`: the proxy lets moto answer it
with its own NotFound / NoSuchEntity error (what geotrain's cleanup code expects).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from pathlib import Path
from urllib.parse import parse_qs
from xml.sax.saxutils import escape as xml_escape

from tests.fakes.aws_identity import s3_error_xml
from tests.fakes.ec2_imds import ACCOUNT_ID
from tests.fakes.iam_eval import evaluate_all, parse
from tests.fakes.s3_actions import UnknownRequest, s3_checks

log = logging.getLogger("tests.fakes.ec2_boot")  # one logger for the AWS stand-in

ROOT = Path(__file__).resolve().parents[2]
Check = tuple[str, str, dict[str, str]]
EC2_CREATED = ("instance", "volume", "network-interface", "spot-instances-request")
# RunInstances parameters that name resources this mapping does not model.
UNMODELLED_RUN = re.compile(r"^(LaunchTemplate\.|Placement\.(Group|HostResourceGroup)|CapacityReservation|"
                            r"ElasticGpu|ElasticInferenceAccelerator|LicenseSpecification|"
                            r"SecurityGroup\.\d|NetworkInterface\.\d+\.NetworkInterfaceId)")
ID_TYPES = {"i-": "instance", "sg-": "security-group"}
# IAM calls authorized as themselves on the existing role / instance profile they name
# (its tags as aws:ResourceTag/..., its boundary as iam:PermissionsBoundary).
ON_ROLE = frozenset({"PutRolePolicy", "GetRole", "ListRoleTags", "DeleteRolePolicy", "DeleteRole"})
ON_PROFILE = frozenset({"GetInstanceProfile", "RemoveRoleFromInstanceProfile", "DeleteInstanceProfile"})


class UnknownCall(ValueError):
    """A call (or a parameter of one) whose IAM authorization this mapping does not know."""


class Missing(LookupError):
    """The call names a resource that does not exist: moto answers it, not the policy."""


def user_policy(bucket: str, account: str = ACCOUNT_ID) -> dict:
    """infra/aws/geotrain-user-policy.json with ACCOUNT_ID and RUN_BUCKET filled in, as
    infra/aws/README.md says to make it."""
    text = (ROOT / "infra/aws/geotrain-user-policy.json").read_text()
    return json.loads(text.replace("ACCOUNT_ID", account).replace("RUN_BUCKET", bucket))


def credential_scope(headers, query: str) -> tuple[str, str] | None:
    """(region, service) of a signed request: SigV4 (header or presigned URL), or SigV2,
    which only S3 still takes (a presigned URL of boto3's, as the nodes fetch their
    bundle by; its region is not in it)."""
    auth = headers.get("Authorization") or ""
    params = parse_qs(query)
    credential = None
    if auth.startswith("AWS4-HMAC-SHA256"):
        for part in auth[len("AWS4-HMAC-SHA256"):].split(","):
            name, _, value = part.strip().partition("=")
            if name == "Credential":
                credential = value
    elif auth.startswith("AWS ") or (not auth and params.get("AWSAccessKeyId")):
        return "", "s3"
    else:
        credential = (params.get("X-Amz-Credential") or [None])[0]
    parts = (credential or "").split("/")
    return (parts[2], parts[3]) if len(parts) == 5 else None


def _indexed(params: dict[str, str], prefix: str) -> dict[int, dict[str, str]]:
    """{N: {rest: value}} of the Query-API parameters `prefix.N.rest`."""
    out: dict[int, dict[str, str]] = {}
    for key, value in params.items():
        m = re.fullmatch(rf"{re.escape(prefix)}\.(\d+)\.(.+)", key)
        if m:
            out.setdefault(int(m[1]), {})[m[2]] = value
    return dict(sorted(out.items()))


def _members(params: dict[str, str], prefix: str) -> list[str]:
    """The values of `prefix.N`, in order."""
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)")
    found = {int(m[1]): v for k, v in params.items() if (m := pattern.fullmatch(k))}
    return [found[i] for i in sorted(found)]


def _pairs(flat: dict[str, str], prefix: str) -> dict[str, str]:
    """{key: value} of `prefix.N.Key` / `prefix.N.Value` (EC2 `Tag`, IAM `Tags.member`)."""
    return {t["Key"]: t.get("Value", "") for t in _indexed(flat, prefix).values() if "Key" in t}


def _tags(kind: str, tags: dict[str, str]) -> dict[str, str]:
    return {f"aws:{kind}/{k}": v for k, v in tags.items()}


class _Moto:
    """The current state of what a call names, read from moto (not through the proxy)."""

    def __init__(self, url: str):
        self.url, self._clients, self._lock = url, {}, threading.Lock()

    def _client(self, service: str, region: str = "us-east-1"):
        with self._lock:  # making clients is not thread-safe; using them is
            if (service, region) not in self._clients:
                import boto3
                from botocore.config import Config

                self._clients[service, region] = boto3.client(
                    service, endpoint_url=self.url, region_name=region, aws_access_key_id="x",
                    aws_secret_access_key="x", config=Config(retries={"max_attempts": 3}))
            return self._clients[service, region]

    def tags(self, region: str, kind: str, ids: list[str]) -> dict[str, dict[str, str]]:
        """{id: tags} of instances or security groups; Missing if one does not exist."""
        ec2 = self._client("ec2", region)
        if kind == "instance":
            found = [i for r in ec2.describe_instances(Filters=[{"Name": "instance-id", "Values": ids}])
                     ["Reservations"] for i in r["Instances"]]
            by_id = {i["InstanceId"]: i for i in found}
        else:
            found = ec2.describe_security_groups(Filters=[{"Name": "group-id", "Values": ids}])
            by_id = {g["GroupId"]: g for g in found["SecurityGroups"]}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise Missing(f"no {kind} {', '.join(missing)} in {region}")
        return {i: {t["Key"]: t["Value"] for t in by_id[i].get("Tags", [])} for i in ids}

    def role(self, name: str) -> dict:
        return self._iam(lambda iam: iam.get_role(RoleName=name)["Role"], f"role {name}")

    def profile(self, name: str) -> dict:
        return self._iam(lambda iam: iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"],
                         f"instance profile {name}")

    def _iam(self, call, what: str) -> dict:
        from botocore.exceptions import ClientError
        try:
            return call(self._client("iam"))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "NoSuchEntity":
                raise Missing(f"no {what}") from None
            raise


class OperatorCalls:
    """Maps the operator's signed requests to the checks AWS makes (see the module doc)."""

    def __init__(self, moto_url: str, account: str = ACCOUNT_ID):
        self.moto, self.account = _Moto(moto_url), account

    def checks(self, method: str, path: str, query: str, headers, body: bytes,
               form: dict[str, str]) -> tuple[str, list[Check]]:
        """(service, [(action, resource, context)]) of one request; UnknownCall / Missing."""
        scope = credential_scope(headers, query)
        if scope is None:
            raise UnknownCall(f"{method} {path}: not signed (the operator always signs)")
        region, service = scope
        if service == "s3":
            try:
                return service, s3_checks(method, path, query, headers, body)
            except UnknownRequest as e:
                raise UnknownCall(f"s3: {e}") from None
        action = form.get("Action", "")
        if service not in ("ec2", "iam", "sts") or not action:
            raise UnknownCall(f"{service} {method} {path} {action}: not a call geotrain's operator makes")
        if service == "ec2" and action.startswith("Describe"):
            return service, [(f"ec2:{action}", "*", {})]
        if service == "iam" and action in ON_ROLE:
            return service, [(f"iam:{action}", *self._role(form))]
        if service == "iam" and action in ON_PROFILE:
            return service, [(f"iam:{action}", self.moto.profile(form["InstanceProfileName"])["Arn"], {})]
        handler = getattr(self, f"_{service}_{action}", None)
        if handler is None:
            raise UnknownCall(f"{service}:{action} is not a call geotrain makes (tests/fakes/"
                              "aws_operator.py does not map it; add it there and to the policy)")
        return service, handler(region, form)

    # -- EC2 -----------------------------------------------------------------------------

    def _ec2(self, region: str, what: str) -> str:
        return f"arn:aws:ec2:{region}:{self.account}:{what}"

    @staticmethod
    def _tag_specs(p: dict[str, str], allowed: tuple[str, ...], action: str) -> dict[str, dict[str, str]]:
        specs: dict[str, dict[str, str]] = {}
        for spec in _indexed(p, "TagSpecification").values():
            kind = spec.get("ResourceType", "")
            if kind not in allowed:
                raise UnknownCall(f"ec2:{action} tagging a {kind!r} on create is not modelled")
            specs.setdefault(kind, {}).update(_pairs(spec, "Tag"))
        return specs

    def _on_existing(self, region: str, action: str, kind: str, ids: list[str]) -> list[Check]:
        if not ids:
            raise UnknownCall(f"ec2:{action} without a {kind} id is not modelled")
        tags = self.moto.tags(region, kind, ids)
        return [(f"ec2:{action}", self._ec2(region, f"{kind}/{i}"), _tags("ResourceTag", tags[i]))
                for i in ids]

    def _ec2_RunInstances(self, region: str, p: dict[str, str]) -> list[Check]:
        odd = sorted(k for k in p if UNMODELLED_RUN.match(k))
        if odd:
            raise UnknownCall(f"ec2:RunInstances with {', '.join(odd)} is not modelled")
        specs = self._tag_specs(p, EC2_CREATED, "RunInstances")
        created = list(EC2_CREATED[:3])
        if p.get("InstanceMarketOptions.MarketType") == "spot":
            created.append("spot-instances-request")
        checks = [("ec2:RunInstances", self._ec2(region, f"{kind}/*"),
                   _tags("RequestTag", specs.get(kind, {}))) for kind in created]
        if "ImageId" not in p:
            raise UnknownCall("ec2:RunInstances without ImageId (a launch template) is not modelled")
        checks.append(("ec2:RunInstances", f"arn:aws:ec2:{region}::image/{p['ImageId']}", {}))
        nics = _indexed(p, "NetworkInterface").values()
        subnets = [s for s in [p.get("SubnetId")] + [n.get("SubnetId") for n in nics] if s]
        groups = _members(p, "SecurityGroupId") + [g for n in nics for g in _members(n, "SecurityGroupId")]
        if not subnets or not groups:
            raise UnknownCall("ec2:RunInstances into a default subnet or group is not modelled")
        checks += [("ec2:RunInstances", self._ec2(region, f"subnet/{s}"), {}) for s in subnets]
        checks += self._on_existing(region, "RunInstances", "security-group", groups)
        if p.get("KeyName"):
            checks.append(("ec2:RunInstances", self._ec2(region, f"key-pair/{p['KeyName']}"), {}))
        checks += [("ec2:CreateTags", self._ec2(region, f"{kind}/*"),
                    {"ec2:CreateAction": "RunInstances", **_tags("RequestTag", tags)})
                   for kind, tags in specs.items()]
        profile = p.get("IamInstanceProfile.Name") or p.get("IamInstanceProfile.Arn", "").rpartition("/")[2]
        if profile:
            for role in self.moto.profile(profile).get("Roles", []):
                checks.append(("iam:PassRole", role["Arn"], {"iam:PassedToService": "ec2.amazonaws.com"}))
        return checks

    def _ec2_CreateSecurityGroup(self, region: str, p: dict[str, str]) -> list[Check]:
        if not p.get("VpcId"):
            raise UnknownCall("ec2:CreateSecurityGroup in the default VPC (no VpcId) is not modelled")
        tags = self._tag_specs(p, ("security-group",), "CreateSecurityGroup").get("security-group")
        group = self._ec2(region, "security-group/*")
        checks = [("ec2:CreateSecurityGroup", group, _tags("RequestTag", tags or {})),
                  ("ec2:CreateSecurityGroup", self._ec2(region, f"vpc/{p['VpcId']}"), {})]
        if tags is not None:
            checks.append(("ec2:CreateTags", group, {"ec2:CreateAction": "CreateSecurityGroup",
                                                     **_tags("RequestTag", tags)}))
        return checks

    def _ec2_AuthorizeSecurityGroupIngress(self, region: str, p: dict[str, str]) -> list[Check]:
        if _indexed(p, "TagSpecification"):
            raise UnknownCall("ec2:AuthorizeSecurityGroupIngress tagging its rules is not modelled")
        return self._on_existing(region, "AuthorizeSecurityGroupIngress", "security-group",
                                 [p["GroupId"]] if "GroupId" in p else [])

    def _ec2_DeleteSecurityGroup(self, region: str, p: dict[str, str]) -> list[Check]:
        return self._on_existing(region, "DeleteSecurityGroup", "security-group",
                                 [p["GroupId"]] if "GroupId" in p else [])

    def _ec2_TerminateInstances(self, region: str, p: dict[str, str]) -> list[Check]:
        return self._on_existing(region, "TerminateInstances", "instance", _members(p, "InstanceId"))

    def _ec2_GetConsoleOutput(self, region: str, p: dict[str, str]) -> list[Check]:
        return self._on_existing(region, "GetConsoleOutput", "instance",
                                 [p["InstanceId"]] if "InstanceId" in p else [])

    def _ec2_CreateTags(self, region: str, p: dict[str, str]) -> list[Check]:
        tags, checks = _tags("RequestTag", _pairs(p, "Tag")), []
        for rid in _members(p, "ResourceId"):
            kind = next((k for prefix, k in ID_TYPES.items() if rid.startswith(prefix)), None)
            if kind is None:
                raise UnknownCall(f"ec2:CreateTags on {rid} is not modelled")
            on = self._on_existing(region, "CreateTags", kind, [rid])
            checks += [(a, r, {**c, **tags}) for a, r, c in on]
        return checks

    # -- IAM -----------------------------------------------------------------------------

    def _iam(self, kind: str, path: str, name: str) -> str:
        return f"arn:aws:iam::{self.account}:{kind}{path or '/'}{name}"

    def _role(self, p: dict[str, str]) -> tuple[str, dict[str, str]]:
        role = self.moto.role(p["RoleName"])
        context = _tags("ResourceTag", {t["Key"]: t["Value"] for t in role.get("Tags", [])})
        boundary = (role.get("PermissionsBoundary") or {}).get("PermissionsBoundaryArn")
        if boundary:
            context["iam:PermissionsBoundary"] = boundary
        return role["Arn"], context

    def _iam_CreateRole(self, region: str, p: dict[str, str]) -> list[Check]:
        arn, tags = self._iam("role", p.get("Path", "/"), p["RoleName"]), _pairs(p, "Tags.member")
        context = _tags("RequestTag", tags)
        if p.get("PermissionsBoundary"):
            context["iam:PermissionsBoundary"] = p["PermissionsBoundary"]
        return [("iam:CreateRole", arn, context)] + (
            [("iam:TagRole", arn, _tags("RequestTag", tags))] if tags else [])

    def _iam_TagRole(self, region: str, p: dict[str, str]) -> list[Check]:
        arn, context = self._role(p)
        return [("iam:TagRole", arn, {**context, **_tags("RequestTag", _pairs(p, "Tags.member"))})]

    def _iam_ListRoles(self, region: str, p: dict[str, str]) -> list[Check]:
        return [("iam:ListRoles", "*", {})]

    def _iam_CreateInstanceProfile(self, region: str, p: dict[str, str]) -> list[Check]:
        arn = self._iam("instance-profile", p.get("Path", "/"), p["InstanceProfileName"])
        tags = _pairs(p, "Tags.member")
        return [("iam:CreateInstanceProfile", arn, _tags("RequestTag", tags))] + (
            [("iam:TagInstanceProfile", arn, _tags("RequestTag", tags))] if tags else [])

    def _iam_AddRoleToInstanceProfile(self, region: str, p: dict[str, str]) -> list[Check]:
        profile = self.moto.profile(p["InstanceProfileName"])["Arn"]
        role = self.moto.role(p["RoleName"])["Arn"]
        return [("iam:AddRoleToInstanceProfile", profile, {}),
                ("iam:PassRole", role, {"iam:PassedToService": "ec2.amazonaws.com"})]

    # -- STS -----------------------------------------------------------------------------

    def _sts_GetCallerIdentity(self, region: str, p: dict[str, str]) -> list[Check]:
        return []  # AWS answers it for any valid credentials, whatever the policies say



# -- the enforcer ----------------------------------------------------------------------------

def _query_error(service: str, message: str) -> bytes:
    """The error document of a Query API: EC2's, or IAM's / STS's ErrorResponse."""
    message, request_id = xml_escape(message), uuid.uuid4()
    if service == "ec2":
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
                f"<Code>UnauthorizedOperation</Code><Message>{message}</Message></Error></Errors>"
                f"<RequestID>{request_id}</RequestID></Response>").encode()
    namespace = {"iam": "https://iam.amazonaws.com/doc/2010-05-08/",
                 "sts": "https://sts.amazonaws.com/doc/2011-06-15/"}.get(service, "")
    return (f'<ErrorResponse xmlns="{namespace}"><Error><Type>Sender</Type><Code>AccessDenied</Code>'
            f"<Message>{message}</Message></Error><RequestId>{request_id}</RequestId>"
            "</ErrorResponse>").encode()


class OperatorPolicy:
    """Judges each request the operator sends (through tests/fakes/aws_faults.py
    `FaultProxy.enforce`) under its identity policies, as AWS would: None to forward it,
    or (403, AWS's error document) to answer it with (EC2 `UnauthorizedOperation`, IAM /
    STS `AccessDenied` in an ErrorResponse, S3 `AccessDenied`). Every judged call is in
    `judged` ({"call", "service", "checks", "allowed", "why"}); `denied()` lists refusals.
    The documents are parsed at once: one this evaluator does not know raises PolicyError
    here, not at the first call."""

    def __init__(self, moto_url: str, documents: list[dict], account: str = ACCOUNT_ID,
                 principal: str | None = None):
        for document in documents:
            parse(document)
        self.documents = list(documents)
        self.calls = OperatorCalls(moto_url, account)
        self.principal = principal or f"arn:aws:iam::{account}:user/geotrain-operator"
        self.judged: list[dict] = []
        self.lock = threading.Lock()

    def denied(self) -> list[dict]:
        with self.lock:
            return [j for j in self.judged if not j["allowed"]]

    def judge(self, method: str, path: str, query: str, headers, body: bytes,
              form: dict[str, str]) -> tuple[int, bytes] | None:
        call = form.get("Action") or f"{method} {path}"
        scope = credential_scope(headers, query)
        service = scope[1] if scope else ("s3" if not form else "ec2")
        checks: list[Check] = []
        try:
            service, checks = self.calls.checks(method, path, query, headers, body, form)
            decision = evaluate_all(self.documents, checks)
            allowed, why, refused = decision.allowed, decision.reason, decision.refused
        except Missing as e:  # moto answers with its own NotFound
            allowed, why, refused = True, f"not judged: {e}", None
        except Exception as e:  # noqa: BLE001 - an unknown call, or one that cannot be judged
            allowed, why, refused = False, f"{type(e).__name__}: {e}", None
        with self.lock:
            self.judged.append({"call": call, "service": service, "checks": checks,
                                "allowed": allowed, "why": why})
        if allowed:
            return None
        log.warning("operator policy refused %s %s: %s", service, call, why)
        if refused is None:
            message = f"the stand-in cannot authorize {service} {call}: {why}"
        else:
            action, resource, _ = refused
            verdict = ("an identity-based policy explicitly denies" if "explicitly" in why
                       else "no identity-based policy allows")
            message = (f"User: {self.principal} is not authorized to perform: {action} on resource: "
                       f"{resource} because {verdict} the {action} action ({why})")
        if service == "s3":
            return 403, s3_error_xml("AccessDenied", f"Access Denied: {message}", path)
        if service == "ec2":
            message = f"You are not authorized to perform this operation. {message}"
        return 403, _query_error(service, message)
