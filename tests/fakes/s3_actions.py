"""What IAM checks for an S3 REST request, and a role's policies as moto's IAM holds them:
the two halves of the stand-in S3's policy enforcement (tests/fakes/aws_identity.py,
evaluated by tests/fakes/iam_eval.py).

`s3_checks(method, path, query, headers, body)` maps a path-style S3 request to the
(action, resource ARN, condition context) triples AWS authorizes, as AWS documents them:
GetObject/HeadObject -> s3:GetObject on arn:aws:s3:::bucket/key; PutObject and every
multipart step but abort -> s3:PutObject; DeleteObject(s) -> s3:DeleteObject;
ListObjects(V2) and HeadBucket -> s3:ListBucket on arn:aws:s3:::bucket with `s3:prefix`
(and `s3:delimiter`, `s3:max-keys`) when the request has them; CopyObject -> s3:PutObject on
the target and s3:GetObject on the source. A request it does not know raises
`UnknownRequest` (the proxy logs it and denies it).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote, urlsplit

# Query parameters that do not change which action a request is (signing, response
# overrides, botocore's x-id, ranged part reads, listing parameters).
NEUTRAL = re.compile(r"^(x-amz-.*|response-.*|awsaccesskeyid|signature|expires|x-id|partnumber|"
                     r"list-type|prefix|delimiter|max-keys|continuation-token|start-after|"
                     r"encoding-type|fetch-owner|marker)$", re.I)
DELETE_KEY = re.compile(r"<Key>(.*?)</Key>", re.S)


class UnknownRequest(ValueError):
    """An S3 request this mapping does not know the IAM action of."""


def _xml_unescape(text: str) -> str:
    return (text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
            .replace("&apos;", "'").replace("&amp;", "&"))


def needs_body(method: str, query: str) -> bool:
    """Whether the request's checks depend on its body (DeleteObjects names its keys there)."""
    return method == "POST" and "delete" in parse_qs(query, keep_blank_values=True)


def s3_checks(method: str, path: str, query: str, headers, body: bytes | None = None
              ) -> list[tuple[str, str, dict[str, str]]]:
    """[(action, resource ARN, condition context)]: all must be allowed."""
    params = {k.lower(): v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
    subs = {k for k in params if not NEUTRAL.match(k)}
    bucket, _, key = unquote(path).lstrip("/").partition("/")
    what = f"{method} {path}{'?' + query if query else ''}"
    if not bucket:
        if method == "GET" and not subs:
            return [("s3:ListAllMyBuckets", "*", {})]
        raise UnknownRequest(f"no IAM action known for {what}")
    bucket_arn = f"arn:aws:s3:::{bucket}"
    if not key:
        if (method == "GET" and not subs) or (method == "HEAD" and not subs):
            context = {f"s3:{name}": params[name] for name in ("prefix", "delimiter", "max-keys")
                       if name in params}
            return [("s3:ListBucket", bucket_arn, context)]
        if method == "GET" and subs == {"location"}:
            return [("s3:GetBucketLocation", bucket_arn, {})]
        if method == "GET" and subs == {"uploads"}:
            return [("s3:ListBucketMultipartUploads", bucket_arn, {})]
        if method == "POST" and subs == {"delete"}:
            keys = [_xml_unescape(k) for k in DELETE_KEY.findall((body or b"").decode("utf-8", "replace"))]
            if not keys:
                raise UnknownRequest(f"DeleteObjects without keys: {what}")
            return [("s3:DeleteObject", f"{bucket_arn}/{k}", {}) for k in keys]
        raise UnknownRequest(f"no IAM action known for {what}")
    object_arn = f"{bucket_arn}/{key}"
    if method in ("GET", "HEAD") and not subs:
        return [("s3:GetObject", object_arn, {})]
    if method == "GET" and subs == {"uploadid"}:
        return [("s3:ListMultipartUploadParts", object_arn, {})]
    if method == "PUT" and subs <= {"uploadid"}:
        checks = [("s3:PutObject", object_arn, {})]
        source = headers.get("x-amz-copy-source")
        if source:  # CopyObject / UploadPartCopy: read the source too
            src = urlsplit(unquote(source).lstrip("/")).path
            checks.append(("s3:GetObject", f"arn:aws:s3:::{src}", {}))
        return checks
    if method == "POST" and subs in ({"uploads"}, {"uploadid"}):
        return [("s3:PutObject", object_arn, {})]
    if method == "DELETE" and subs == {"uploadid"}:
        return [("s3:AbortMultipartUpload", object_arn, {})]
    if method == "DELETE" and not subs:
        return [("s3:DeleteObject", object_arn, {})]
    raise UnknownRequest(f"no IAM action known for {what}")


class RolePolicies:
    """A role's identity policies as moto's IAM at `iam_url` holds them, read at each
    call (inline ones and the default version of each attached one)."""

    def __init__(self, iam_url: str):
        import boto3
        from botocore.config import Config

        self._iam = boto3.client("iam", endpoint_url=iam_url, region_name="us-east-1",
                                 aws_access_key_id="testing", aws_secret_access_key="testing",
                                 config=Config(retries={"max_attempts": 3}))

    def __call__(self, role: str) -> list[dict]:
        import json

        def doc(d):
            return json.loads(unquote(d)) if isinstance(d, str) else d
        iam, docs = self._iam, []
        for name in iam.list_role_policies(RoleName=role)["PolicyNames"]:
            docs.append(doc(iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]))
        for att in iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]:
            version = iam.get_policy(PolicyArn=att["PolicyArn"])["Policy"]["DefaultVersionId"]
            docs.append(doc(iam.get_policy_version(PolicyArn=att["PolicyArn"], VersionId=version)
                            ["PolicyVersion"]["Document"]))
        return docs
