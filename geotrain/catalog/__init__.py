"""The price catalog: GPU instance types, their $/h per region, and egress $/GB, per provider.

Each provider has one JSON file. geotrain ships `geotrain/catalog/<provider>.json` (list
prices written down on the date in its `retrieved` field; its `note` says how far to trust
them); `geotrain catalog refresh` fetches current prices and writes
`$GEOTRAIN_HOME/catalog/<provider>.json`, which then wins over the shipped file. `load()`
says which file it used (`path`, `shipped`) and its date, and `geotrain catalog show`
prints both.

The format (one file per provider):

    {"provider": "aws", "retrieved": "2025-06-15", "source": [URL, ...], "note": "...",
     "egress": {"internet_usd_per_gb": {"default": 0.09, "us-east-1": 0.09},
                "interregion_usd_per_gb": 0.02},
     "instances": {"g5.xlarge": {"gpu": "A10G", "gpus": 1, "gpu_memory_gib": 24, "vcpus": 4,
                                 "memory_gib": 16,
                                 "regions": {"us-east-1": {"on_demand": 1.006, "spot": 0.42}}}}}

The `local` provider has no shipped file: local sites cost $0 unless a
`$GEOTRAIN_HOME/catalog/local.json` gives its one instance type `local` a price (tests use
that to exercise budgets). Local placements are looked up as type `local`, region `local`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import providers
from geotrain.errors import GeotrainError

SHIPPED = Path(__file__).resolve().parent
CLOUDS = ("aws", "gcp", "azure")

# Peak dense bf16 TFLOP/s per GPU model (vendor datasheets) and the fraction of it a
# training step reaches (model FLOPs utilisation). `geotrain plan` derives run hours from
# these when a recipe gives no `train.hours`. "cpu" is measured on the 2-core dev machine
# (tiny preset, ~11k tokens/s at 0.86 M parameters ≈ 0.057 TFLOP/s), so its MFU is 1.
GPU_TFLOPS = {"H100": 989.0, "A100": 312.0, "A10G": 70.0, "L4": 121.0, "V100": 125.0,
              "T4": 65.0, "cpu": 0.057}
MFU = {"cpu": 1.0}
DEFAULT_MFU = 0.35


class CatalogError(GeotrainError):
    """A catalog file that cannot be read, or a price that the catalog does not have."""


@dataclass(frozen=True)
class Price:
    on_demand: float | None
    spot: float | None


@dataclass(frozen=True)
class InstanceType:
    name: str
    gpu: str | None
    gpus: int
    gpu_memory_gib: float
    vcpus: int
    memory_gib: float
    regions: dict[str, Price] = field(hash=False)

    def price(self, region: str, spot: bool) -> float | None:
        p = self.regions.get(region)
        return None if p is None else (p.spot if spot else p.on_demand)


@dataclass(frozen=True)
class ProviderCatalog:
    provider: str
    retrieved: str | None
    source: tuple[str, ...]
    note: str
    path: str | None  # the file it came from; None: the built-in free local catalog
    shipped: bool  # True: geotrain's own file; False: a refreshed one under GEOTRAIN_HOME
    instances: dict[str, InstanceType] = field(hash=False)
    internet_egress: dict[str, float] = field(hash=False)
    interregion_egress: float = 0.0

    def instance(self, name: str) -> InstanceType | None:
        return self.instances.get(name)

    def price(self, region: str, instance_type: str, spot: bool) -> float | None:
        """$/h of one instance, or None where the catalog has no such offer."""
        if self.path is None:  # the built-in catalog of a provider that runs here: free
            return 0.0
        it = self.instances.get(instance_type)
        return None if it is None else it.price(region, spot)

    def egress_usd_per_gb(self, region: str | None) -> float:
        """$/GB to the internet out of `region` (the provider's default where unknown)."""
        return self.internet_egress.get(region or "", self.internet_egress.get("default", 0.0))

    def matching(self, gpu: str, count: int, spot: bool,
                 region: str | None = None) -> list[tuple[float, str, str]]:
        """(price, instance type, region) of every offer with `count` GPUs of model `gpu`,
        cheapest first."""
        offers = []
        for it in self.instances.values():
            if (it.gpu or "").lower() != gpu.lower() or it.gpus != count:
                continue
            for r in ([region] if region else sorted(it.regions)):
                price = it.price(r, spot)
                if price is not None:
                    offers.append((price, it.name, r))
        return sorted(offers)


def user_dir(home: Path) -> Path:
    return home / "catalog"


def load(provider: str, home: Path | None = None) -> ProviderCatalog:
    """The catalog of `provider`: the refreshed file under GEOTRAIN_HOME if there is one,
    else the shipped file (local: free when neither exists)."""
    from geotrain.recipe import default_home

    mine = user_dir(home or default_home()) / f"{provider}.json"
    if mine.exists():
        return parse(_read(mine), str(mine), shipped=False)
    shipped = SHIPPED / f"{provider}.json"
    if shipped.exists():
        return parse(_read(shipped), str(shipped), shipped=True)
    if provider in providers.PROVIDERS and providers.capabilities_of(provider).runs_here:
        return ProviderCatalog(provider, None, (), f"{provider} sites cost nothing", None, True, {}, {})
    raise CatalogError(f"no catalog for provider {provider!r}; valid: {', '.join(CLOUDS)}, local")


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CatalogError(f"catalog {path} cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise CatalogError(f"catalog {path}: expected a JSON object at the top level")
    return data


def parse(data: dict, path: str | None = None, shipped: bool = False) -> ProviderCatalog:
    """A ProviderCatalog from a catalog file's JSON; CatalogError naming what is wrong."""
    where = path or "<catalog>"
    try:
        instances = {}
        for name, d in data.get("instances", {}).items():
            regions = {r: Price(_num(p.get("on_demand")), _num(p.get("spot")))
                       for r, p in d.get("regions", {}).items()}
            instances[name] = InstanceType(name, d.get("gpu"), int(d.get("gpus", 0)),
                                           float(d.get("gpu_memory_gib", 0)), int(d.get("vcpus", 0)),
                                           float(d.get("memory_gib", 0)), regions)
        egress = data.get("egress", {})
        return ProviderCatalog(
            provider=str(data["provider"]), retrieved=data.get("retrieved"),
            source=tuple(data.get("source", ())), note=str(data.get("note", "")), path=path,
            shipped=shipped, instances=instances,
            internet_egress={k: float(v) for k, v in egress.get("internet_usd_per_gb", {}).items()},
            interregion_egress=float(egress.get("interregion_usd_per_gb", 0.0)))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CatalogError(f"catalog {where} is malformed ({type(e).__name__}: {e}); "
                           "see geotrain/catalog/__init__.py for the format") from None


def _num(v) -> float | None:
    return None if v is None else float(v)


def to_json(cat: ProviderCatalog) -> dict:
    """The file form of a catalog (what `parse` reads)."""
    return {
        "provider": cat.provider, "retrieved": cat.retrieved, "source": list(cat.source),
        "note": cat.note,
        "egress": {"internet_usd_per_gb": dict(cat.internet_egress),
                   "interregion_usd_per_gb": cat.interregion_egress},
        "instances": {n: {"gpu": it.gpu, "gpus": it.gpus, "gpu_memory_gib": it.gpu_memory_gib,
                          "vcpus": it.vcpus, "memory_gib": it.memory_gib,
                          "regions": {r: {"on_demand": p.on_demand, "spot": p.spot}
                                      for r, p in sorted(it.regions.items())}}
                      for n, it in sorted(cat.instances.items())},
    }


def summary(home: Path | None = None) -> list[dict]:
    """For `catalog show`: per provider, which file is used, its date and size."""
    rows = []
    for provider in CLOUDS:
        c = load(provider, home)
        rows.append({"provider": provider, "file": c.path, "shipped": c.shipped,
                     "retrieved": c.retrieved, "instance_types": len(c.instances),
                     "regions": sorted({r for it in c.instances.values() for r in it.regions}),
                     "note": c.note})
    return rows
