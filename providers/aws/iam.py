"""A role made for one site of one run (`aws.run_role: true`): its nodes may list, read
and write only their run's folder of the s3:// run store, delete nothing, and do
nothing else.

A standing instance profile (`aws.instance_profile`, infra/aws/README.md) is granted
a store prefix by hand, once, so every run under that prefix shares it: one run's
nodes can read and overwrite another's. With `run_role`, `launch` makes, under the
IAM path `/geotrain/` (the operator's IAM rights can be limited to it:
infra/aws/geotrain-user-policy.json):

- the role `geotrain-<digest of run and site>`, which only EC2 may assume, tagged
  `geotrain-run`, `geotrain-site` (and `geotrain-owner`), with one inline policy:
  `s3:ListBucket` on the bucket with `s3:prefix` under the run's folder,
  `s3:GetObject` on `<bucket>/<run folder>/*`, and `s3:PutObject` only on the keys
  that site (the run's member) writes (geotrain/store/roster.py `member_writes`);
- an instance profile of the same name holding that role, which the nodes run as.

Every run role has the permissions boundary `geotrain-node-boundary` (the run bucket,
nothing else), and the operator's IAM rights on /geotrain/ demand it: the right to make
roles is not a way to make a role that does more (infra/aws/geotrain-user-policy.json).

`terminate` deletes both once no instance of that site is left (a replacement made
before the old nodes are gone keeps them). IAM is eventually consistent: EC2 may
refuse a profile made a moment ago, so `launch` retries that one refusal for up to
PROFILE_WAIT_S.
"""

from __future__ import annotations

import hashlib
import json
import time

from geotrain.errors import ProviderError

PATH = "/geotrain/"
POLICY_NAME = "geotrain-run-store"
BOUNDARY = "geotrain-node-boundary"  # the managed policy bounding every run role (infra/aws)
PROFILE_WAIT_S = 90.0  # EC2 may not see a new instance profile for ~10 s (IAM is eventually consistent)
TRUST = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


def role_name(run_id: str, site: str) -> str:
    """The role (and instance profile) of one site of one run: IAM names are at most 64
    characters, run ids up to 61, so a digest names it; its tags say whose it is."""
    return "geotrain-" + hashlib.sha256(f"{run_id}\0{site}".encode()).hexdigest()[:20]


def run_folder(store_url: str) -> tuple[str, str]:
    """(bucket, the run's folder inside it) of an s3:// run store URL."""
    scheme, _, rest = store_url.partition("://")
    bucket, _, folder = rest.partition("/")
    folder = folder.strip("/")
    if scheme != "s3" or not bucket or not folder or "*" in folder or "?" in folder:
        raise ProviderError(f"aws.run_role needs the run store in an s3:// bucket, in a folder "
                            f"of its own (got {store_url!r}); use aws.instance_profile otherwise")
    return bucket, folder


def store_policy(store_url: str, member: str) -> dict:
    """The inline policy of one member's role: read and list its run's folder, write only
    the keys that member writes (`member_writes`), delete nothing, nothing else. A node can
    then neither forge nor overwrite another member's records or contributions."""
    from geotrain.errors import StoreError
    from geotrain.store import member_writes

    bucket, folder = run_folder(store_url)
    try:
        keys = member_writes(member)
    except StoreError as e:
        raise ProviderError(f"aws.run_role: {e}") from None
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "ListTheRunFolder", "Effect": "Allow", "Action": "s3:ListBucket",
         "Resource": f"arn:aws:s3:::{bucket}",
         "Condition": {"StringLike": {"s3:prefix": [folder, f"{folder}/*"]}}},
        {"Sid": "ReadTheRunFolder", "Effect": "Allow", "Action": "s3:GetObject",
         "Resource": f"arn:aws:s3:::{bucket}/{folder}/*"},
        {"Sid": "WriteWhatThisMemberWrites", "Effect": "Allow", "Action": "s3:PutObject",
         "Resource": [f"arn:aws:s3:::{bucket}/{folder}/{key}" for key in keys]}]}


def boundary_arn(caller_arn: str) -> str:
    """The permissions boundary every run role gets, in the caller's account and partition
    (`arn:aws:iam::123456789012:user/me` -> `arn:aws:iam::123456789012:policy/geotrain-node-boundary`)."""
    parts = caller_arn.split(":")
    if len(parts) < 5 or not parts[4].isdigit():
        raise ProviderError(f"aws: cannot tell the account from the caller {caller_arn!r}")
    return f"arn:{parts[1]}:iam::{parts[4]}:policy/{BOUNDARY}"


def ensure_run_role(iam, sts, run_id: str, site: str, store_url: str, tags: list[dict]) -> str:
    """Make (or find) the site's role and instance profile; returns the profile's ARN.
    Safe to call again: a replacement launch reuses what is there, with its policy
    written again. The role is bounded by BOUNDARY (infra/aws/geotrain-node-boundary.json),
    which the operator's IAM rights require: those rights cannot make a role that could
    do more than use the run bucket."""
    from botocore.exceptions import ClientError

    name, policy = role_name(run_id, site), store_policy(store_url, site)
    boundary = boundary_arn(sts.get_caller_identity()["Arn"])

    def exists_ok(call, **kw):
        try:
            return call(**kw)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "EntityAlreadyExists":
                raise
            return None

    exists_ok(iam.create_role, RoleName=name, Path=PATH, Tags=tags, PermissionsBoundary=boundary,
              AssumeRolePolicyDocument=json.dumps(TRUST),
              Description=f"geotrain run {run_id} site {site}: its run's store folder only")
    _while_missing(lambda: iam.put_role_policy(RoleName=name, PolicyName=POLICY_NAME,
                                               PolicyDocument=json.dumps(policy)))
    made = exists_ok(iam.create_instance_profile, InstanceProfileName=name, Path=PATH, Tags=tags)
    # IAM is eventually consistent: a read right after a create may not see it yet, so the
    # new profile's ARN comes from the create's answer, and a step on a name just made is
    # retried while IAM says it does not exist.
    if made is not None:
        arn, roles = made["InstanceProfile"]["Arn"], set()
    else:
        profile = _while_missing(lambda: iam.get_instance_profile(InstanceProfileName=name))
        arn, roles = profile["InstanceProfile"]["Arn"], {r["RoleName"] for r in profile["InstanceProfile"].get("Roles", [])}
    if name not in roles:
        _while_missing(lambda: iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name))
    return arn


def _while_missing(call, wait_s: float = 30.0, every_s: float = 1.0):
    """`call()`, retried while IAM answers NoSuchEntity for up to `wait_s`."""
    from botocore.exceptions import ClientError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return call()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "NoSuchEntity" or time.monotonic() > deadline:
                raise
        time.sleep(every_s)


def delete_run_role(iam, run_id: str, site: str) -> bool:
    """Delete the site's instance profile and role (each step may already be done);
    True when something was deleted."""
    from botocore.exceptions import ClientError

    name, deleted = role_name(run_id, site), False

    def gone_ok(call, **kw) -> None:
        nonlocal deleted
        try:
            call(**kw)
            deleted = True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "NoSuchEntity":
                raise

    gone_ok(iam.remove_role_from_instance_profile, InstanceProfileName=name, RoleName=name)
    gone_ok(iam.delete_instance_profile, InstanceProfileName=name)
    gone_ok(iam.delete_role_policy, RoleName=name, PolicyName=POLICY_NAME)
    gone_ok(iam.delete_role, RoleName=name)
    return deleted


def run_roles(iam) -> list[dict]:
    """Every run role in the account ({"name", "run", "site", "owner"}), from their tags."""
    out = []
    for page in iam.get_paginator("list_roles").paginate(PathPrefix=PATH):
        for role in page["Roles"]:
            if role.get("Path") != PATH:
                continue
            tags = {t["Key"]: t["Value"] for t in
                    iam.list_role_tags(RoleName=role["RoleName"]).get("Tags", [])}
            run, site = tags.get("geotrain-run"), tags.get("geotrain-site")
            if run and site and role["RoleName"] == role_name(run, site):
                out.append({"name": role["RoleName"], "run": run, "site": site,
                            "owner": tags.get("geotrain-owner")})
    return out


def is_profile_not_ready(code: str, message: str) -> bool:
    """EC2's refusal of an instance profile it cannot see yet (IAM is eventually consistent)."""
    return code == "InvalidParameterValue" and "iaminstanceprofile" in message.lower()


def run_with_new_profile(call, wait_s: float = PROFILE_WAIT_S, every_s: float = 3.0):
    """`call()` (a RunInstances), retried while EC2 cannot see a profile made a moment ago."""
    from botocore.exceptions import ClientError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return call()
        except ClientError as e:
            err = e.response.get("Error", {})
            if not is_profile_not_ready(err.get("Code", ""), err.get("Message", "")) \
                    or time.monotonic() > deadline:
                raise
        time.sleep(every_s)
