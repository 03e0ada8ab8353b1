"""The recipe's `aws:` block: how AWS nodes are made (identity, network, image, disk)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from providers.options import STORE_CREDENTIALS, OptionsSpec, disk, invalid, pattern, public_ip

AWS_SUBNET = pattern(r"^subnet-([0-9a-f]{8}|[0-9a-f]{17})$",
                     "expected a subnet id, 'subnet-' and 8 or 17 hex digits, e.g. "
                     "'subnet-0123456789abcdef0'")
AWS_AMI = pattern(r"^ami-([0-9a-f]{8}|[0-9a-f]{17})$",
                  "expected an AMI id, 'ami-' and 8 or 17 hex digits, e.g. 'ami-0123456789abcdef0'")
AWS_PROFILE = pattern(r"^(arn:aws[a-z-]*:iam::[0-9]{12}:instance-profile/[A-Za-z0-9_+=,.@/-]+|"
                      r"[A-Za-z0-9_+=,.@-]+)$",
                      "expected an IAM instance profile name, e.g. 'geotrain-node', or its ARN")
# Options tied to one region (an id that exists only there).
REGIONAL = ("subnets", "image")


class AwsOptions(OptionsSpec):
    """How AWS nodes are made: their identity, network, image and disk (recipe key `aws`)."""

    instance_profile: str | None = Field(
        None, pattern=AWS_PROFILE, max_length=2048, description="IAM instance profile (name or ARN) the nodes run "
        "as; it must allow the run store's bucket (infra/aws/README.md: 'geotrain-node'). "
        "Required for an s3:// store, unless run_role.")
    run_role: bool = Field(
        False, description="Launch makes an IAM role and instance profile for each site of the "
        "run, allowed to list, read and write only the run's folder of the s3:// store (no "
        "delete, nothing else), and deletes them with the site's nodes "
        "(providers/aws/iam.py). Instead of instance_profile; needs IAM rights on the path "
        "/geotrain/ (infra/aws/geotrain-user-policy.json).")
    subnets: list[Annotated[str, Field(pattern=AWS_SUBNET)]] = Field(
        [], description="Subnet ids to launch into, tried in the order of `zones` (one per zone); "
        "empty: the default VPC's default subnets. Regional: needs the placement's `region`.")
    image: str | None = Field(None, pattern=AWS_AMI, description="AMI id; default the newest AWS "
                              "Deep Learning AMI (PyTorch, Ubuntu 22.04). Regional: needs the "
                              "placement's `region`.")
    disk_gb: int = disk(100)
    public_ip: bool = public_ip()
    store_credentials: str | None = Field(None, min_length=1, description=STORE_CREDENTIALS)

    def makes_run_resources(self) -> bool:
        return self.run_role

    @model_validator(mode="after")
    def _one_identity(self) -> AwsOptions:
        if self.run_role and self.instance_profile:
            raise invalid("set instance_profile or run_role, not both: run_role makes the "
                          "nodes' profile itself", "run_role")
        return self
