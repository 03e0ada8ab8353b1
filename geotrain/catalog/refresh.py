"""`geotrain catalog refresh`: fetch current prices from the providers' public price sources.

Only sources that need no account are used:

- **AWS** on-demand: the public Price List bulk offer files. `region_index.json` names
  each region's current offer file (`/offers/v1.0/aws/AmazonEC2/current/region_index.json`
  → `regions.<code>.currentVersionUrl`); the region file's `products` (attributes:
  instanceType, operatingSystem, tenancy, preInstalledSw, capacitystatus, operation) and
  `terms.OnDemand.<sku>.<term>.priceDimensions.<rate>.pricePerUnit.USD` give the Linux,
  shared-tenancy $/h. Region files are large (hundreds of MB), so only the regions the
  current catalog already lists are fetched.
- **AWS** spot: `spot.js`, the JSONP document behind the EC2 spot pricing page:
  `callback({"config": {"regions": [{"region", "instanceTypes": [{"sizes": [{"size",
  "valueColumns": [{"name": "linux", "prices": {"USD"}}]}]}]}]}})`.
- **Azure**: the Retail Prices REST API (`$filter` on serviceName, priceType and
  armSkuName; pages followed through `NextPageLink`). Items whose skuName ends in
  "Spot" are spot prices; Windows and Low Priority meters are skipped.
- **GCP** has none: the Cloud Billing Catalog API needs an API key of a Google Cloud
  project, and the pricing pages are HTML. The shipped gcp.json stays in use.

Each base URL can be overridden by an environment variable (shown in the output), which
is how the tests point refresh at a local server. Only instance types already in the
catalog are refreshed; egress rates are carried over from the current catalog (the price
sources above do not give them in a usable form). The result is written to
`$GEOTRAIN_HOME/catalog/<provider>.json`, which `load()` then prefers.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

from geotrain.catalog import CLOUDS, CatalogError, InstanceType, Price, ProviderCatalog, load
from geotrain.catalog import to_json, user_dir

SOURCES = {  # name: (environment variable, default base URL)
    "aws-pricing": ("GEOTRAIN_AWS_PRICING_URL", "https://pricing.us-east-1.amazonaws.com"),
    "aws-spot": ("GEOTRAIN_AWS_SPOT_URL", "https://spot-price.s3.amazonaws.com/spot.js"),
    "azure-prices": ("GEOTRAIN_AZURE_PRICES_URL", "https://prices.azure.com/api/retail/prices"),
}
AWS_REGION_INDEX = "/offers/v1.0/aws/AmazonEC2/current/region_index.json"
# spot.js has used the old region names; map them to region codes.
SPOT_REGION_ALIASES = {"us-east": "us-east-1", "us-west": "us-west-1", "eu-ireland": "eu-west-1",
                       "apac-sin": "ap-southeast-1", "apac-syd": "ap-southeast-2",
                       "apac-tokyo": "ap-northeast-1"}
GCP_NO_SOURCE = ("no public GCP price source works without an account: the Cloud Billing "
                 "Catalog API (cloudbilling.googleapis.com) needs a project's API key and "
                 "the pricing pages are HTML; keeping the shipped gcp.json")
TIMEOUT_S = 120
MAX_PAGES = 200


@dataclass(frozen=True)
class RefreshResult:
    provider: str
    refreshed: bool
    path: str | None  # the file written, or the one still in use
    retrieved: str | None
    urls: tuple[str, ...]  # the base URLs used, "(from $VAR)" where overridden
    prices: int  # region prices written
    detail: str


def source(name: str) -> tuple[str, str]:
    """(base URL, where it came from) for a price source."""
    var, default = SOURCES[name]
    value = os.environ.get(var)
    return (value.rstrip("/"), f"from ${var}") if value else (default, "default")


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            return resp.read()
    except OSError as e:
        raise CatalogError(f"cannot fetch {url}: {e}") from None


def _get_json(url: str):
    body = _get(url)
    try:
        return json.loads(body)
    except ValueError as e:
        raise CatalogError(f"{url} did not return JSON: {e}") from None


# -- parsers (pure: documents in, prices out) --------------------------------------------

def parse_aws_offer(doc: dict, types: set[str]) -> dict[str, dict]:
    """{instance type: {"on_demand", "vcpus", "memory_gib", "gpus"}} of the Linux,
    shared-tenancy, no-preinstalled-software offers in one region's offer file."""
    skus = {}
    for sku, product in doc.get("products", {}).items():
        a = product.get("attributes", {})
        if (a.get("instanceType") in types and a.get("operatingSystem") == "Linux"
                and a.get("tenancy") == "Shared" and a.get("preInstalledSw", "NA") == "NA"
                and a.get("capacitystatus", "Used") == "Used"
                and a.get("operation", "RunInstances") == "RunInstances"):
            skus[sku] = a
    out = {}
    for sku, a in skus.items():
        for term in doc.get("terms", {}).get("OnDemand", {}).get(sku, {}).values():
            for dim in term.get("priceDimensions", {}).values():
                usd = float(dim.get("pricePerUnit", {}).get("USD", 0) or 0)
                if dim.get("unit") == "Hrs" and usd > 0:
                    out[a["instanceType"]] = {"on_demand": usd, "vcpus": _lead_num(a.get("vcpu")),
                                              "memory_gib": _lead_num(a.get("memory")),
                                              "gpus": _lead_num(a.get("gpu"))}
    return out


def _lead_num(text) -> float | None:
    try:
        return float(str(text).replace(",", "").split()[0])
    except (ValueError, IndexError):
        return None


def parse_aws_spot(text: str) -> dict[tuple[str, str], float]:
    """{(region, instance type): linux spot $/h} from spot.js (JSONP) or plain JSON."""
    body = text.strip()
    if not body.startswith("{"):
        body = body[body.index("(") + 1:body.rindex(")")]
    doc = json.loads(body)
    out = {}
    for region in doc.get("config", {}).get("regions", []):
        code = SPOT_REGION_ALIASES.get(region.get("region"), region.get("region"))
        for family in region.get("instanceTypes", []):
            for size in family.get("sizes", []):
                for col in size.get("valueColumns", []):
                    price = col.get("prices", {}).get("USD")
                    if col.get("name") == "linux" and _is_price(price):
                        out[(code, size["size"])] = float(price)
    return out


def _is_price(value) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False  # "N/A*" where a type is not offered


def parse_azure_items(items: list[dict]) -> dict[tuple[str, str], Price]:
    """{(armRegionName, armSkuName): Price} from Retail Prices API items (Linux only)."""
    found: dict[tuple[str, str], dict] = {}
    for it in sorted(items, key=lambda i: i.get("effectiveStartDate", "")):
        sku_name = it.get("skuName", "")
        if ("Windows" in it.get("productName", "") or "Low Priority" in sku_name
                or it.get("type", "Consumption") != "Consumption"
                or it.get("unitOfMeasure", "1 Hour") != "1 Hour"
                or it.get("currencyCode", "USD") != "USD"):
            continue
        kind = "spot" if sku_name.endswith("Spot") else "on_demand"
        key = (it["armRegionName"], it["armSkuName"])
        found.setdefault(key, {})[kind] = float(it["retailPrice"])
    return {k: Price(v.get("on_demand"), v.get("spot")) for k, v in found.items()}


# -- per provider ------------------------------------------------------------------------

def refresh_aws(current: ProviderCatalog) -> tuple[ProviderCatalog, list[str]]:
    base, base_from = source("aws-pricing")
    spot_url, spot_from = source("aws-spot")
    types = set(current.instances)
    regions = sorted({r for it in current.instances.values() for r in it.regions})
    index = _get_json(base + AWS_REGION_INDEX)
    on_demand: dict[tuple[str, str], float] = {}
    specs: dict[str, dict] = {}
    for region in regions:
        entry = index.get("regions", {}).get(region)
        if not entry:
            continue
        for itype, d in parse_aws_offer(_get_json(base + entry["currentVersionUrl"]), types).items():
            on_demand[(region, itype)] = d["on_demand"]
            specs[itype] = d
    spot = {k: v for k, v in parse_aws_spot(_get(spot_url).decode()).items() if k[1] in types}
    instances = {}
    for name, it in current.instances.items():
        prices = {r: Price(on_demand.get((r, name)), spot.get((r, name)))
                  for r in sorted({r for r, t in [*on_demand, *spot] if t == name})}
        s = specs.get(name, {})
        instances[name] = replace(it, regions=prices, vcpus=int(s.get("vcpus") or it.vcpus),
                                  memory_gib=s.get("memory_gib") or it.memory_gib,
                                  gpus=int(s.get("gpus") or it.gpus))
    urls = [f"{base}{AWS_REGION_INDEX} ({base_from})", f"{spot_url} ({spot_from})"]
    return _fresh(current, instances, urls), urls


def refresh_azure(current: ProviderCatalog) -> tuple[ProviderCatalog, list[str]]:
    base, base_from = source("azure-prices")
    skus = " or ".join(f"armSkuName eq '{s}'" for s in sorted(current.instances))
    query = f"serviceName eq 'Virtual Machines' and priceType eq 'Consumption' and ({skus})"
    url: str | None = f"{base}?{urllib.parse.urlencode({'$filter': query}, quote_via=urllib.parse.quote)}"
    items: list[dict] = []
    for _ in range(MAX_PAGES):
        if not url:
            break
        page = _get_json(url)
        items += page.get("Items", [])
        url = page.get("NextPageLink")
    prices = parse_azure_items(items)
    instances = {name: replace(it, regions={r: p for (r, s), p in sorted(prices.items()) if s == name})
                 for name, it in current.instances.items()}
    urls = [f"{base} ({base_from})"]
    return _fresh(current, instances, urls), urls


def _fresh(current: ProviderCatalog, instances: dict[str, InstanceType],
           urls: list[str]) -> ProviderCatalog:
    today = date.today().isoformat()
    return replace(current, retrieved=today, source=tuple(u.rsplit(" (", 1)[0] for u in urls),
                   note=f"Fetched by `geotrain catalog refresh` on {today} from the public price "
                        f"sources listed in `source`; egress rates carried over from "
                        f"{current.path} ({current.retrieved}).",
                   instances=instances, shipped=False)


def refresh(provider: str | None = None, home: Path | None = None) -> list[RefreshResult]:
    """Refresh one provider's catalog (or all); each result says what happened. A provider
    whose source fails is reported, not raised, so the others still refresh."""
    from geotrain.recipe import default_home

    home = home or default_home()
    if provider is not None and provider not in CLOUDS:
        raise CatalogError(f"unknown provider {provider!r}; valid: {', '.join(CLOUDS)}")
    results = []
    for p in [provider] if provider else CLOUDS:
        current = load(p, home)
        if p == "gcp":
            results.append(RefreshResult(p, False, current.path, current.retrieved, (), 0,
                                         GCP_NO_SOURCE))
            continue
        try:
            fresh, urls = (refresh_aws if p == "aws" else refresh_azure)(current)
        except (CatalogError, KeyError, ValueError, TypeError) as e:
            results.append(RefreshResult(p, False, current.path, current.retrieved, (), 0,
                                         f"refresh failed, keeping {current.path}: {e}"))
            continue
        count = sum(len(it.regions) for it in fresh.instances.values())
        if count == 0:
            results.append(RefreshResult(p, False, current.path, current.retrieved, tuple(urls), 0,
                                         "the sources returned no price for any catalog type; "
                                         f"keeping {current.path}"))
            continue
        path = user_dir(home) / f"{p}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(to_json(fresh), indent=1) + "\n")
        os.replace(tmp, path)
        results.append(RefreshResult(p, True, str(path), fresh.retrieved, tuple(urls), count,
                                     f"{count} region prices for {len(fresh.instances)} types"))
    return results
