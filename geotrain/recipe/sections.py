"""The recipe's training sections: the model, the data, the inner loop (`train`), the
sync between sites (`sync`) and where the run store lives (`store`), as typed,
frozen models with a description on every field. geotrain/recipe/__init__.py
assembles them with the sites into a `Recipe`; load recipes through it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

from pydantic import Field, ValidationInfo, field_validator, model_validator

from providers.options import OptionsSpec, invalid

SLUG = r"^[a-z0-9][a-z0-9-]*$"
MAX_WORKERS = 64  # per node
STORE_SCHEMES = ("file", "s3", "gs", "az")
GPU_REQ = r"^[A-Za-z0-9]+(:[1-9][0-9]*)?$"  # a site's `gpu`: MODEL[:COUNT]
LOCAL_LIVENESS_S, CLOUD_LIVENESS_S = 4.0, 30.0  # sync.liveness_timeout_s by default
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
    requirements_lock: str | None = Field(
        None, min_length=1, description="A requirements lock with hashes (`pip-compile "
        "--generate-hashes`, `uv pip compile --generate-hashes`, `uv export --no-emit-project`) "
        "that cloud nodes install with `pip --require-hashes`, so every file a node downloads "
        "must match a sha256 in it; relative to the recipe's directory. Every line pins `==` "
        "with at least one sha256; each distribution geotrain needs must be there at the "
        "version installed here (launch refuses otherwise); your own dependencies may be "
        "added. Default: nodes install geotrain's dependencies pinned by version only.")

    @field_validator("code_dir", "requirements_lock")
    @classmethod
    def _resolve_path(cls, path: str | None, info: ValidationInfo) -> str | None:
        if path is None:
            return None
        return os.path.normpath(_base_dir(info) / os.path.expanduser(path))

    @model_validator(mode="after")
    def _code_dir_needs_entrypoint(self) -> TrainSpec:
        if self.code_dir is not None and self.entrypoint is None:
            raise _invalid("only allowed with `entrypoint`: it names the code to ship, and the "
                           "built-in trainer needs none", "code_dir")
        return self


# Top-k as SparseLoCo: plain outer SGD, with the error feedback (decay 0.95) as the
# momentum. Nesterov 0.7 / 0.9 on top of error feedback was far worse wherever measured
# (docs/benchmarks.md "Tuned": top-k 1 % +68.5 % vs +51.7 % behind DDP at 20 rounds;
# top-k 3 % +29.8 % vs +11.2 % at 8). Outer lr 2 beat 1 at 8 rounds (+11.2 % vs
# +16.5 %) and 1 and 3 at 150 rounds with Muon inside (+1.45 % vs +5.71 % and +2.10 %,
# "Long"); at 20 rounds, top-k 3 %, 3 beat 2 (+35.5 % vs +38.2 %).
TOPK_DEFAULTS = {"outer_lr": 2.0, "outer_momentum": 0.0, "error_decay": 0.95}


class SyncSpec(_Spec):
    """How sites merge what they learned at the end of each round."""

    algorithm: Literal["diloco"] = Field("diloco", description="Cross-site algorithm.")
    outer_lr: float = Field(0.7, gt=0, description="Outer optimizer learning rate (the peak, "
                            "with a schedule). Default 0.7; 2 with compression 'topk' (TOPK_DEFAULTS).")
    outer_lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="Outer lr over the rounds: 'constant' (outer_lr every round), or "
        "'cosine' from outer_lr down to outer_lr * outer_lr_min_ratio at round train.rounds "
        "(geotrain/sync/schedule.py); either after outer_lr_warmup rounds of linear warmup.")
    outer_lr_min_ratio: float = Field(0.1, ge=0, le=1, description="Where 'cosine' ends, as a "
                                      "share of outer_lr, in [0, 1].")
    outer_lr_warmup: int = Field(0, ge=0, description="Rounds of linear warmup of the outer lr, "
                                 "from outer_lr / outer_lr_warmup in round 1 up to outer_lr.")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="Outer SGD momentum, in [0, 1). "
                                  "Default 0.9; 0 with compression 'topk', whose error feedback "
                                  "is the momentum (TOPK_DEFAULTS).")
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
                               "With outer_momentum 0 the carried residual acts as the momentum. "
                               "Default 0.95 with compression 'topk' (TOPK_DEFAULTS); unused "
                               "by the other codecs.")
    overlap: bool = Field(False, description="Train the next round while this round's exchange "
                          "runs; its merge is applied one round late, keeping local progress. "
                          "Hides slow links; at small scale it costs some loss (see docs/benchmarks.md).")
    fragments: int = Field(
        1, ge=1, description="Fragment sync (Streaming DiLoCo): cut the model into this many "
        "contiguous parts of about equal size; round r syncs only part (r - 1) % fragments, "
        "so each exchange carries 1/fragments of the bytes while the other parts keep "
        "training. Each part then syncs every fragments rounds: set train.inner_steps to "
        "H / fragments to keep its sync period at H steps. 1: the whole model every round. "
        "At most the model's number of parameter tensors (geotrain/sync/fragments.py).")
    round_seconds: float | None = Field(
        None, gt=0, description="End rounds by wall time instead of inner_steps, so slow and fast "
        "sites meet together; contributions are weighted by tokens trained.")
    round_timeout_s: float = Field(
        600, gt=0, description="Seconds the first site to finish a round waits for live, "
        "training sites before the round goes on without them (their work is carried over).")
    join_wait_s: float = Field(60, ge=0, description="Seconds a round waits for a site that is "
                               "still starting.")
    liveness_timeout_s: float | None = Field(
        None, ge=1, description="A site whose agent has not beaten (every second) for this long "
        "is not waited for, and is declared lost. Default: 4 s for a site on this machine "
        "(provider local), 30 s for a cloud site, whose beats cross the internet to the store "
        "and may wait on a credential refresh.")

    @model_validator(mode="before")
    @classmethod
    def _topk_defaults(cls, data: object) -> object:
        """With compression 'topk', the outer settings a recipe leaves out are
        TOPK_DEFAULTS, not the dense DiLoCo ones (docs/design.md, "Choosing the sync
        settings"); what it sets is kept."""
        if isinstance(data, dict) and data.get("compression") == "topk":
            return {**TOPK_DEFAULTS, **data}
        return data

    def liveness_for(self, provider: str) -> float:
        """The liveness limit of a site placed on `provider`: liveness_timeout_s, or its
        default for that kind of provider."""
        if self.liveness_timeout_s is not None:
            return self.liveness_timeout_s
        from providers import capabilities_of

        return LOCAL_LIVENESS_S if capabilities_of(provider).runs_here else CLOUD_LIVENESS_S
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
