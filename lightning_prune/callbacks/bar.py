"""``BudgetAwareRegularization``: Hard Concrete channel gates learned under a barrier penalty
that keeps the network under a budget (papers/001 and METHODS §1-2)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_prune._checks import check_bool
from lightning_prune.allocation import fit_budget
from lightning_prune.budget import barrier, finite_real
from lightning_prune.callbacks.gated import GatedPruning
from lightning_prune.gates import ChannelGate, HardConcreteGate
from lightning_prune.graph import ChannelGroup


class _DistillGradient(torch.autograd.Function):
    """Identity on the student's logits whose backward turns the user's loss gradient ``g``
    into ``(1 - alpha) * g + alpha * scale * d(T^2 KL(p_teacher || p_student)) / d logits``
    (KL averaged over the batch). ``scale`` is what the user's loss gradient is multiplied by
    outside the loss (AMP loss scale / gradient accumulation), so both terms stay in ratio."""

    @staticmethod
    def forward(ctx, logits: Tensor, teacher: Tensor, temperature: float, alpha: float, scale: float) -> Tensor:
        ctx.save_for_backward(logits, teacher)
        ctx.temperature, ctx.alpha, ctx.scale = temperature, alpha, scale
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        logits, teacher = ctx.saved_tensors
        t = ctx.temperature
        p_student = F.softmax(logits.float() / t, dim=-1)
        p_teacher = F.softmax(teacher.float() / t, dim=-1)
        kd = (p_student - p_teacher) * (t / logits.shape[0])  # d(T^2 * batchmean KL)/d logits
        out = (1.0 - ctx.alpha) * grad.float() + ctx.alpha * ctx.scale * kd
        return out.to(grad.dtype), None, None, None, None


class BudgetAwareRegularization(GatedPruning):
    """Budget-Aware Regularization (Lemaire et al., CVPR 2019) as a Lightning callback.

    Attaches a :class:`~lightning_prune.gates.HardConcreteGate` to every prunable channel
    group of the network. During training the gates are sampled (one draw per channel per
    step) and learn from the data loss plus ``lambda_ * f(V, a, b) * L_S``:

    - ``L_S``: the expected cost under the gates' open-probabilities, divided by the full cost
      (so ``lambda_`` does not depend on the units of the cost);
    - ``V``: the current cost, counting the alive channels (``z_hat > 0``) exactly;
    - ``f``: the barrier of METHODS §2 with margin ``a = (1 - margin) * B`` below the target
      ``B`` and the current budget ``b`` (``B`` unless :class:`SigmoidalBudgetAnnealing`
      moves it); when ``V >= b`` the barrier is capped, counted and logged.

    Args:
        budget, factor, cost, gate_lr, module, example_input, ignore, verbose: see
            :class:`~lightning_prune.callbacks.gated.GatedPruning`.
        lambda_: weight of the penalty. With Adam on the gates, a penalty much larger than the
            data loss's gradient moves every gate down at the same speed and closes them all at
            once; 0.01 keeps the two comparable (on LeNet-5 / MNIST the alive cost then follows
            the annealed budget, see benchmarks/RESULTS.md).
        margin: ``a = (1 - margin) * B``; in (0, 1).
        distillation: learn from a frozen copy of the network taken at fit start:
            the user's loss gradient is blended with ``T^2 KL(teacher || student)``
            (``alpha`` of the latter), assuming the user's loss is a batch mean.
        temperature, alpha: of the distillation.
        penalty: what ``L_S`` measures: ``"cost"`` (the paper: the expected cost over the full
            cost) or ``"channels"`` (the expected number of open channels over all channels).
            The barrier ``f`` and the budget always use the cost. With ``"channels"`` every
            gate is pushed alike and the data loss decides which channels close, instead of
            the most expensive ones closing first (see benchmarks/RESULTS.md, LeNet-5 MACs).
    """

    def __init__(
        self,
        budget: float | None = None,
        factor: float | None = None,
        cost: str = "volume",
        lambda_: float = 0.01,
        margin: float = 0.05,
        distillation: bool = False,
        temperature: float = 4.0,
        alpha: float = 0.9,
        penalty: str = "cost",
        gate_lr: float = 0.02,
        module: str | None = None,
        example_input: Any = None,
        ignore: Sequence[str] = (),
        verbose: bool = True,
    ) -> None:
        super().__init__(budget, factor, cost, gate_lr, module, example_input, ignore, verbose)
        self.lambda_ = finite_real("lambda_", lambda_)
        if self.lambda_ < 0:
            raise ValueError(f"lambda_ must be >= 0, got {lambda_}")
        self.margin = finite_real("margin", margin)
        if not 0 < self.margin < 1:
            raise ValueError(f"margin must be in (0, 1), got {margin}")
        check_bool("distillation", distillation)
        self.temperature = finite_real("temperature", temperature)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha = finite_real("alpha", alpha)
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.distillation = distillation
        if penalty not in ("cost", "channels"):
            raise ValueError(f"penalty must be 'cost' or 'channels', got {penalty!r}")
        self.penalty = penalty
        self.current_budget: float = 0.0  # b; set in setup, moved by SigmoidalBudgetAnnealing
        self.capped_steps = 0
        self.teacher: torch.nn.Module | None = None
        self._teacher_state: dict[str, Tensor] | None = None
        self._hooks: list[Any] = []
        self.last: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(budget=self.budget, cost=self.cost, module=self.module, method="bar")

    def make_gate(self, group: ChannelGroup) -> ChannelGate:
        return HardConcreteGate(group.size)

    # -- setup ---------------------------------------------------------------------------------
    def _prepared(self) -> None:
        if not self.current_budget:
            self.current_budget = self.target_cost

    def _fit_started(self, trainer: L.Trainer) -> None:
        super()._fit_started(trainer)
        self._trainer = trainer
        if self.distillation and self.active and self.teacher is None:
            with self.gates.suspended():
                self.teacher = copy.deepcopy(self.network)
            if self._teacher_state is not None:  # resumed: the teacher of the original run
                self.teacher.load_state_dict(self._teacher_state)
            self.teacher.eval().requires_grad_(False)
            self._hooks.append(self.network.register_forward_hook(self._distill_hook))

    def _distill_hook(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if not (self.active and module.training and torch.is_grad_enabled() and isinstance(output, Tensor)):
            return None
        trainer = self._trainer
        with torch.no_grad():
            teacher = self.teacher(*args)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = (float(scaler.get_scale()) if scaler is not None else 1.0) / trainer.accumulate_grad_batches
        return _DistillGradient.apply(output, teacher.detach(), self.temperature, self.alpha, scale)

    # -- the penalty -----------------------------------------------------------------------------
    def regularizer(self) -> Tensor | None:
        probs = self.gates.open_probabilities()
        expected = self.cost_model.expected(probs, self.cost)
        alive = {n: m.detach().cpu() for n, m in self.gates.alive().items()}
        v = float(self.cost_model.exact(alive, self.cost))
        b = max(self.current_budget, self.target_cost)
        a = (1.0 - self.margin) * self.target_cost
        f = barrier(v, a, b)
        if f.capped:
            self.capped_steps += 1
        if self.penalty == "channels":
            l_s = sum(p.sum() for p in probs.values()) / self.graph.num_channels
        else:
            l_s = expected / self.full_cost
        self.last = {
            "b": b, "V": v, "expected_V": float(expected.detach()), "f": f.value, "L_S": float(l_s.detach()),
            "cost_vs_budget": v / self.target_cost, "capped_steps": float(self.capped_steps),
        }
        if f.value == 0.0 or self.lambda_ == 0.0:
            return None
        return (self.lambda_ * f.value) * l_s.float()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.active or not self.last:
            return
        for key, value in self.last.items():
            pl_module.log(f"bar/{key}", value, prog_bar=key == "cost_vs_budget", on_step=True, on_epoch=False, batch_size=1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.gates is None:
            return
        for name, mask in self.gates.alive().items():
            pl_module.log(f"bar_alive/{name}", float(mask.sum()), on_step=False, on_epoch=True, batch_size=1)

    # -- hard pruning -----------------------------------------------------------------------------
    def keep_masks(self, widths: Mapping[str, int] | None = None) -> dict[str, Tensor]:
        """Alive channels (``z_hat > 0``); if they cost more than the budget, the channels with
        the lowest open-probability per unit of cost are dropped until it fits (logged).
        ``widths`` instead keeps that many channels per group, by open-probability."""
        probs = {n: p.detach().cpu() for n, p in self.gates.open_probabilities().items()}
        if widths is not None:
            return self.masks_for_widths(probs, widths)
        alive = {n: m.detach().cpu() for n, m in self.gates.alive().items()}
        result = fit_budget(self.cost_model, self.cost, self.target_cost, probs, alive)
        if result.dropped and self.verbose:
            rank_zero_warn(
                f"BudgetAwareRegularization: the alive channels cost {self.cost_model.exact(alive, self.cost):,} > "
                f"budget {self.target_cost:,.0f}; dropped the least open per unit of cost: "
                + ", ".join(f"{n}: {len(d)}" for n, d in result.dropped.items())
            )
        return result.masks

    def harden(self, trainer: L.Trainer, pl_module: L.LightningModule, masks: Mapping[str, Tensor], shrink_network: bool) -> None:
        super().harden(trainer, pl_module, masks, shrink_network)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.teacher = None

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(current_budget=self.current_budget, capped_steps=self.capped_steps)
        if self.teacher is not None:
            state["teacher"] = {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.current_budget = state_dict.get("current_budget", self.current_budget)
        self.capped_steps = state_dict.get("capped_steps", 0)
        self._teacher_state = state_dict.get("teacher")
