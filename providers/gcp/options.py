"""The recipe's `gcp:` block: how GCE nodes are made (service account, network, image, disk)."""

from __future__ import annotations

from pydantic import Field, model_validator

from providers.options import STORE_CREDENTIALS, OptionsSpec, disk, invalid, pattern, public_ip

GCP_ACCOUNT = pattern(r"^(default|[a-z0-9][a-z0-9._-]*@[a-z0-9.-]+\.[a-z]+)$",
                      "expected a service account email, e.g. "
                      "'geotrain-node@PROJECT.iam.gserviceaccount.com'")
GCP_ACCELERATOR = pattern(r"^[a-z0-9-]+(:[1-9][0-9]*)?$", "expected 'TYPE[:COUNT]', e.g. 'nvidia-tesla-t4:2'")
# Options tied to one region (an id that exists only there).
REGIONAL = ("subnetwork",)


class GcpOptions(OptionsSpec):
    """How GCP nodes are made: their service account, network, image and disk (recipe key `gcp`)."""

    service_account: str | None = Field(
        None, pattern=GCP_ACCOUNT, description="Service account email the nodes run as, with the "
        "single scope devstorage.read_write (infra/gcp/README.md: 'geotrain-node@PROJECT.iam."
        "gserviceaccount.com'); none: the nodes get no service account. Required for a gs:// "
        "store, unless run_account.")
    run_account: bool = Field(
        False, description="Launch makes a service account for each site of the run, granted "
        "in the gs:// store's bucket only roles/storage.objectUser on the run's folder and "
        "listing (geotrainNodeLister), and deletes it and its bindings with the site's nodes "
        "(providers/gcp/accounts.py). Instead of service_account; needs the rights to make "
        "service accounts and to set the run bucket's IAM policy (infra/gcp/README.md).")
    network: str | None = Field(None, min_length=1, description="VPC network, e.g. "
                                "'global/networks/geotrain'; default 'global/networks/default'.")
    subnetwork: str | None = Field(None, min_length=1, description="Subnetwork, e.g. "
                                   "'regions/us-central1/subnetworks/geotrain'. Regional: needs "
                                   "the placement's `region`.")
    image: str | None = Field(None, min_length=1, description="Boot image or image family, e.g. "
                              "'projects/P/global/images/family/F'; default the Deep Learning VM "
                              "family pytorch-latest-gpu.")
    accelerator: str | None = Field(None, pattern=GCP_ACCELERATOR, description="GPUs to attach "
                                    "to N1 machine types, 'TYPE[:COUNT]' (COUNT defaults to "
                                    "the site's `workers`, 1 for 'auto'); A2/A3/A4/G2 types carry theirs.")
    disk_gb: int = disk(100)
    public_ip: bool = public_ip()
    store_credentials: str | None = Field(None, min_length=1, description=STORE_CREDENTIALS)

    def makes_run_resources(self) -> bool:
        return self.run_account

    @model_validator(mode="after")
    def _one_identity(self) -> GcpOptions:
        if self.run_account and self.service_account:
            raise invalid("set service_account or run_account, not both: run_account makes the "
                          "nodes' service account itself", "run_account")
        return self
