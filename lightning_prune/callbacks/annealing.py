"""``SigmoidalBudgetAnnealing``: moves the BAR budget from the full cost to the target."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightning_prune._checks import check_int
from lightning_prune.callbacks.gated import require_session
from lightning_prune.core.budget import Budget, SigmoidalTransition, finite_real
from lightning_prune.methods.bar import BarrierPenalty


class SigmoidalBudgetAnnealing(Callback):
    """Anneal the budget ``b`` of :class:`BudgetAwareRegularization` along the sigmoidal
    transition of Lemaire et al. (CVPR 2019, Sec. 3.4 and supplementary eq. 1): ``b(t) = (1 - T(t, d)) * b0 + T(t, d) * B``
    with ``b0 = start_factor * V0`` (just above the full cost ``V0``), ``B`` the target cost and
    ``t`` the progress from ``from_epoch`` to ``until_epoch``, advanced every optimizer step
    (not every epoch). Before ``from_epoch`` the budget is ``b0``, after ``until_epoch`` it is ``B``.

    It sets the schedule of the session's :class:`~lightning_prune.core.budget.Budget` and its
    progress; the session is found through the LightningModule.

    Args (keyword-only except ``until_epoch``):
        until_epoch: epoch at which the budget reaches the target (exclusive end of the transition);
            a real number ends it inside an epoch (``until_epoch=0.75``: after three quarters of
            the first epoch's steps), so the gates can catch up with the target before hard
            pruning at a later epoch boundary.
        from_epoch: epoch at which the transition starts.
        hardness: ``d``; 0 gives a linear schedule, large values a step.
        start_factor: ``b0 / V0``, greater than 1 (1.01 in Lemaire et al. 2019).
        interpolation: ``"linear"`` (the paper's formula above) or ``"geometric"``:
            ``b(t) = b0 ** (1 - T(t, d)) * B ** T(t, d)``, equal ratios of cost in equal steps of
            ``T`` (see :class:`~lightning_prune.core.budget.Budget`).
    """

    def __init__(self, until_epoch: float, *, from_epoch: int = 0, hardness: float = 10.0, start_factor: float = 1.01,
                 interpolation: str = "linear") -> None:
        check_int("from_epoch", from_epoch, 0)
        if finite_real("until_epoch", until_epoch) <= from_epoch:
            raise ValueError(f"until_epoch must be greater than from_epoch ({from_epoch}), got {until_epoch}")
        self.schedule = SigmoidalTransition(hardness)
        self.start_factor, self.interpolation = Budget.checked_annealing(start_factor, interpolation)
        self.until_epoch = until_epoch
        self.from_epoch = from_epoch
        self.hardness = self.schedule.hardness

    @property
    def state_key(self) -> str:
        return self._generate_state_key(from_epoch=self.from_epoch, until_epoch=self.until_epoch, hardness=self.hardness)

    def progress(self, step: int, steps_per_epoch: int) -> float:
        """``t`` in [0, 1] after ``step`` optimizer steps with ``steps_per_epoch`` steps an epoch."""
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        start, end = self.from_epoch * steps_per_epoch, self.until_epoch * steps_per_epoch
        return min(1.0, max(0.0, (step - start) / (end - start)))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        session = require_session(pl_module, "SigmoidalBudgetAnnealing")
        if not isinstance(session.method, BarrierPenalty):
            raise ValueError(
                "SigmoidalBudgetAnnealing needs exactly one BudgetAwareRegularization callback in the Trainer "
                f"(the budget it anneals is BAR's barrier), found the {session.method.name} method"
            )
        session.when_traced(lambda s: s.budget.anneal(self.schedule, self.start_factor, self.interpolation))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        session = require_session(pl_module, "SigmoidalBudgetAnnealing")
        steps_per_epoch = max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))
        session.set_progress(self.progress(trainer.global_step, steps_per_epoch))
