"""``SigmoidalBudgetAnnealing``: moves the BAR budget from the full cost to the target."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightning_prune._checks import check_int
from lightning_prune.budget import budget_at, finite_real


class SigmoidalBudgetAnnealing(Callback):
    """Anneal the budget ``b`` of :class:`BudgetAwareRegularization` along the sigmoidal
    transition of papers/001 §1: ``b(t) = (1 - T(t, d)) * b0 + T(t, d) * B`` with
    ``b0 = start_factor * V0`` (just above the full cost ``V0``), ``B`` the target cost and
    ``t`` the progress from ``from_epoch`` to ``until_epoch``, advanced every optimizer step
    (not every epoch). Before ``from_epoch`` the budget is ``b0``, after ``until_epoch`` it is ``B``.

    Args:
        until_epoch: epoch at which the budget reaches the target (exclusive end of the transition).
        from_epoch: epoch at which the transition starts.
        hardness: ``d`` of papers/001; 0 gives a linear schedule, large values a step.
        start_factor: ``b0 / V0``, greater than 1 (1.01 in papers/001).
    """

    def __init__(self, until_epoch: int, from_epoch: int = 0, hardness: float = 10.0, start_factor: float = 1.01) -> None:
        for name, value in (("until_epoch", until_epoch), ("from_epoch", from_epoch)):
            check_int(name, value, 0)
        if until_epoch <= from_epoch:
            raise ValueError(f"until_epoch must be greater than from_epoch ({from_epoch}), got {until_epoch}")
        hardness = finite_real("hardness", hardness)
        if hardness < 0:
            raise ValueError(f"hardness must be >= 0, got {hardness}")
        start_factor = finite_real("start_factor", start_factor)
        if start_factor <= 1:
            raise ValueError(f"start_factor must be > 1 (the start budget lies just above the full cost), got {start_factor}")
        self.until_epoch = until_epoch
        self.from_epoch = from_epoch
        self.hardness = hardness
        self.start_factor = start_factor

    @property
    def state_key(self) -> str:
        return self._generate_state_key(from_epoch=self.from_epoch, until_epoch=self.until_epoch, hardness=self.hardness)

    def progress(self, step: int, steps_per_epoch: int) -> float:
        """``t`` in [0, 1] after ``step`` optimizer steps with ``steps_per_epoch`` steps an epoch."""
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        start, end = self.from_epoch * steps_per_epoch, self.until_epoch * steps_per_epoch
        return min(1.0, max(0.0, (step - start) / (end - start)))

    def budget(self, t: float, full_cost: float, target: float) -> float:
        return budget_at(t, self.start_factor * full_cost, target, self.hardness)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._bar(trainer)  # fail at setup, not mid-training, when BAR is missing

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        bar = self._bar(trainer)
        if not bar.active:
            return
        steps_per_epoch = max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))
        t = self.progress(trainer.global_step, steps_per_epoch)
        bar.current_budget = self.budget(t, bar.full_cost, bar.target_cost)

    @staticmethod
    def _bar(trainer: L.Trainer) -> Any:
        from lightning_prune.callbacks.bar import BudgetAwareRegularization

        found = [c for c in trainer.callbacks if isinstance(c, BudgetAwareRegularization)]
        if len(found) != 1:
            raise ValueError(
                f"SigmoidalBudgetAnnealing needs exactly one BudgetAwareRegularization callback in the Trainer, found {len(found)}"
            )
        return found[0]
