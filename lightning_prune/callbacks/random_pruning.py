"""``RandomPruning``: the random-pruning baseline of papers/001 §3.2, as a channel-selection
callback for :class:`~lightning_prune.callbacks.HardPruning`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_prune._checks import check_int
from lightning_prune.callbacks.gated import GatedPruning
from lightning_prune.gates import ChannelGate, FixedMask
from lightning_prune.graph import ChannelGroup


class RandomPruning(GatedPruning):
    """Drops channels chosen uniformly at random until the network meets the budget.

    The network trains unchanged (its gates are all-ones fixed masks with no parameters)
    until :class:`HardPruning` asks for the keep-masks at its ``at_epoch``; then channels are
    removed one at a time, in a random order over all channels of all groups, until the
    exact cost is at or under the budget (every group keeps at least one channel), and the
    network is shrunk and trained on. With the same ``at_epoch`` and epochs as a BAR run this
    is BAR with the learned choice of channels replaced by chance: the baseline "Random" of
    papers/001 Tables 1-4 (there with iterative halving; here in one step, so that every
    budget gets the same number of epochs).

    Args:
        budget, factor, cost, module, example_input, ignore, verbose: see
            :class:`~lightning_prune.callbacks.gated.GatedPruning`.
        seed: seed of the random order (independent of the global RNG, so a resumed run
            drops the same channels).
    """

    def __init__(
        self,
        budget: float | None = None,
        factor: float | None = None,
        cost: str = "volume",
        seed: int = 0,
        module: str | None = None,
        example_input: Any = None,
        ignore: Sequence[str] = (),
        verbose: bool = True,
    ) -> None:
        super().__init__(budget, factor, cost, 1.0, module, example_input, ignore, verbose)
        self.seed = check_int("seed", seed, 0)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(budget=self.budget, cost=self.cost, module=self.module, method="random")

    def make_gate(self, group: ChannelGroup) -> ChannelGate:
        return FixedMask(torch.ones(group.size, dtype=torch.bool))

    def make_gate_optimizer(self) -> None:
        return None  # nothing to learn

    def regularizer(self) -> Tensor | None:
        return None

    def keep_masks(self, widths: Mapping[str, int] | None = None) -> dict[str, Tensor]:
        """Random keep-masks under the budget (or ``widths`` random channels per group)."""
        generator = torch.Generator().manual_seed(self.seed)
        if widths is not None:
            scores = {n: torch.rand(s, generator=generator) for n, s in zip(self.cost_model.names, self.cost_model.sizes)}
            return self.masks_for_widths(scores, widths)
        keep = {n: torch.ones(s, dtype=torch.bool) for n, s in zip(self.cost_model.names, self.cost_model.sizes)}
        channels = [(n, i) for n, s in zip(self.cost_model.names, self.cost_model.sizes) for i in range(s)]
        order = torch.randperm(len(channels), generator=generator).tolist()
        # Visiting every channel would leave one per group, which setup checked fits the budget.
        cost = self.cost_model.exact(keep, self.cost)
        for k in order:
            if cost <= self.target_cost:
                break
            name, index = channels[k]
            if int(keep[name].sum()) > 1:
                keep[name][index] = False
                cost = self.cost_model.exact(keep, self.cost)
        return keep
