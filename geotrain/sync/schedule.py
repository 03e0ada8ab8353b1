"""The outer learning rate of each DiLoCo round (`sync.outer_lr_schedule` in the recipe).

Every site must apply the same outer lr to the same round — a site that joins
late replays the decided rounds through the same merge, and the hashes of the
global parameters are compared — so the lr of round r is a pure function of r
and the recipe: `OuterLR`, a frozen callable that DiLoCo takes as its `outer_lr`.
Rounds count from 1. 'constant' gives `lr` every round (after an optional
linear warmup); 'cosine' goes down from `lr` to `lr * min_ratio`, reached at
round `rounds` and kept after it. It is the inner schedule's warmup-and-cosine
(`lr_at`, geotrain/train/model.py) over rounds instead of steps.

    diloco = DiLoCo(model, opt, exchange, 50, outer_lr=OuterLR.of(recipe.sync, recipe.train.rounds))
"""

from __future__ import annotations

from dataclasses import dataclass

from geotrain.recipe.sections import SyncSpec
from geotrain.train.model import lr_at

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class OuterLR:
    """The outer lr of round r (from 1) is `OuterLR(...)(r)`."""

    lr: float
    rounds: int
    schedule: str = "constant"
    warmup: int = 0         # rounds of linear warmup up to `lr`
    min_ratio: float = 0.1  # 'cosine' ends at lr * min_ratio

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"outer lr schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.rounds < 1 or self.warmup < 0 or not 0 <= self.min_ratio <= 1:
            raise ValueError(f"{self}: rounds must be at least 1, warmup at least 0, "
                             "min_ratio in [0, 1]")

    @classmethod
    def of(cls, sync: SyncSpec, rounds: int) -> OuterLR:
        """The schedule a recipe's `sync` section asks for over a run of `rounds` rounds."""
        return cls(sync.outer_lr, rounds, sync.outer_lr_schedule, sync.outer_lr_warmup,
                   sync.outer_lr_min_ratio)

    def __call__(self, r: int) -> float:
        if self.schedule == "constant" and not self.warmup:
            return self.lr
        min_ratio = self.min_ratio if self.schedule == "cosine" else 1.0
        # lr_at's step s runs from 0 and reaches its floor at s == total: round r is
        # step r - 1, so the last round (step rounds - 1) gets exactly lr * min_ratio.
        return lr_at(r - 1, self.lr, self.warmup, self.rounds - 1, min_ratio)
