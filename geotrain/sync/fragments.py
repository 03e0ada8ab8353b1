"""Fragment sync (`sync.fragments`, as in Streaming DiLoCo): each round syncs one
part of the model in turn, so that no single exchange carries the whole model.

The model's tensors, in `named_parameters` order, are cut into P contiguous
fragments of about equal size (numel). Round r syncs fragment (r - 1) % P: each
site publishes only that fragment's pseudo-gradient, and the round's outer step
moves only those tensors (and their outer momentum). The other tensors keep
training locally; their progress accumulates until their own turn, so each
fragment's outer step covers P rounds of inner steps. To keep each fragment's
sync period at H inner steps, set `inner_steps` to H / P: a round then moves
1/P of the model's bytes every H / P steps, the same bytes per step as P = 1.

The partition depends only on the tensors' names, order and sizes, so every
site (and a site that joins later and replays the decisions) computes the same
one. P = 1 is plain DiLoCo, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def partition(sizes: Sequence[tuple[str, int]], parts: int) -> list[tuple[str, ...]]:
    """Cut tensors [(name, numel)] (in model order) into `parts` contiguous,
    non-empty groups balanced by numel: each cut goes where the running total
    comes closest to k/parts of the whole (greedy, integer arithmetic).
    ValueError if there are fewer tensors than parts."""
    names = [n for n, _ in sizes]
    if parts < 1:
        raise ValueError(f"fragments must be >= 1, not {parts}")
    if parts > len(names):
        raise ValueError(f"{parts} fragments, but the model has only {len(names)} tensors: "
                         f"each fragment needs one at least; use fragments <= {len(names)}")
    numel = [int(s) for _, s in sizes]
    total, cuts, i, run = sum(numel), [0], 0, 0
    for k in range(1, parts):
        target = total * k  # compared with parts * running total
        run += numel[i]     # every fragment takes one tensor at least
        i += 1
        # Take the next tensor while that brings the cut closer to the target and
        # leaves a tensor for each fragment after this one.
        while i < len(names) - (parts - k) and \
                abs(parts * (run + numel[i]) - target) < abs(parts * run - target):
            run += numel[i]
            i += 1
        cuts.append(i)
    cuts.append(len(names))
    return [tuple(names[a:b]) for a, b in zip(cuts, cuts[1:])]


class Fragments:
    """The model's fragments and which one each round syncs."""

    def __init__(self, sizes: Sequence[tuple[str, int]], parts: int = 1):
        self.parts = tuple(frozenset(p) for p in partition(sizes, parts))
        self.count = len(self.parts)

    @classmethod
    def of_model(cls, model: torch.nn.Module, parts: int = 1) -> Fragments:
        return cls([(n, p.numel()) for n, p in model.named_parameters()], parts)

    def index(self, r: int) -> int:
        """The fragment round r syncs."""
        return (r - 1) % self.count

    def names(self, r: int) -> frozenset[str]:
        """The tensors round r syncs."""
        return self.parts[self.index(r)]

    def describe(self, r: int) -> str:
        """What round r syncs, for messages."""
        if self.count == 1:
            return "the whole model"
        return f"fragment {self.index(r) + 1} of {self.count} ({len(self.names(r))} tensors)"

    def norm_key(self, site: str, r: int) -> str:
        """Whose norm history a contribution to round r is compared with: the site's
        own, of the same fragment ('a', or 'a#k' with fragments)."""
        return site if self.count == 1 else f"{site}#{self.index(r)}"
