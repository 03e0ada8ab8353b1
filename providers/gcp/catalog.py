"""GCP prices for `geotrain catalog refresh`: there is no public source that works
without an account, so the shipped gcp.json stays in use."""

NO_SOURCE = ("no public GCP price source works without an account: the Cloud Billing "
             "Catalog API (cloudbilling.googleapis.com) needs a project's API key and "
             "the pricing pages are HTML; keeping the shipped gcp.json")
