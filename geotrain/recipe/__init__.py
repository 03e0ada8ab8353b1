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

This module holds the sites (placements, provider options, candidates) and the
recipe itself; the training sections are in `sections.py`, the one-line error
messages in `messages.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from geotrain.errors import RecipeError
from geotrain.recipe.messages import _check_duplicate_keys, _first_error, _show
from geotrain.recipe.sections import (GPU_REQ, MAX_WORKERS, PRESETS, SLUG, STORE_SCHEMES, Beta,  # noqa: F401
                                      DataSpec, ModelDims, ModelSpec, StoreSpec, SyncSpec,
                                      TrainSpec, _invalid, _Spec, default_home)
from providers.aws import options as aws_options
from providers.aws.options import AwsOptions
from providers.azure import options as azure_options
from providers.azure.options import AzureOptions
from providers.gcp import options as gcp_options
from providers.gcp.options import GcpOptions

PROVIDER_NAMES = ("local", "aws", "gcp", "azure")
Provider = Literal["local", "aws", "gcp", "azure"]

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

    def liveness_s(self) -> float:
        """How long a round keeps waiting on a site that has not beaten: the longest
        limit among every site's placements (sync.liveness_for)."""
        return max(self.sync.liveness_for(p.provider) for s in self.sites for p in s.placements())

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
