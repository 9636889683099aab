"""Random pruning, the baseline of Lemaire et al. 2019 (Tables 1-4), as a strategy: the
network trains unchanged, then channels chosen uniformly at random are dropped until the
budget is met."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_prune._checks import check_int
from lightning_prune.core.gates import ChannelGate, FixedMask
from lightning_prune.core.graph import ChannelGroup
from lightning_prune.core.method import Method, PruningSession

__all__ = ["RandomChoice"]


class RandomChoice(Method):
    """All-ones fixed masks (nothing is learned); the keep-masks drop channels one at a time,
    in a random order over all channels of all groups, until the exact cost is at or under
    the budget (every group keeps at least one channel, except the branch groups of
    mixed-connectivity residual blocks, which may be emptied: the branch is removed).

    Args:
        seed: seed of the random order (its own generator: a resumed run drops the same channels).
        residual: ``"tied"`` (default) or ``"mixed"`` residual blocks (see
            :func:`lightning_prune.core.trace.build_graph`).
    """

    name = "random"

    def __init__(self, seed: int = 0, residual: str = "tied") -> None:
        super().__init__()
        self.seed = check_int("seed", seed, 0)
        self.residual = self.check_residual(residual)

    def make_gate(self, group: ChannelGroup) -> ChannelGate:
        return FixedMask(torch.ones(group.size, dtype=torch.bool))

    def scores(self, session: PruningSession) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        return {n: torch.rand(s, generator=generator) for n, s in zip(session.cost_model.names, session.cost_model.sizes)}

    def keep_masks(self, session: PruningSession) -> dict[str, Tensor]:
        model, cost, target = session.cost_model, session.cost, session.budget.target
        generator = torch.Generator().manual_seed(self.seed)
        keep = {n: torch.ones(s, dtype=torch.bool) for n, s in zip(model.names, model.sizes)}
        channels = [(n, i) for n, s in zip(model.names, model.sizes) for i in range(s)]
        order = torch.randperm(len(channels), generator=generator).tolist()
        # Visiting every channel would leave one per group (none per branch group), which the
        # budget's floor check allows.
        branches = set(model.graph.branch_names)
        current = model.exact(keep, cost)
        for k in order:
            if current <= target:
                break
            name, index = channels[k]
            if int(keep[name].sum()) > (0 if name in branches else 1):
                keep[name][index] = False
                current = model.exact(keep, cost)
        return keep

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}
