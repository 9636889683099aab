"""``RandomPruning``: the random-pruning baseline of Lemaire et al. (CVPR 2019, Tables 1-4) as a
channel-selection callback for :class:`~lightning_prune.callbacks.HardPruning`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_prune.callbacks.gated import GatedPruning
from lightning_prune.methods.random import RandomChoice


class RandomPruning(GatedPruning):
    """Drops channels chosen uniformly at random until the network meets the budget
    (:class:`~lightning_prune.methods.RandomChoice`).

    The network trains unchanged (its gates are all-ones fixed masks with no parameters)
    until :class:`HardPruning` asks for the keep-masks at its ``at_epoch``; then channels are
    removed one at a time, in a random order over all channels of all groups, until the
    exact cost is at or under the budget (every group keeps at least one channel), and the
    network is shrunk and trained on. With the same ``at_epoch`` and epochs as a BAR run this
    is BAR with the learned choice of channels replaced by chance: the baseline "Random" of
    Lemaire et al. 2019 (there with iterative halving; here in one step, so that every budget
    gets the same number of epochs).

    Args (keyword-only):
        budget, factor, cost, latency, module, example_input, ignore, verbose, distillation,
            distill_fine_tuning, temperature, alpha: see
            :class:`~lightning_prune.callbacks.gated.GatedPruning`.
        seed: seed of the random order (independent of the global RNG, so a resumed run
            drops the same channels).
        residual: ``"tied"`` (default) or ``"mixed"`` residual blocks (see
            :func:`lightning_prune.core.trace.build_graph`): with ``"mixed"`` the random
            choice may remove a residual branch entirely.
    """

    def __init__(
        self,
        *,
        budget: float | None = None,
        factor: float | None = None,
        cost: str = "volume",
        latency: Any = None,
        seed: int = 0,
        residual: str = "tied",
        module: str | None = None,
        example_input: Any = None,
        ignore: Sequence[str] = (),
        verbose: bool = True,
        distillation: bool = False,
        distill_fine_tuning: bool = False,
        temperature: float = 4.0,
        alpha: float = 0.9,
    ) -> None:
        self._seed = seed
        self._residual = residual
        super().__init__(budget=budget, factor=factor, cost=cost, latency=latency, module=module, example_input=example_input,
                         ignore=ignore, verbose=verbose, distillation=distillation, distill_fine_tuning=distill_fine_tuning,
                         temperature=temperature, alpha=alpha)

    @property
    def seed(self) -> int:
        return self.method.seed

    def make_method(self) -> RandomChoice:
        return RandomChoice(self._seed, residual=self._residual)
