"""The plan: each site's placements made concrete and priced, offline, from the catalog.

`make_plan(recipe)` turns every site's placements (its own fields, then its
`candidates`) into concrete candidates — a `gpu: "A100:8"` requirement becomes the
cheapest catalog type that has it, a missing region the cheapest region offering the
type — each with its $/h (× the site's nodes) and whether the catalog lists that offer.
It then estimates what the run costs:

- **$/h** is the sum over sites of their first *available* candidate.
- **hours** is `train.hours` when the recipe gives it; otherwise it is derived: every
  worker (one per GPU) runs `batch_size × seq_len` tokens per inner step at
  `GPU_TFLOPS × MFU / (6 × params)` tokens/s, a round lasts as long as the slowest site's
  `inner_steps`, and sync time is ignored (it overlaps little; add it via `train.hours`).
- **egress**: every round each site uploads its pseudo-gradient and downloads the other
  M−1 (params × `bytes_per_param(sync)` each, ÷ `sync.fragments`: with fragment sync a
  round carries one fragment of the model). The store lives with one
  provider (from its URL scheme; `file://` is this machine). Bytes that leave a provider
  are that provider's egress: a site's upload to a store elsewhere costs the site's
  internet egress rate, a download from a store elsewhere the store provider's default
  rate; to or from the same provider it costs that provider's inter-region rate
  (conservatively assuming the store is in another region). This machine's own egress
  is not priced.

A site's `workers: auto` becomes its chosen type's GPU count per node (1 on a type
without GPUs); a local site keeps `auto`, as only its agent can count this machine's
GPUs. An explicit `workers` above the GPU count of any candidate's type is a
`WorkersError` (geotrain/site/devices.py) naming the site and the type.

A site with no available candidate is a `PlanError` naming the site.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import providers
from geotrain import catalog
from geotrain.errors import GeotrainError
from geotrain.recipe import Placement, Recipe, SiteSpec
from geotrain.site import devices

# Bytes on the wire per parameter for the dense codecs (geotrain/sync/compression.py: int8
# and int4 add one bf16 scale per block of 64, ~3 %); top-k is `bytes_per_param`'s formula.
BYTES_PER_PARAM = {"none": 4.0, "int8": 1.0, "int4": 0.5}
STORE_PROVIDER = {"file": "local", "s3": "aws", "gs": "gcp", "az": "azure"}
GB = 1e9


def bytes_per_param(sync) -> float:
    """Wire bytes per parameter of one pseudo-gradient with the recipe's `sync` settings.
    top-k, per chunk of `topk_chunk` values: k = ceil(topk_fraction x chunk) kept values,
    each an index (1 byte when chunk <= 256, else 2) and a `value_bits` code, plus one
    bf16 scale (compression.py's layout; small tensors sent dense are left out)."""
    if sync.compression != "topk":
        return BYTES_PER_PARAM.get(sync.compression, 4.0)
    chunk = sync.topk_chunk
    k = math.ceil(sync.topk_fraction * chunk)
    index = 1 if chunk <= 256 else 2
    return ((index + sync.value_bits / 8) * k + 2) / chunk


class PlanError(GeotrainError):
    """A recipe the catalog cannot place or price."""


@dataclass(frozen=True)
class Candidate:
    provider: str
    region: str | None
    zones: tuple[str, ...]
    instance_type: str | None
    gpu: str | None
    gpus: int  # per node
    spot: bool
    usd_per_hour: float | None  # × nodes; None where the catalog has no such offer
    available: bool
    reason: str = ""  # why not available
    # The placement's provider options that differ from their defaults (recipe `aws:` ...).
    options: dict = field(default_factory=dict)

    def options_text(self) -> str:
        """The options in one short line: `key=value`, lists joined by commas."""
        return " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                        for k, v in self.options.items())


@dataclass(frozen=True)
class SitePlanned:
    name: str
    nodes: int
    workers: int | str  # per node on the chosen candidate; 'auto' where only the site can count
    candidates: tuple[Candidate, ...]

    def chosen(self) -> Candidate:
        return chosen(self.candidates)


@dataclass(frozen=True)
class Plan:
    sites: tuple[SitePlanned, ...]
    usd_per_hour: float
    hours: float
    hours_from: str  # "train.hours" or "derived"
    usd_total: float
    egress_bytes: float
    egress_usd: float
    params: int
    catalog: dict[str, str | None]

    def to_dict(self) -> dict:
        return {"sites": [{"name": s.name, "nodes": s.nodes, "workers": s.workers,
                           "candidates": [{**asdict(c), "zones": list(c.zones)}
                                          for c in s.candidates]} for s in self.sites],
                "usd_per_hour": self.usd_per_hour, "hours": self.hours,
                "hours_from": self.hours_from, "usd_total": self.usd_total,
                "egress": {"bytes": self.egress_bytes, "usd": self.egress_usd},
                "params": self.params, "catalog": self.catalog}


def param_count(recipe: Recipe) -> int:
    """≈ 12·n_layer·d_model² (attention + MLP) + 256·d_model (byte embeddings)."""
    n_layer, _, d = recipe.model.dims()
    return 12 * n_layer * d * d + 256 * d


class Catalogs:
    """Each provider's catalog, loaded once."""

    def __init__(self, home: Path | None = None):
        self.home, self._loaded = home, {}

    def __call__(self, provider: str) -> catalog.ProviderCatalog:
        if provider not in self._loaded:
            self._loaded[provider] = catalog.load(provider, self.home)
        return self._loaded[provider]


def resolve(p: Placement, site: SiteSpec, cats: Catalogs) -> Candidate:
    """One placement made concrete and priced."""
    cat = cats(p.provider)
    if providers.capabilities_of(p.provider).runs_here:
        # Priced, if at all, as the catalog's one type and region named after the provider.
        region, itype = p.region or p.provider, p.instance_type or p.provider
        price = cat.price(region, itype, p.spot)
        return Candidate(p.provider, region, tuple(p.zones), itype, None, 0, p.spot,
                         None if price is None else price * site.nodes, price is not None,
                         "" if price is not None else f"no price for {p.provider}/{region} in {cat.path}")
    itype, region = p.instance_type, p.region
    if itype is None:  # the recipe guarantees site.gpu then
        model, _, count = site.gpu.partition(":")
        offers = cat.matching(model, int(count or 1), p.spot, region)
        if not offers:
            where = f" in {region}" if region else ""
            return Candidate(p.provider, region, tuple(p.zones), None, model, int(count or 1),
                             p.spot, None, False, f"no {site.gpu} type{where} in the catalog")
        _, itype, region = offers[0]
    it = cat.instance(itype)
    if it is None:
        return Candidate(p.provider, region, tuple(p.zones), itype, None, 0, p.spot, None, False,
                         f"{itype} is not in the {p.provider} catalog")
    if region is None:
        offers = sorted((it.price(r, p.spot), r) for r in it.regions if it.price(r, p.spot) is not None)
        if not offers:
            return Candidate(p.provider, None, tuple(p.zones), itype, it.gpu, it.gpus, p.spot,
                             None, False, f"{itype} has no {_kind(p.spot)} price in any region")
        region = offers[0][1]
    price = it.price(region, p.spot)
    reason = "" if price is not None else f"{itype} not offered {_kind(p.spot)} in {region}"
    return Candidate(p.provider, region, tuple(p.zones), itype, it.gpu, it.gpus, p.spot,
                     None if price is None else round(price * site.nodes, 6), price is not None,
                     reason)


def _kind(spot: bool) -> str:
    return "spot" if spot else "on-demand"


def plan_site(site: SiteSpec, cats: Catalogs) -> SitePlanned:
    candidates = tuple(replace(resolve(p, site, cats), options=options_of(p))
                       for p in site.placements())
    if not any(c.available for c in candidates):
        why = "; ".join(f"{c.provider}/{c.region or '*'}: {c.reason}" for c in candidates)
        raise PlanError(f"site {site.name!r}: no candidate is available in the catalog ({why}); "
                        "pick an instance type and region that `geotrain catalog show` lists")
    workers = [workers_on(site, c) for c in candidates]  # checks each type's GPUs
    return SitePlanned(site.name, site.nodes, workers[candidates.index(chosen(candidates))],
                       candidates)


def chosen(candidates: tuple[Candidate, ...]) -> Candidate:
    return next(c for c in candidates if c.available)


def workers_on(site: SiteSpec, c: Candidate) -> int | str:
    """The site's workers per node on candidate `c`: `auto` as the type's GPU count (1
    without GPUs), an explicit count checked against it (WorkersError when above). A
    candidate on this machine keeps `auto`: its site agent counts the GPUs."""
    if providers.capabilities_of(c.provider).runs_here:
        return site.workers
    return devices.resolve_workers(site.workers, c.gpus,
                                   f"site {site.name!r}: instance type {c.instance_type}")


def options_of(p: Placement) -> dict:
    """The placement's provider options that differ from their defaults, as JSON values."""
    opts = p.options()
    return {} if opts is None else opts.model_dump(mode="json", exclude_defaults=True)


def make_plan(recipe: Recipe, home: Path | None = None) -> Plan:
    """Price every site's candidates and estimate the run's cost; raises PlanError."""
    cats = Catalogs(home)
    sites = tuple(plan_site(s, cats) for s in recipe.sites)
    chosen = [s.chosen() for s in sites]
    per_hour = sum(c.usd_per_hour or 0.0 for c in chosen)
    params = param_count(recipe)
    if recipe.train.hours is not None:
        hours, hours_from = recipe.train.hours, "train.hours"
    else:
        hours, hours_from = derived_hours(recipe, chosen, params), "derived"
    egress_bytes, egress_usd = egress(recipe, chosen, params, cats)
    used = sorted({c.provider for c in chosen} | {store_provider(recipe)})
    return Plan(sites, round(per_hour, 6), hours, hours_from,
                round(per_hour * hours + egress_usd, 4), egress_bytes, round(egress_usd, 4), params,
                {p: cats(p).retrieved for p in used if cats(p).path is not None})


def derived_hours(recipe: Recipe, chosen: list[Candidate], params: int) -> float:
    """Rounds × the slowest site's round time, from the per-GPU throughput table."""
    t = recipe.train
    slowest = 0.0
    for c in chosen:
        device = c.gpu or "cpu"
        flops = catalog.GPU_TFLOPS.get(device, catalog.GPU_TFLOPS["T4"]) * 1e12
        tokens_per_s = flops * catalog.MFU.get(device, catalog.DEFAULT_MFU) / (6 * params)
        slowest = max(slowest, t.inner_steps * t.batch_size * t.seq_len / tokens_per_s)
    return t.rounds * slowest / 3600


def store_provider(recipe: Recipe) -> str:
    return STORE_PROVIDER[recipe.store_root().split("://", 1)[0]]


def egress(recipe: Recipe, chosen: list[Candidate], params: int,
           cats: Catalogs) -> tuple[float, float]:
    """(bytes, USD) the run's sync traffic moves and costs over all rounds."""
    payload = params * bytes_per_param(recipe.sync) / recipe.sync.fragments
    others = len(chosen) - 1
    store = store_provider(recipe)
    per_round_bytes, per_round_usd = 0.0, 0.0
    for c in chosen:
        up, down = payload, payload * others
        per_round_bytes += up + down
        per_round_usd += up / GB * _rate(c.provider, c.region, store, cats)
        per_round_usd += down / GB * _rate(store, None, c.provider, cats)
    rounds = recipe.train.rounds
    return per_round_bytes * rounds, per_round_usd * rounds


def _rate(src: str, src_region: str | None, dst: str, cats: Catalogs) -> float:
    """$/GB for bytes leaving provider `src` towards provider `dst`."""
    if providers.capabilities_of(src).runs_here:
        return 0.0
    cat = cats(src)
    return cat.interregion_egress if src == dst else cat.egress_usd_per_gb(src_region)

