"""The recipe's `azure:` block: how Azure VMs are made (identity, network, image, disk)."""

from __future__ import annotations

from pydantic import Field, model_validator

from providers.options import STORE_CREDENTIALS, OptionsSpec, disk, invalid, pattern, public_ip

AZURE_ID = r"^/subscriptions/[^/\s]+/resourceGroups/[^/\s]+/providers/"
AZURE_IDENTITY = pattern(r"(?i)^(system|/subscriptions/[^/\s]+/resourceGroups/[^/\s]+/providers/"
                         r"Microsoft\.ManagedIdentity/userAssignedIdentities/[^/\s]+)$",
                         "expected 'system' or the resource id of a user-assigned managed identity, "
                         "'/subscriptions/SUB/resourceGroups/RG/providers/Microsoft.ManagedIdentity/"
                         "userAssignedIdentities/NAME'")
AZURE_SUBNET = pattern(r"(?i)^/subscriptions/[^/\s]+/resourceGroups/[^/\s]+/providers/"
                       r"Microsoft\.Network/virtualNetworks/[^/\s]+/subnets/[^/\s]+$",
                       "expected a subnet's resource id, '/subscriptions/SUB/resourceGroups/RG/"
                       "providers/Microsoft.Network/virtualNetworks/VNET/subnets/NAME'")
AZURE_IMAGE = pattern(r"(?i)^([^:/\s]+:[^:/\s]+:[^:/\s]+:[^:/\s]+|/subscriptions/[^/\s]+/resourceGroups/\S+)$",
                      "expected a marketplace image 'publisher:offer:sku:version' or an image's "
                      "resource id '/subscriptions/…'")
NODE_STORE_ROLE = "geotrain node store"  # infra/azure/geotrain-node-store-role.json
# Options tied to one region (an id that exists only there).
REGIONAL = ("subnet",)


class AzureOptions(OptionsSpec):
    """How Azure VMs are made: their identity, network, image and disk (recipe key `azure`)."""

    identity: str | None = Field(
        None, pattern=AZURE_IDENTITY, description="Managed identity of the VMs: 'system' (a "
        "system-assigned identity per VM) or the resource id of a user-assigned identity that "
        "holds Storage Blob Data Contributor on the run container (infra/azure/README.md). "
        "Required for an az:// store.")
    store_scope: str | None = Field(
        None, pattern=AZURE_ID, description="Resource id of the run store's container; with "
        "identity 'system', launch grants each VM's identity `store_role` there, under a "
        "condition that keeps it to its run's folder and its own keys, and terminate revokes it.")
    store_role: str = Field(
        NODE_STORE_ROLE, min_length=1, max_length=200, pattern=r"^[^'\n]+$",
        description="The role, by name or GUID, that launch grants on store_scope: by default "
        "the custom role 'geotrain node store' (infra/azure/geotrain-node-store-role.json: read, "
        "write and create blobs; no delete, and nothing on the container itself), made once in "
        "the subscription. 'Storage Blob Data Contributor' also works, but lets a node change "
        "or delete the whole container through ARM, which no condition limits.")
    subnet: str | None = Field(None, pattern=AZURE_SUBNET, description="Resource id of an "
                               "existing subnet for the nodes (the site's NSG then goes on their "
                               "NICs); default a new VNet per site. Regional: needs the "
                               "placement's `region`.")
    image: str | None = Field(None, pattern=AZURE_IMAGE, description="Marketplace image "
                              "'publisher:offer:sku:version' or an image's resource id; default "
                              "microsoft-dsvm:ubuntu-hpc:2204:latest.")
    disk_gb: int = disk(128)
    public_ip: bool = public_ip()
    store_credentials: str | None = Field(None, min_length=1, description=STORE_CREDENTIALS)

    @model_validator(mode="after")
    def _scope_needs_system_identity(self) -> AzureOptions:
        if self.store_scope and self.identity != "system":
            raise invalid("only with identity 'system': launch grants the VMs' own identities "
                           "access there; grant a user-assigned identity yourself "
                           "(infra/azure/README.md)", "store_scope")
        return self
