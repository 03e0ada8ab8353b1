"""The recipe: the YAML a user writes to describe a run, as typed, frozen models.

A recipe names the run and its sites; everything else has a default:

    name: demo
    model: {preset: tiny}
    train: {rounds: 20, inner_steps: 50}
    sites:
      - name: a
      - name: b
        workers: 2

`load(path)` returns a validated `Recipe` or raises `RecipeError` naming the
file, the line, the dotted field and what would be valid. Relative paths in
`data.paths` and `store.url` are resolved against the recipe's directory, so
the loaded recipe means the same thing from any working directory.
`geotrain schema` prints `schema()` for editors.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo
from pydantic import field_validator, model_validator

from geotrain.errors import RecipeError
from providers.aws import options as aws_options
from providers.aws.options import AwsOptions
from providers.azure import options as azure_options
from providers.azure.options import AzureOptions
from providers.gcp import options as gcp_options
from providers.gcp.options import GcpOptions
from providers.options import PATTERN_HINTS, OptionsSpec, invalid

SLUG = r"^[a-z0-9][a-z0-9-]*$"
MAX_WORKERS = 64  # per node
STORE_SCHEMES = ("file", "s3", "gs", "az")
Beta = Annotated[float, Field(ge=0, lt=1)]


class ModelDims(NamedTuple):
    n_layer: int
    n_head: int
    d_model: int


# The built-in model's sizes; geotrain/train/model.py reads them from here.
PRESETS = {
    "tiny": ModelDims(4, 4, 128),
    "small": ModelDims(6, 8, 256),
    "medium": ModelDims(12, 8, 512),
    "large": ModelDims(24, 16, 1024),
    "xl": ModelDims(32, 20, 1280),
}


def default_home() -> Path:
    """geotrain's own folder: `$GEOTRAIN_HOME`, or `~/.geotrain`."""
    return Path(os.environ.get("GEOTRAIN_HOME") or "~/.geotrain").expanduser().absolute()


_invalid = invalid  # a validation error at a path below the model's own location


def _base_dir(info: ValidationInfo) -> Path:
    return Path((info.context or {}).get("base_dir") or Path.cwd()).absolute()


_Spec = OptionsSpec  # every section: extra keys refused, frozen, no inf/nan


class ModelSpec(_Spec):
    """The byte-level GPT to train: a preset size, optionally with some sizes overridden."""

    preset: Literal["tiny", "small", "medium", "large", "xl"] = Field(
        "tiny", description="Size preset; 'tiny' trains on a CPU.")
    n_layer: int | None = Field(None, ge=1, description="Transformer blocks; overrides the preset.")
    n_head: int | None = Field(None, ge=1, description="Attention heads; overrides the preset.")
    d_model: int | None = Field(
        None, ge=8, description="Width; overrides the preset. Must be divisible by n_head.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability, in [0, 1).")

    def dims(self) -> ModelDims:
        """The sizes after applying overrides to the preset."""
        p = PRESETS[self.preset]
        return ModelDims(self.n_layer or p.n_layer, self.n_head or p.n_head,
                         self.d_model or p.d_model)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSpec:
        _, n_head, d_model = self.dims()
        if d_model % n_head == 0:
            return self
        if self.d_model is None:
            raise _invalid(f"must divide d_model {d_model} of preset '{self.preset}' "
                           f"(got {n_head})", "n_head")
        lo, hi = d_model // n_head * n_head, (d_model // n_head + 1) * n_head
        near = f"{lo} or {hi}" if lo >= 8 else str(hi)
        raise _invalid(f"must be divisible by n_head {n_head}, e.g. {near} (got {d_model})",
                       "d_model")


class DataSpec(_Spec):
    """What to train on, and how much of it to hold out for evaluation."""

    source: Literal["python-stdlib", "files"] = Field(
        "python-stdlib", description="'python-stdlib': the Python standard library's own source "
                                     "(needs no download); 'files': the files matched by `paths`.")
    paths: list[Annotated[str, Field(min_length=1)]] = Field(
        [], description="Glob patterns of text files: paths relative to the recipe's "
                        "directory, or object-storage URLs (s3://, gs://, az://; read with the "
                        "machine's own credentials: on a cloud node, its identity). A cloud site "
                        "needs URLs. Required when source is 'files', empty otherwise.")
    eval_fraction: float = Field(
        0.02, gt=0, lt=0.5, description="Fraction of the data held out for evaluation.")

    @field_validator("paths")
    @classmethod
    def _resolve_paths(cls, paths: list[str], info: ValidationInfo) -> list[str]:
        return [p if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", p)  # an fsspec URL, as given
                else os.path.normpath(_base_dir(info) / os.path.expanduser(p)) for p in paths]

    @model_validator(mode="after")
    def _paths_match_source(self) -> DataSpec:
        if self.source == "files" and not self.paths:
            raise _invalid("required when source is 'files': a list of glob patterns, "
                           "e.g. ['corpus/*.txt']", "paths")
        if self.source != "files" and self.paths:
            raise _invalid(f"only allowed when source is 'files' (source is '{self.source}')",
                           "paths")
        return self


class TrainSpec(_Spec):
    """The inner loop each site runs: H optimizer steps (AdamW or Muon) per round, with a
    warmup and cosine lr schedule."""

    rounds: int = Field(20, ge=1, description="Outer rounds (sync points between sites).")
    inner_steps: int = Field(50, ge=1, description="H: inner optimizer steps per site per round.")
    batch_size: int = Field(16, ge=1, description="Sequences per worker per inner step.")
    seq_len: int = Field(128, ge=8, le=65536, description="Tokens (bytes) per sequence.")
    lr: float = Field(3e-3, gt=0, description="Peak inner learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay ends at "
                                "lr * min_lr_ratio after rounds * inner_steps steps.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps before the cosine decay.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm; 0 disables clipping.")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW betas, each in [0, 1).")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="Inner optimizer: 'adamw', or 'muon' (Nesterov momentum 0.95 with "
        "each hidden weight matrix's update orthogonalised by Newton-Schulz iterations, "
        "geotrain/train/muon.py); with 'muon' the embeddings, output head, biases and norm gains "
        "still use AdamW with `lr`, `betas` and `weight_decay`, and the Muon matrices get no "
        "weight decay.")
    muon_lr: float = Field(0.02, gt=0, description="Peak learning rate of the matrices Muon "
                           "updates (optimizer 'muon' only; 0.02 is Muon's usual value). It "
                           "follows the same warmup and cosine decay as `lr`.")
    seed: int = Field(0, description="Seed for model init and data order.")
    eval_batches: int = Field(8, ge=1, description="Batches per evaluation.")
    threads: int = Field(1, ge=1, description="torch threads per worker.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Floats of the forward pass and loss (torch autocast); parameters, "
        "gradients and optimizer state stay fp32. 'auto': bf16 on a GPU that has it natively "
        "(Ampere and newer), fp32 anywhere else (the CPU included); 'fp16' adds a loss scaler "
        "(geotrain/train/precision.py).")
    compile: bool = Field(False, description="Run the built-in model through torch.compile: "
                          "faster steps after a first step that compiles (tens of seconds).")
    hours: float | None = Field(None, gt=0, description="Expected wall-clock hours of the run, "
                                "for `geotrain plan`'s cost estimate; None derives it from the "
                                "tokens and the catalog's per-GPU throughput table.")
    entrypoint: str | None = Field(
        None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="Your own training function, 'module:function', called on every worker of "
                    "every site with a geotrain.train.entry.SiteContext instead of the built-in "
                    "GPT trainer. The module must be importable on the sites.")
    code_dir: str | None = Field(
        None, min_length=1, description="Directory holding the code `entrypoint` imports, shipped "
        "to cloud nodes (packed, hashed, installed on each node); relative to the recipe's "
        "directory; default: the recipe's directory when `entrypoint` is set.")

    @field_validator("code_dir")
    @classmethod
    def _resolve_code_dir(cls, code_dir: str | None, info: ValidationInfo) -> str | None:
        if code_dir is None:
            return None
        return os.path.normpath(_base_dir(info) / os.path.expanduser(code_dir))

    @model_validator(mode="after")
    def _code_dir_needs_entrypoint(self) -> TrainSpec:
        if self.code_dir is not None and self.entrypoint is None:
            raise _invalid("only allowed with `entrypoint`: it names the code to ship, and the "
                           "built-in trainer needs none", "code_dir")
        return self


class SyncSpec(_Spec):
    """How sites merge what they learned at the end of each round."""

    algorithm: Literal["diloco"] = Field("diloco", description="Cross-site algorithm.")
    outer_lr: float = Field(0.7, gt=0, description="Outer optimizer learning rate.")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="Outer SGD momentum, in [0, 1).")
    nesterov: bool = Field(True, description="Use Nesterov momentum in the outer optimizer.")
    compression: Literal["none", "int8", "int4", "topk"] = Field(
        "none", description="Codec for pseudo-gradients: 'none' (fp32), 'int8' / 'int4' (blockwise "
        "scaled), 'topk' (chunked top-k with error feedback and quantised values).")
    topk_fraction: float = Field(0.01, gt=0, le=1, description="Share of values 'topk' sends.")
    value_bits: Literal[2, 4, 8] = Field(
        4, description="Bits per value 'topk' sends: 8 and 4 on a symmetric grid, 2 as codes "
        "{-1, 0, 1, 2} times a per-chunk scale signed like the chunk's largest value "
        "(geotrain/sync/quant.py).")
    topk_chunk: int = Field(
        4096, ge=16, le=65536, description="Values per 'topk' chunk: each chunk sends its "
        "ceil(topk_fraction * topk_chunk) largest values and one scale. Up to 256 the in-chunk "
        "indices take one byte instead of two: chunk 256 at 1 % costs the same bytes as 4096 at "
        "1 % (0.025 per parameter with 4-bit values) for finer scales and 17 % more values kept. "
        "The default stays 4096 until a training benchmark shows 256 better (it was on a "
        "least-squares toy only).")
    error_decay: float = Field(1.0, ge=0, le=1, description="How much of what 'topk' left unsent "
                               "is carried into the next round (error feedback, β in SparseLoCo). "
                               "With outer_momentum 0 the carried residual acts as the momentum.")
    overlap: bool = Field(False, description="Train the next round while this round's exchange "
                          "runs; its merge is applied one round late, keeping local progress. "
                          "Hides slow links; at small scale it costs some loss (see docs/benchmarks.md).")
    round_seconds: float | None = Field(
        None, gt=0, description="End rounds by wall time instead of inner_steps, so slow and fast "
        "sites meet together; contributions are weighted by tokens trained.")
    round_timeout_s: float = Field(
        600, gt=0, description="Seconds the first site to finish a round waits for live, "
        "training sites before the round goes on without them (their work is carried over).")
    join_wait_s: float = Field(60, ge=0, description="Seconds a round waits for a site that is "
                               "still starting.")
    liveness_timeout_s: float = Field(4, ge=1, description="A site whose agent has not beaten "
                                      "for this long is not waited for, and is declared lost.")
    boot_timeout_s: float = Field(1800, ge=1, description="A site whose agent has not beaten "
                                  "once this long after its launch is declared lost and replaced "
                                  "(a node that never boots: bad image, no route to the store). "
                                  "Cloud nodes install geotrain at first boot: allow minutes.")
    max_replacements: int = Field(10, ge=0, description="How many times a site may be lost "
                                  "(preempted, killed, silent, failed) and replaced; one more and "
                                  "the run fails, saying why.")
    reject_norm_factor: float = Field(10, gt=1, description="Reject a contribution whose norm is "
                                      "more than this times the round's median (3+ sites).")
    state_every: int = Field(1, ge=1, description="Commit the full global state (model and outer "
                             "momentum, 8 bytes per parameter) every this many rounds and at the "
                             "last round; the rounds between commit only their decision and hash, "
                             "and a site that joins replays them from the contributions. Cuts "
                             "store traffic when payloads are small (int4, topk).")
    offload: Literal["auto", True, False] = Field(
        "auto", description="Where a site keeps its copies of the model (the round-start "
        "snapshot; the anchors of overlapped rounds) and the codec's error-feedback residual: "
        "true puts them in pinned CPU memory so the GPU holds only what training needs; false "
        "keeps them on the GPU (4 bytes per parameter each, no copies at a round's end); "
        "'auto' is true when the model trains on a GPU. The same bits either way; no effect on "
        "a CPU model. The global parameters and outer momentum always stay on the CPU.")


class StoreSpec(_Spec):
    """Where the run store lives: the single source of truth of a run."""

    url: str | None = Field(None, description="Root of run stores: file://, s3://, gs://, az:// or "
                            "a filesystem path (relative to the recipe's directory); "
                            "default file://$GEOTRAIN_HOME/runs.")

    @field_validator("url")
    @classmethod
    def _normalize_url(cls, url: str | None, info: ValidationInfo) -> str | None:
        if url is None:
            return None
        valid = ", ".join(f"{s}://" for s in STORE_SCHEMES) + " or a filesystem path"
        # Two letters or more, so that a Windows drive letter reads as a path.
        scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):", url)
        if not scheme:
            return "file://" + os.path.normpath(_base_dir(info) / os.path.expanduser(url))
        if scheme[1] not in STORE_SCHEMES or not url.startswith(f"{scheme[1]}://"):
            raise _invalid(f"unsupported store URL {url!r}; valid: {valid}")
        if url == f"{scheme[1]}://":
            raise _invalid(f"{url!r} names no bucket or folder")
        return url


PROVIDER_NAMES = ("local", "aws", "gcp", "azure")
Provider = Literal["local", "aws", "gcp", "azure"]
GPU_REQ = r"^[A-Za-z0-9]+(:[1-9][0-9]*)?$"

ProviderOptions = AwsOptions | GcpOptions | AzureOptions
OPTIONS = {"aws": AwsOptions, "gcp": GcpOptions, "azure": AzureOptions}
# Options tied to one region (an id that exists only there).
REGIONAL = {"aws": aws_options.REGIONAL, "gcp": gcp_options.REGIONAL, "azure": azure_options.REGIONAL}
INHERIT = ("A candidate on the same provider as the site inherits each of the site's options it "
           "does not set itself, except those tied to a region (aws subnets and image, gcp "
           "subnetwork, azure subnet) when its region differs; a candidate on another provider "
           "inherits none.")


def _options_field(provider: str) -> Any:
    names = {"aws": "AWS", "gcp": "GCP", "azure": "Azure"}
    return Field(None, description=f"{names[provider]} node options (identity, network, image, "
                 f"disk); only where provider is '{provider}'. {INHERIT}")


def _check_options(p: Placement | SiteSpec) -> None:
    """Options only for the placement's own provider; regional ones only with a region."""
    for name in OPTIONS:
        opts = getattr(p, name)
        if opts is None:
            continue
        if name != p.provider:
            raise _invalid(f"options for provider '{name}' on a placement whose provider is "
                           f"'{p.provider}'; use `{p.provider}:` here"
                           if p.provider != "local" else
                           f"options for provider '{name}' on a 'local' placement, which takes "
                           "none", name)
        for field in REGIONAL[name]:
            if getattr(opts, field) and p.region is None:
                raise _invalid("is tied to one region: give this placement a `region`",
                               name, field)


def own_options(p: Placement | SiteSpec) -> ProviderOptions | None:
    """The placement's options for its own provider (defaults if it gives none); None locally."""
    if p.provider not in OPTIONS:
        return None
    return getattr(p, p.provider) or OPTIONS[p.provider]()


class Placement(_Spec):
    """One concrete place a site can be put: a provider, a region (and zones), an instance type.

    A site's own fields are its first placement; `candidates` are the fallbacks."""

    provider: Provider = Field(description="Where the site runs; 'local' is processes on this "
                               "machine.")
    region: str | None = Field(None, description="Provider region; None lets the planner pick the "
                               "cheapest catalog region that offers the instance type.")
    zones: list[Annotated[str, Field(min_length=1)]] = Field(
        [], description="Zones to try in order; empty lets the provider choose.")
    instance_type: str | None = Field(None, min_length=1, description="Provider instance type, "
                                      "e.g. 'p4d.24xlarge'; required on a cloud unless the site "
                                      "has `gpu`, then the planner picks the cheapest match.")
    spot: bool = Field(False, description="Use spot / preemptible capacity. Off by default on "
                       "every provider: being reclaimed is a choice to make, not a surprise.")
    aws: AwsOptions | None = _options_field("aws")
    gcp: GcpOptions | None = _options_field("gcp")
    azure: AzureOptions | None = _options_field("azure")

    @model_validator(mode="after")
    def _own_provider_options(self) -> Placement:
        _check_options(self)
        return self

    def options(self) -> ProviderOptions | None:
        """The options for this placement's own provider (its defaults if none are given);
        None for 'local'."""
        return own_options(self)

    def where(self) -> str:
        """Short form for messages: provider/region[zones] type (spot)."""
        zones = f"[{','.join(self.zones)}]" if self.zones else ""
        kind = " spot" if self.spot else ""
        return f"{self.provider}/{self.region or '*'}{zones} {self.instance_type or '-'}{kind}"


class SiteSpec(_Spec):
    """One place that trains: a provider, a region, N nodes of one instance type, and the
    fallback placements to try when the first has no capacity."""

    name: str = Field(pattern=SLUG, max_length=20, description="Site name, unique in the recipe.")
    provider: Provider = Field(
        "local", description="Where the site runs; 'local' is processes on this machine.")
    region: str | None = Field(None, description="Provider region; None lets the planner choose.")
    workers: Annotated[int, Field(ge=1, le=MAX_WORKERS)] | Literal["auto"] = Field(
        "auto", description="Ray actors per node in the site's data-parallel group, each on "
        "one GPU: 'auto' is one per GPU of the node (1 on a node without GPUs); a number must "
        "not exceed the node's GPUs where it has some.")
    zones: list[Annotated[str, Field(min_length=1)]] = Field(
        [], description="Zones to try in order; empty lets the provider choose.")
    instance_type: str | None = Field(None, min_length=1, description="Provider instance type; "
                                      "required on a cloud unless `gpu` is given.")
    gpu: str | None = Field(None, pattern=GPU_REQ, description="GPU requirement 'MODEL:COUNT' "
                            "per node, e.g. 'A100:8'; the planner picks the cheapest catalog "
                            "instance type that has it where `instance_type` is not given.")
    spot: bool = Field(False, description="Use spot / preemptible capacity (off by default).")
    nodes: int = Field(1, ge=1, le=64, description="Nodes in the site; `workers` is per node.")
    aws: AwsOptions | None = _options_field("aws")
    gcp: GcpOptions | None = _options_field("gcp")
    azure: AzureOptions | None = _options_field("azure")
    candidates: list[Placement] = Field(
        [], description="Fallback placements, tried in order when the ones before have no "
                        "capacity; `gpu` applies to them too. " + INHERIT)

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        # One message for the int-or-'auto' union instead of one per branch.
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_WORKERS):
            return v
        if isinstance(v, int) and not isinstance(v, bool):
            raise _invalid(f"must be {'>= 1' if v < 1 else f'<= {MAX_WORKERS}'} (got {v})")
        raise _invalid(f"expected 'auto' (one worker per GPU) or a number from 1 to {MAX_WORKERS} "
                       f"(got {_show(v)})")

    def most_workers(self) -> int:
        """Workers per node at most: `workers`, or a bound for 'auto' that every site
        agrees on (geotrain/site/devices.py AUTO_WORKERS_BOUND)."""
        from geotrain.site.devices import most_workers

        return most_workers(self.workers)

    @model_validator(mode="after")
    def _own_provider_options(self) -> SiteSpec:
        _check_options(self)
        return self

    @model_validator(mode="after")
    def _candidates_inherit_options(self) -> SiteSpec:
        mine = getattr(self, self.provider, None) if self.provider in OPTIONS else None
        if mine is None:
            return self
        inherited = []
        for c in self.candidates:
            if c.provider != self.provider:
                inherited.append(c)
                continue
            own = getattr(c, c.provider)
            keep = {k: getattr(mine, k) for k in mine.model_fields_set
                    if c.region == self.region or k not in REGIONAL[c.provider]}
            if own is not None:
                keep.update({k: getattr(own, k) for k in own.model_fields_set})
            inherited.append(c.model_copy(update={c.provider: type(mine).model_validate(keep)}))
        return self.model_copy(update={"candidates": inherited})

    @model_validator(mode="after")
    def _cloud_needs_a_type(self) -> SiteSpec:
        from providers import capabilities_of

        for where, p in [((), self), *((("candidates", i), c) for i, c in enumerate(self.candidates))]:
            if not capabilities_of(p.provider).runs_here and p.instance_type is None and self.gpu is None:
                raise _invalid(f"required on provider '{p.provider}' (e.g. "
                               f"{EXAMPLE_TYPES[p.provider]!r}), or give the site a `gpu` "
                               "requirement such as 'A100:8'", *where, "instance_type")
        return self

    def options_for(self, provider: str, region: str | None) -> ProviderOptions | None:
        """The options the recipe gives a placement of this site on `provider` in `region`
        (for a placement not in the recipe, e.g. a migration target): those of its first
        placement there, else of its first on that provider without the regional ones."""
        if provider not in OPTIONS:
            return None
        mine = [p for p in self.placements() if p.provider == provider and getattr(p, provider)]
        same = next((getattr(p, provider) for p in mine if p.region == region), None)
        if same is not None or not mine:
            return same
        other = getattr(mine[0], provider)
        return other.model_copy(update={k: other.model_fields[k].default
                                        for k in REGIONAL[provider]})

    def placements(self) -> list[Placement]:
        """The primary placement followed by the candidates, in the order to try them."""
        primary = Placement(provider=self.provider, region=self.region, zones=self.zones,
                            instance_type=self.instance_type, spot=self.spot, aws=self.aws,
                            gcp=self.gcp, azure=self.azure)
        return [primary, *self.candidates]


EXAMPLE_TYPES = {"aws": "g5.xlarge", "gcp": "g2-standard-4", "azure": "Standard_NC4as_T4_v3"}


class BudgetSpec(_Spec):
    """A spending limit: the controller stops the run when its estimated spend crosses it."""

    max_usd: float = Field(gt=0, description="Stop the run once compute plus egress spend, as "
                           "estimated from the catalog's list prices, exceeds this many USD.")


class Recipe(_Spec):
    """A geotrain recipe: one model trained across sites that merge through a run store."""

    name: str = Field(pattern=SLUG, max_length=40, description="Run name: a-z, 0-9 and '-'.")
    model: ModelSpec = Field(ModelSpec(), description="The model to train.")
    data: DataSpec = Field(DataSpec(), description="The training data.")
    train: TrainSpec = Field(TrainSpec(), description="The inner loop each site runs.")
    sync: SyncSpec = Field(SyncSpec(), description="How sites merge each round.")
    store: StoreSpec = Field(StoreSpec(), description="Where the run store lives.")
    sites: list[SiteSpec] = Field(min_length=1, description="The sites that train; at least one.")
    budget: BudgetSpec | None = Field(None, description="Optional spending limit for the run.")

    @field_validator("sites")
    @classmethod
    def _unique_site_names(cls, sites: list[SiteSpec]) -> list[SiteSpec]:
        first: dict[str, int] = {}
        for i, site in enumerate(sites):
            if site.name in first:
                raise _invalid(f"duplicate site name '{site.name}' "
                               f"(also sites[{first[site.name]}])", i, "name")
            first[site.name] = i
        return sites

    def store_root(self) -> str:
        """The URL under which this recipe's runs are stored."""
        return self.store.url or f"file://{default_home() / 'runs'}"

    def to_dict(self) -> dict:
        """A plain, JSON-able dict that validates back to an equal Recipe."""
        return self.model_dump(mode="json")


def schema() -> dict:
    """The JSON Schema of a recipe, for editors."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **Recipe.model_json_schema()}


def load(path: str | Path) -> Recipe:
    """Read and validate the recipe at `path`; raise RecipeError on any mistake."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(str(path), None, "", "file not found") from None
    except UnicodeDecodeError:
        raise RecipeError(str(path), None, "", "not UTF-8 text") from None
    except OSError as e:
        raise RecipeError(str(path), None, "", (e.strerror or str(e)).lower()) from None
    return loads(text, source=str(path), base_dir=Path(path).absolute().parent)


def loads(text: str, source: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe given as YAML; relative paths resolve against base_dir (or the cwd)."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        _check_duplicate_keys(root, source)
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        problem += " (check the indentation)" if "<block" in problem else ""
        raise RecipeError(source, mark and mark.line + 1, "", f"invalid YAML: {problem}") from None
    finally:
        loader.dispose()
    if root is None:
        raise RecipeError(source, None, "", "recipe is empty; it needs at least 'name' and 'sites'")
    if not isinstance(data, dict):
        raise RecipeError(source, root.start_mark.line + 1, "",
                          f"expected a mapping of fields at the top level (got {_show(data)})")
    try:
        return Recipe.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as e:
        raise _first_error(e, root, source) from None


def _check_duplicate_keys(root: yaml.Node | None, source: str) -> None:
    # PyYAML silently keeps the last of two equal keys; a recipe should never rely on that.
    stack, seen = [root] if root is not None else [], set()
    while stack:
        node = stack.pop()
        if id(node) in seen or isinstance(node, yaml.ScalarNode):
            continue
        seen.add(id(node))
        is_map = isinstance(node, yaml.MappingNode)
        pairs = node.value if is_map else [(None, n) for n in node.value]
        lines: dict[str, int] = {}
        for key, value in pairs:
            if isinstance(key, yaml.ScalarNode) and key.value in lines:
                raise RecipeError(source, key.start_mark.line + 1, "", f"duplicate key "
                                  f"'{key.value}' (first on line {lines[key.value]})")
            if isinstance(key, yaml.ScalarNode):
                lines[key.value] = key.start_mark.line + 1
            stack.append(value)


def _first_error(exc: ValidationError, root: yaml.Node, source: str) -> RecipeError:
    """The one error to report: the topmost in the file, preferring anything over 'missing'
    (a misspelt required key is both unknown and missing; 'did you mean' helps more)."""
    found = []
    for err in exc.errors():
        loc = tuple(err["loc"]) + tuple(err.get("ctx", {}).get("at", ()))
        found.append((err["type"] == "missing", _line_of(root, loc), len(found), loc, err))
    _, line, _, loc, err = min(found)
    shown = loc[:-1] if err["type"] == "invalid_key" else loc  # a non-text key is no field
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in shown).lstrip(".")
    return RecipeError(source, line, field, _message(err, loc))


def _line_of(root: yaml.Node, loc: tuple) -> int:
    """The line of the deepest node along loc: the key itself, or its parent if it is missing."""
    node, line = root, root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(part)]
            if not match:
                break
            line, node = match[-1][0].start_mark.line + 1, match[-1][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _type_at(loc: tuple) -> Any:
    """The annotation of the field at loc, walking Recipe's models and lists."""
    t: Any = Recipe
    for part in loc:
        t = _unwrap_optional(t)
        if isinstance(part, int):
            t = (get_args(t) or (None,))[0]
        elif isinstance(t, type) and issubclass(t, BaseModel) and part in t.model_fields:
            t = t.model_fields[part].annotation
        else:
            return None
    return _unwrap_optional(t)


def _unwrap_optional(t: Any) -> Any:
    """`Model | None` -> Model; anything else as it is."""
    args = get_args(t)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return t


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, short."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _did_you_mean(word: Any, options: list | tuple) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return f"did you mean '{close[0]}'?" if close else ""


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
           "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}
_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string",
    "list_type": "a list", "tuple_type": "a list", "model_type": "a mapping",
    "dict_type": "a mapping",
}


def _message(err: dict, loc: tuple) -> str:
    """One crisp sentence for a pydantic error: what was wrong and what would be valid."""
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    if kind in ("extra_forbidden", "invalid_key"):
        valid = list(_type_at(loc[:-1]).model_fields)
        hint = _did_you_mean(loc[-1], valid)
        hint += " " if hint else ""
        return f"unknown field '{loc[-1]}'; {hint}valid fields: {', '.join(valid)}"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        options = get_args(_type_at(loc))
        hint = _did_you_mean(got, options)
        return (f"expected one of {', '.join(map(repr, options))} "
                f"(got {_show(got)}{'; ' + hint if hint else ''})")
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"must be {op} {_show(ctx[key])} (got {_show(got)})"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]} (got {_show(got)})"
    if kind in ("too_short", "too_long"):
        n = ctx["min_length" if kind == "too_short" else "max_length"]
        least = "at least" if kind == "too_short" else "at most"
        return f"must have {least} {n} item{'s' * (n != 1)} (got {ctx['actual_length']})"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters (got {len(got)})"
    if kind == "string_pattern_mismatch" and ctx.get("pattern") == GPU_REQ:
        return f"expected 'MODEL:COUNT' GPUs per node, e.g. 'A100:8' or 'L4:1' (got {_show(got)})"
    if kind == "string_pattern_mismatch" and ctx.get("pattern") in PATTERN_HINTS:
        return f"{PATTERN_HINTS[ctx['pattern']]} (got {_show(got)})"
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "entrypoint":
        return f"must be 'module:function', e.g. 'mypkg.train:main' (got {_show(got)})"
    if kind == "string_pattern_mismatch":
        return f"must be lowercase a-z, 0-9 and '-', not starting with '-' (got {_show(got)})"
    return err["msg"]  # our own PydanticCustomErrors, already phrased for users
