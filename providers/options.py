"""What the recipe's provider option blocks (`aws:`, `gcp:`, `azure:`) share: the
model config, the error type recipe.py turns into one line, the disk and public-IP
fields, the store-credentials text, and the hints that pattern errors get. Each
provider's own options live in its package (providers/<cloud>/options.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

# Pattern -> what a value that does not match it should look like (recipe.py's messages).
PATTERN_HINTS: dict[str, str] = {}

STORE_CREDENTIALS = (
    "Cross-cloud store access, no key anywhere. For an s3:// run store from a GCP or Azure "
    "placement: the ARN of an AWS role the node assumes by web identity with its own cloud's "
    "token (its service account's identity token; its managed identity's token for "
    "api://AzureADTokenExchange; infra/aws/README.md). For a gs:// run store from an AWS "
    "placement: the full resource name of the GCP workload identity pool provider its "
    "instance profile's role is federated through, //iam.googleapis.com/projects/NUMBER/"
    "locations/global/workloadIdentityPools/POOL/providers/PROVIDER (infra/gcp/README.md). "
    "Required by `geotrain launch` for such a site. An az:// store on another cloud, or a "
    "gs:// one from Azure, is not built yet and is refused at launch.")


class OptionsSpec(BaseModel):
    """The config every recipe section has (geotrain/recipe.py `_Spec`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def makes_run_resources(self) -> bool:
        """Whether launch makes resources for the run beside its nodes with these options
        (providers.RunResources), which `down` must remove even if no node was made."""
        return False


def invalid(message: str, *at: str | int) -> PydanticCustomError:
    """A validation error at `at`, a path below the validated model's own location."""
    return PydanticCustomError("geotrain", message, {"at": at})


def pattern(regex: str, hint: str) -> str:
    """`regex`, with the hint a value that does not match it gets."""
    PATTERN_HINTS[regex] = hint
    return regex


def disk(default: int) -> Any:
    return Field(default, ge=8, le=65536, description="Boot disk size in GB.")


def public_ip() -> Any:
    return Field(False, description="Give each node a public IP. Off by default: nodes reach the "
                 "store and package mirrors outbound (NAT / default outbound access) and nothing "
                 "reaches them; no port is opened either way.")
