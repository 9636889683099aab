"""Choosing which channels to keep so that a network meets a budget.

Used when gates become hard masks: BAR's alive channels are repaired when they are still over
the budget, and Dirichlet importances are turned into per-layer widths by the same greedy
rule: drop the kept channel with the lowest score per unit of cost until the exact cost is at
or under the target. Scores are only compared, so any monotone importance works (open
probabilities, Dirichlet posterior means scaled by the group size).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_prune.core.cost.model import CostModel


@dataclass(frozen=True)
class Allocation:
    """Keep-masks that meet the budget, the cost they reach, and the channels dropped to get there."""

    masks: dict[str, Tensor]
    cost: int
    dropped: dict[str, list[int]]


def minimum_cost(cost_model: CostModel, cost: str) -> int:
    """Cost of the network keeping one channel (the first) of every group, and none of the
    branch groups of mixed-connectivity residual blocks (every such branch removed): the floor
    of any budget."""
    one = {}
    branches = set(cost_model.graph.branch_names)
    for name, size in zip(cost_model.names, cost_model.sizes):
        mask = torch.zeros(size, dtype=torch.bool)
        mask[0] = name not in branches
        one[name] = mask
    return cost_model.exact(one, cost)


def fit_budget(
    cost_model: CostModel,
    cost: str,
    target: float,
    scores: Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None = None,
    relative: bool = False,
) -> Allocation:
    """Greedily drop channels until ``cost_model.exact(masks, cost) <= target``.

    Args:
        cost_model: the cost model of the network.
        cost: ``"volume"``, ``"macs"`` or ``"params"``.
        target: the budget, in units of ``cost`` per sample.
        scores: ``{group: (size,) tensor}``, higher = more important (groups missing: never dropped).
        masks: starting keep-masks (default: keep everything). A group that keeps no channel
            gets back its highest-scoring channel: every group keeps at least one, except the
            branch groups of mixed-connectivity residual blocks, which may keep none (the
            branch is removed; its marginal cost then includes every layer of the branch).
        relative: value a channel by the share of its group's *kept* score it holds: dropping
            it costs ``log(kept) - log(kept - score)`` (scores must be > 0). The greedy then
            maximises the sum over groups of the log of the kept score under the budget, so a
            group gets harder to thin the more of its importance it has already lost; plain
            scores (``False``) compare channels of different groups directly.

    Each step drops the kept channel with the lowest ``score / marginal cost`` (the marginal
    cost is re-evaluated as the network shrinks, since MACs and parameters are bilinear in
    the widths of adjacent layers), never the last channel of a group (but the last of a branch group).

    Raises:
        ValueError: the target cannot be met even with one channel per group.
    """
    keep = {name: torch.ones(size, dtype=torch.bool) for name, size in zip(cost_model.names, cost_model.sizes)}
    for name, mask in (masks or {}).items():
        keep[name] = torch.as_tensor(mask, dtype=torch.bool).detach().cpu().clone()
    score = {name: torch.as_tensor(s, dtype=torch.float64).detach().cpu() for name, s in scores.items()}
    if relative and any(bool((s <= 0).any()) for s in score.values()):
        raise ValueError("scores must be > 0 with relative=True (they are shares of each group's total)")
    branches = set(cost_model.graph.branch_names)
    for name, mask in keep.items():
        if not bool(mask.any()) and name not in branches:
            best = int(torch.argmax(score[name])) if name in score else 0
            mask[best] = True
    dropped: dict[str, list[int]] = {}
    current = cost_model.exact(keep, cost)
    refresh_every = max(1, sum(int(m.sum()) for m in keep.values()) // 200)
    weights: dict[str, Tensor] = {}
    since_refresh = refresh_every
    while current > target:
        if since_refresh >= refresh_every:
            weights = cost_model.channel_weights(cost, {n: m.double() for n, m in keep.items()})
            since_refresh = 0
        best_name, best_idx, best_ratio = None, -1, float("inf")
        for name, s in score.items():
            mask = keep[name]
            if int(mask.sum()) <= (0 if name in branches else 1):
                continue
            w = weights[name].clamp_min(1e-12)
            if relative:
                kept = s[mask].sum()
                s = torch.log(kept) - torch.log((kept - s).clamp_min(kept * 1e-12))
            ratio = torch.where(mask, s / w, torch.full_like(s, float("inf")))
            idx = int(torch.argmin(ratio))
            if float(ratio[idx]) < best_ratio:
                best_name, best_idx, best_ratio = name, idx, float(ratio[idx])
        if best_name is None:
            raise ValueError(
                f"budget: a {cost} of {target:,.0f} cannot be reached; with one channel per group the network still costs {current:,}"
                + (" (and every residual branch removed)" if branches else "")
            )
        keep[best_name][best_idx] = False
        dropped.setdefault(best_name, []).append(best_idx)
        current = cost_model.exact(keep, cost)
        since_refresh += 1
    return Allocation(masks=keep, cost=current, dropped={k: sorted(v) for k, v in dropped.items()})


def top_k_masks(scores: Mapping[str, Tensor], widths: Mapping[str, int], may_empty: Iterable[str] = ()) -> dict[str, Tensor]:
    """Keep the ``widths[group]`` highest-scoring channels of each listed group (0 allowed for
    the groups in ``may_empty``: the branch groups of mixed-connectivity residual blocks)."""
    masks = {}
    may_empty = set(may_empty)
    for name, k in widths.items():
        if name not in scores:
            raise ValueError(f"widths: unknown channel group {name!r}; groups: {', '.join(scores)}")
        s = torch.as_tensor(scores[name]).detach().cpu()
        low = 0 if name in may_empty else 1
        if isinstance(k, bool) or not isinstance(k, int) or not low <= k <= s.numel():
            raise ValueError(f"widths[{name!r}] must be an int from {low} to {s.numel()}, got {k!r}")
        mask = torch.zeros(s.numel(), dtype=torch.bool)
        mask[torch.topk(s, k).indices] = True
        masks[name] = mask
    return masks
