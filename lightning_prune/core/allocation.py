"""Choosing which channels to keep so that a network meets a budget.

Used when gates become hard masks: BAR's alive channels are repaired when they are still over
the budget, and Dirichlet importances are turned into per-layer widths by the same greedy
rule: drop the kept channel with the lowest score per unit of cost until the exact cost is at
or under the target. Scores are only compared, so any monotone importance works (open
probabilities, Dirichlet posterior means scaled by the group size).

:func:`round_widths` then makes every group's width a multiple of ``k`` (hardware-friendly
widths: vector units and matrix kernels run whole tiles of channels), again under the budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_prune._checks import check_int
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


def producing_layers(cost_model: CostModel, group: str) -> int:
    """How many layers output the channels of ``group`` (convolutions and linear layers, at
    least 1); a mixed-connectivity stream also counts every residual branch that adds into it
    (dropping a stream channel drops that channel of each branch), so a ResNet stage's stream
    counts the same in both residual modes."""
    groups = cost_model.graph.groups
    outputs = sum(1 for member in groups[group].members if member.role == "out")
    return max(1, outputs + sum(1 for g in groups.values() if g.stream == group))


def fit_budget(
    cost_model: CostModel,
    cost: str,
    target: float,
    scores: Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None = None,
    relative: bool = False,
    per_cost: bool = True,
    weights: Mapping[str, float] | None = None,
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
            it costs ``n * (log(kept) - log(kept - score))`` (scores must be > 0), with ``n``
            the number of layers whose outputs the group's channels are (4 for a ResNet stage's
            residual stream: the stem or projection and every block's last convolution; 1 for
            a plain layer). The greedy then maximises the sum over producing layers of the log
            of the score each keeps, under the budget: a group gets harder to thin the more of
            its importance it has already lost, and a stream shared by n layers weighs as those
            n layers. Plain scores (``False``) compare channels of different groups directly.
        weights: with ``relative``, ``{group: w}`` replaces ``n`` above (groups missing: ``n``).
            With ``w`` a group's total score in units that compare across groups (e.g. a loss
            change), dropping channel i first costs about its score, ``w * score / kept``, and
            more as the group thins.
        per_cost: divide each score by the channel's marginal cost (default); ``False`` drops
            the lowest-scoring channel wherever it is, whatever it saves.

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
    producers = {name: float((weights or {}).get(name, producing_layers(cost_model, name))) for name in score}
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
                s = producers[name] * (torch.log(kept) - torch.log((kept - s).clamp_min(kept * 1e-12)))
            ratio = torch.where(mask, s / w if per_cost else s, torch.full_like(s, float("inf")))
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


def fill_budget(
    cost_model: CostModel,
    cost: str,
    target: float,
    scores: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
) -> Allocation:
    """Add dropped channels back, highest score first, as long as the exact cost stays at or
    under ``target``: the counterpart of :func:`fit_budget` for masks that spend less than the
    budget (a channel that does not fit is skipped and cheaper ones are still tried; one that
    would cost nothing is skipped too: it would not be computed, e.g. a branch channel adding
    into a dropped stream channel). Groups
    missing from ``scores`` are left as they are; a removed mixed-connectivity branch gets
    channels back only if its whole branch fits. ``dropped`` lists the channels added back."""
    keep = {name: torch.as_tensor(m, dtype=torch.bool).detach().cpu().clone() for name, m in masks.items()}
    current = cost_model.exact(keep, cost)
    if current > target:
        raise ValueError(f"fill_budget: the masks already cost {cost} {current:,}, over the target {target:,.0f}")
    candidates = [
        (float(s[i]), name, int(i))
        for name, s in ((n, torch.as_tensor(v, dtype=torch.float64).detach().cpu()) for n, v in scores.items())
        for i in torch.nonzero(~keep[name]).flatten().tolist()
    ]
    added: dict[str, list[int]] = {}
    for _, name, i in sorted(candidates, key=lambda c: (-c[0], c[1], c[2])):
        keep[name][i] = True
        value = cost_model.exact(keep, cost)
        if current < value <= target:  # a channel that costs nothing computes nothing (e.g. a branch channel of a removed stream channel)
            current = value
            added.setdefault(name, []).append(i)
        else:
            keep[name][i] = False
    return Allocation(masks=keep, cost=current, dropped={k: sorted(v) for k, v in added.items()})


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


def _allowed_widths(size: int, k: int, limit: int, may_empty: bool) -> list[int]:
    """The widths (ascending) a group of ``size`` channels may keep under :func:`round_widths`
    when at most ``limit`` of its channels can be kept: the multiples of ``k``, the full
    ``size`` (when all of it can be kept), and 0 for a branch group."""
    allowed = set(range(k, limit + 1, k))
    if limit == size:
        allowed.add(size)
    if may_empty:
        allowed.add(0)
    return sorted(allowed)


def _resize(mask: Tensor, score: Tensor, width: int, eligible: Tensor | None = None) -> list[int]:
    """Make ``mask`` keep ``width`` channels, in place: add back the highest-scoring dropped
    channels (among the ``eligible`` ones) or drop the lowest-scoring kept ones (ties: the
    lower index first). Returns the indices dropped."""
    kept = int(mask.sum())
    if width > kept:
        pool = ~mask if eligible is None else ~mask & eligible
        candidates = pool.nonzero().flatten()
        order = torch.argsort(score[candidates], descending=True, stable=True)
        mask[candidates[order[: width - kept]]] = True
        return []
    kept_idx = mask.nonzero().flatten()
    drop = kept_idx[torch.argsort(score[kept_idx], stable=True)[: kept - width]]
    mask[drop] = False
    return drop.tolist()


def round_widths(
    cost_model: CostModel,
    cost: str,
    target: float,
    scores: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    k: int,
) -> Allocation:
    """Round the keep-masks ``masks`` (e.g. a method's choice under the budget) so that every
    group keeps a multiple of ``k`` channels, then drop channels until the exact cost is at or
    under ``target``.

    Which widths a group may keep: a multiple of ``k``; its full width (a group of fewer than
    ``k`` channels keeps all of them); and, for the branch group of a mixed-connectivity
    residual block, 0 (the branch is removed). Only the branch channels whose stream channel
    is kept are computed (:meth:`~lightning_prune.core.graph.ChannelGraph.effective_masks`), so
    a branch group's width counts those (its returned mask keeps no other channel), and its
    full width is allowed only while the whole stream it adds into is kept.

    1. Rounding: each group's kept count goes to the nearest allowed width (ties: the
       narrower), streams and other groups first, then branch groups (a branch's count being
       at most the channels whose stream channel is kept), by ``scores``: the highest-scoring
       dropped channels come back, or the lowest-scoring kept ones go.
    2. Repair: while the exact cost is over ``target``, the group whose next narrower allowed
       width (``k`` channels fewer, the lowest-scoring) has the lowest ``dropped score / cost
       saved`` steps down to it (the cost saved is exact, evaluated with ``cost_model``). A
       group never goes below ``k`` channels (below its full width when that is less than
       ``k``), a branch group may go to 0; narrowing a stream narrows the branches adding into
       it, which are rounded down with it.

    Args:
        cost_model: the cost model of the network.
        cost: ``"volume"``, ``"macs"`` or ``"params"``.
        target: the budget, in units of ``cost`` per sample (``math.inf``: round only).
        scores: ``{group: (size,) tensor}``, higher = more important; a group missing here is
            ranked by channel index (the first channels first) and never narrowed in the repair.
        masks: the starting keep-masks (groups not given keep every channel).
        k: the width multiple, an int >= 1.

    Returns:
        The masks, their exact cost, and ``dropped``: the channels kept in ``masks`` but not
        in the result.

    Raises:
        ValueError: the target cannot be met with widths that are multiples of ``k``.
    """
    check_int("k", k, 1)
    graph = cost_model.graph
    groups = graph.groups
    keep = {name: m.clone() for name, m in graph.check_masks(masks, allow_empty=True).items()}
    start = {name: m.clone() for name, m in keep.items()}
    score: dict[str, Tensor] = {}
    for name, group in groups.items():
        if name in scores:
            s = torch.as_tensor(scores[name], dtype=torch.float64).detach().cpu()
            if s.shape != (group.size,):
                raise ValueError(f"scores[{name!r}] must have shape ({group.size},), got {tuple(s.shape)}")
        else:
            s = -torch.arange(group.size, dtype=torch.float64)
        score[name] = s
    branches_of: dict[str, list[str]] = {}
    for name in graph.branch_names:
        branches_of.setdefault(groups[name].stream, []).append(name)
    into = {name: torch.tensor(groups[name].into, dtype=torch.long) for name in graph.branch_names}

    def allowed(name: str, state: Mapping[str, Tensor]) -> tuple[list[int], Tensor | None]:
        group = groups[name]
        if not group.is_branch:
            return _allowed_widths(group.size, k, group.size, False), None
        eligible = state[group.stream][into[name]]
        return _allowed_widths(group.size, k, int(eligible.sum()), True), eligible

    # 1. Rounding to the nearest allowed width.
    for name in [n for n in groups if not groups[n].is_branch] + list(graph.branch_names):
        widths, eligible = allowed(name, keep)
        count = int(keep[name].sum())
        if eligible is not None:
            count = min(count, int(eligible.sum()))
            keep[name] &= eligible
        width = min(widths, key=lambda w: (abs(w - count), w))
        _resize(keep[name], score[name], width, eligible)

    def narrower(name: str) -> tuple[dict[str, Tensor], float] | None:
        """The masks changed by stepping ``name`` down to its next allowed width, and the score
        of the channels dropped (None: it is as narrow as it may be)."""
        widths, _ = allowed(name, keep)
        below = [w for w in widths if w < int(keep[name].sum())]
        if not below:
            return None
        changed = {name: keep[name].clone()}
        dropped = _resize(changed[name], score[name], below[-1])
        value = float(score[name][dropped].sum())
        for branch in branches_of.get(name, ()):
            mask = keep[branch] & changed[name][into[branch]]  # its channels adding into dropped ones go
            widths, _ = allowed(branch, {**keep, **changed})
            _resize(mask, score[branch], max(w for w in widths if w <= int(mask.sum())))
            value += float(score[branch][keep[branch] & ~mask].sum())
            changed[branch] = mask
        return changed, value

    # 2. Repair: step down the group with the lowest dropped score per unit of cost saved.
    current = cost_model.exact(keep, cost)
    while current > target:
        best: tuple[float, dict[str, Tensor], int] | None = None
        for name in groups:
            if name not in scores:
                continue
            step = narrower(name)
            if step is None:
                continue
            changed, value = step
            after = cost_model.exact({**keep, **changed}, cost)
            if after >= current:
                continue
            ratio = value / (current - after)
            if best is None or ratio < best[0]:
                best = (ratio, changed, after)
        if best is None:
            raise ValueError(
                f"round_to: with every group's width a multiple of {k} (or its full width"
                + (", or 0 for a residual branch" if graph.branch_names else "")
                + f") the {cost} budget {target:,.0f} cannot be met: with every group as narrow as that allows, "
                f"the network still costs {current:,}"
            )
        keep.update(best[1])
        current = best[2]
    dropped = {name: (start[name] & ~keep[name]).nonzero().flatten().tolist() for name in groups}
    return Allocation(masks=keep, cost=current, dropped={n: d for n, d in dropped.items() if d})
