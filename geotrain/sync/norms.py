"""The per-site norm check on contributions (geotrain/sync/rounds.py): a site's
pseudo-gradient norm is compared with the norms accepted from it in its recent
rounds, so that a sudden jump is caught even with two sites (the round's median
needs 3+). Each round's decision records the history (`norms` in members.json);
it is store content, so it is read defensively. Keys are member base names, or
"site#k" with fragment sync: a fragment's norm is compared only with the same
fragment's (geotrain/sync/fragments.py).
"""

from __future__ import annotations

import math
import statistics

import torch

Tensors = dict[str, torch.Tensor]

# A site's norm may be at most max(reject_norm_factor, NORM_HISTORY_MIN_FACTOR) x
# the median of the last NORM_HISTORY norms accepted from it (its member names
# share one history).
NORM_HISTORY = 5
NORM_HISTORY_MIN_FACTOR = 4.0


def tensor_norm(t: Tensors) -> float:
    """L2 norm over all tensors, in float64 and name order (deterministic)."""
    return math.sqrt(sum(float(t[n].double().pow(2).sum()) for n in sorted(t)))


def _pair(v) -> bool:
    return (isinstance(v, list) and len(v) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
        for x in v) and v[0] >= 0 and v[1] > 0)


def norm_history(store, r: int, lookback: int) -> dict[str, list[list[float]]]:
    """Each site's last accepted [norm, tokens] pairs, as the newest decision
    before r (at most `lookback` back) recorded them; malformed entries are dropped."""
    for q in range(r - 1, max(0, r - 1 - lookback), -1):
        m = store.members(q)
        if m is None or not isinstance(m.get("norms"), dict):
            continue
        return {s: [[float(x) for x in v] for v in h if _pair(v)][-NORM_HISTORY:]
                for s, h in m["norms"].items() if isinstance(h, list)}
    return {}


def norm_outlier(norm: float, tokens: float, past: list[list[float]],
                 reject_norm_factor: float) -> str | None:
    """Why `norm` is a sudden jump for a site with this history, or None.

    Conservative, so that honest work is never rejected: only an upward
    jump counts (norms fall as training goes on and lr decays; a drained
    site sends a short round); a site's first contribution has no history
    and passes; the factor is at least NORM_HISTORY_MIN_FACTOR because lr
    warmup makes norms grow: with linear warmup a round's mean lr is < 3x
    the previous round's (rounds 1, 2: (H+1)/2 vs (3H+1)/2 steps of lr/W)
    and < 3x the median of the rounds before; AdamW's first steps (|update|
    = lr per value) only make early norms larger. And the norm must be out
    of line both in total and per token: a round that trained more (a
    first `round_seconds` round cut short by start-up, then full ones)
    has a larger norm but not a larger norm per token."""
    if not past:
        return None
    f = max(reject_norm_factor, NORM_HISTORY_MIN_FACTOR)
    median = statistics.median(n for n, _ in past)
    per_token = statistics.median(n / t for n, t in past)
    if median > 0 and norm > f * median and norm / tokens > f * per_token:
        return (f"norm {norm:.3g} > {f:g} x median {median:.3g} of the last {len(past)} "
                f"accepted (and {f:g} x their median per token)")
    return None
