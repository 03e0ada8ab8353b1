"""`geotrain catalog refresh`: fetch current prices from the providers' public price sources.

Only sources that need no account are used, each in its provider's package
(providers/aws/catalog.py: the Price List bulk offer files and spot.js;
providers/azure/catalog.py: the Retail Prices API; GCP has none without an
account, providers/gcp/catalog.py says why). This module fetches, merges and writes.

Each base URL can be overridden by an environment variable (shown in the output), which
is how the tests point refresh at a local server. Only instance types already in the
catalog are refreshed; egress rates are carried over from the current catalog (the price
sources above do not give them in a usable form). The result is written to
`$GEOTRAIN_HOME/catalog/<provider>.json`, which `load()` then prefers.
"""

from __future__ import annotations

import importlib
import json
import os
import urllib.request
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

from geotrain.catalog import CLOUDS, CatalogError, InstanceType, ProviderCatalog, load
from geotrain.catalog import to_json, user_dir

SOURCES = {  # name: (environment variable, default base URL)
    "aws-pricing": ("GEOTRAIN_AWS_PRICING_URL", "https://pricing.us-east-1.amazonaws.com"),
    "aws-spot": ("GEOTRAIN_AWS_SPOT_URL", "https://spot-price.s3.amazonaws.com/spot.js"),
    "azure-prices": ("GEOTRAIN_AZURE_PRICES_URL", "https://prices.azure.com/api/retail/prices"),
}
TIMEOUT_S = 120


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


def fresh_catalog(current: ProviderCatalog, instances: dict[str, InstanceType],
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
        prices = importlib.import_module(f"providers.{p}.catalog")  # each cloud's own sources
        if getattr(prices, "NO_SOURCE", None):
            results.append(RefreshResult(p, False, current.path, current.retrieved, (), 0,
                                         prices.NO_SOURCE))
            continue
        try:
            fresh, urls = prices.refresh(current)
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
