"""AWS prices for `geotrain catalog refresh` (geotrain/catalog/refresh.py drives it).

- On-demand: the public Price List bulk offer files. `region_index.json` names
  each region's current offer file (`/offers/v1.0/aws/AmazonEC2/current/region_index.json`
  → `regions.<code>.currentVersionUrl`); the region file's `products` (attributes:
  instanceType, operatingSystem, tenancy, preInstalledSw, capacitystatus, operation) and
  `terms.OnDemand.<sku>.<term>.priceDimensions.<rate>.pricePerUnit.USD` give the Linux,
  shared-tenancy $/h. Region files are large (hundreds of MB), so only the regions the
  current catalog already lists are fetched.
- Spot: `spot.js`, the JSONP document behind the EC2 spot pricing page:
  `callback({"config": {"regions": [{"region", "instanceTypes": [{"sizes": [{"size",
  "valueColumns": [{"name": "linux", "prices": {"USD"}}]}]}]}]}})`.
"""

from __future__ import annotations

import json
from dataclasses import replace

from geotrain.catalog import Price, ProviderCatalog
from geotrain.catalog.refresh import _get, _get_json, fresh_catalog, source

AWS_REGION_INDEX = "/offers/v1.0/aws/AmazonEC2/current/region_index.json"
# spot.js has used the old region names; map them to region codes.
SPOT_REGION_ALIASES = {"us-east": "us-east-1", "us-west": "us-west-1", "eu-ireland": "eu-west-1",
                       "apac-sin": "ap-southeast-1", "apac-syd": "ap-southeast-2",
                       "apac-tokyo": "ap-northeast-1"}


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


def refresh(current: ProviderCatalog) -> tuple[ProviderCatalog, list[str]]:
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
    return fresh_catalog(current, instances, urls), urls
