"""A byte-level GPT (vocab 256) in sizes from tiny (CPU) up, plus its optimizers and lr schedule.

Pre-norm transformer blocks, causal attention through
`scaled_dot_product_attention`, a 4x GELU MLP, and an output head tied to the
token embedding. `build(cfg, seed)` gives bit-identical parameters for the
same config and seed, so every site can start from the same model without
shipping it.

    cfg = config_for("tiny", context=256)
    model = build(cfg, seed=0)
    logits, loss = model(x, y)
    opt = build_optimizer(model, recipe.train)          # AdamW or Muon, as the recipe says
    apply_lr_schedule(opt, step, recipe.train, total_steps)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from geotrain.recipe import PRESETS as RECIPE_PRESETS
from geotrain.recipe import TrainSpec

# One table of sizes, kept with the recipe (which loads without torch).
PRESETS: dict[str, dict] = {name: dims._asdict() for name, dims in RECIPE_PRESETS.items()}


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT. `context` is the longest sequence it can attend over."""

    n_layer: int
    n_head: int
    d_model: int
    context: int
    dropout: float = 0.0
    vocab: int = 256

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})"
            )
        if min(self.n_layer, self.n_head, self.d_model, self.context, self.vocab) < 1:
            raise ValueError(f"every size in {self} must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def config_for(
    preset: str,
    context: int,
    n_layer: int | None = None,
    n_head: int | None = None,
    d_model: int | None = None,
    dropout: float = 0.0,
) -> GPTConfig:
    """The config of a named preset; explicit sizes override the preset's."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; valid: {', '.join(PRESETS)}")
    sizes = dict(PRESETS[preset])
    overrides = dict(n_layer=n_layer, n_head=n_head, d_model=d_model)
    sizes.update({k: v for k, v in overrides.items() if v is not None})
    return GPTConfig(**sizes, context=context, dropout=dropout)


class SelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.proj.is_residual = True
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.proj.is_residual = True
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Byte-level GPT. `forward(idx, targets)` returns (logits [B,T,vocab], mean CE loss or None)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)

    def _init(self, module: nn.Module) -> None:
        # GPT-2 init; residual projections shrink so the residual stream's
        # variance does not grow with depth.
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if getattr(module, "is_residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        T = idx.shape[1]
        assert T <= self.cfg.context, f"sequence of {T} exceeds context {self.cfg.context}"
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_params(self) -> int:
        """Parameters counted once each (the tied head shares the token embedding)."""
        return sum(p.numel() for p in self.parameters())


def build(cfg: GPTConfig, seed: int) -> GPT:
    """A GPT initialised from `seed` alone: same cfg and seed give bit-identical parameters.

    The global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(cfg)


def configure_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    """AdamW that decays matrices (linear weights, embeddings) but not biases or norm
    weights. Each group's `base_lr` is `lr`, the peak of apply_lr_schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "base_lr": lr},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "base_lr": lr},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused_for(p.device for p in params))


def fused_for(devices: Iterable[torch.device]) -> bool | None:
    """AdamW's `fused` for parameters on these devices: True (a few kernels for
    the whole step, no host sync under an fp16 scaler) when all are CUDA, None
    (torch's default; on the CPU the same bits as ever) otherwise."""
    devices = list(devices)
    return True if devices and all(d.type == "cuda" for d in devices) else None


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to `base_lr` over `warmup` steps, then cosine down to `base_lr * min_ratio`.

    `step` counts from 0: step 0 gets base_lr/warmup, step warmup-1 and warmup
    get base_lr, step `total` and later get base_lr*min_ratio.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    min_lr = base_lr * min_ratio
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, train: TrainSpec,
                    adamw_params: Iterable[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """The inner optimizer `train.optimizer` names: AdamW (configure_optimizer), or
    Muon for the hidden matrices at `train.muon_lr` with AdamW at `train.lr` for
    embeddings, head, biases, norm gains and `adamw_params` (geotrain/train/muon.py)."""
    if train.optimizer == "muon":
        from geotrain.train.muon import configure_muon
        return configure_muon(model, muon_lr=train.muon_lr, adamw_lr=train.lr,
                              weight_decay=train.weight_decay, betas=train.betas,
                              adamw_params=adamw_params)
    return configure_optimizer(model, train.lr, train.weight_decay, train.betas)


def apply_lr_schedule(optimizer: torch.optim.Optimizer, step: int, train: TrainSpec,
                      total: int) -> None:
    """Set every group's lr to lr_at(step) of the recipe's warmup and cosine, with the
    group's own `base_lr` as the peak, so groups at different lrs (Muon's matrices,
    AdamW's rest) follow one schedule. A group without `base_lr` (an optimizer
    built elsewhere) takes its lr at the first call as its peak."""
    for group in optimizer.param_groups:
        base = group.setdefault("base_lr", group["lr"])
        group["lr"] = lr_at(step, base, train.warmup_steps, total, train.min_lr_ratio)
