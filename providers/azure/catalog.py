"""Azure prices for `geotrain catalog refresh` (geotrain/catalog/refresh.py drives it):
the Retail Prices REST API (`$filter` on serviceName, priceType and armSkuName; pages
followed through `NextPageLink`). Items whose skuName ends in "Spot" are spot prices;
Windows and Low Priority meters are skipped.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import replace

from geotrain.catalog import Price, ProviderCatalog
from geotrain.catalog.refresh import _get_json, fresh_catalog, source

MAX_PAGES = 200


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


def refresh(current: ProviderCatalog) -> tuple[ProviderCatalog, list[str]]:
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
    return fresh_catalog(current, instances, urls), urls
