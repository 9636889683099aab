"""``BudgetAwareRegularization``: Hard Concrete channel gates learned under a barrier penalty
that keeps the network under a budget (Lemaire, Achkar and Jodoin, "Structured Pruning of
Neural Networks with Budget-Aware Regularization", CVPR 2019, arXiv:1811.09332)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_prune._checks import check_bool
from lightning_prune.callbacks.gated import GatedPruning
from lightning_prune.core.budget import finite_real
from lightning_prune.methods.bar import BarrierPenalty


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
    """Budget-Aware Regularization (Lemaire et al., CVPR 2019) as a Lightning callback: runs
    :class:`~lightning_prune.methods.BarrierPenalty` (Hard Concrete gates, one draw per channel
    per step, learned from the data loss plus ``lambda_ * f(V, a, b) * L_S``; see there) in a
    :class:`~lightning_prune.core.session.PruningSession` on the LightningModule's network.
    The budget ``b`` is the target unless :class:`SigmoidalBudgetAnnealing` anneals it.

    Args (keyword-only):
        budget, factor, cost, latency, module, example_input, ignore, verbose: see
            :class:`~lightning_prune.callbacks.gated.GatedPruning`.
        lambda_: weight of the penalty. The defaults (``lambda_=0.01``, ``margin_of="target"``,
            ``init_log_alpha=0``) are the ones that did best training LeNet-5 / MNIST from
            scratch (the main job). Pruning a *trained* network (with ``distillation=True``),
            ``margin_of="current", lambda_=1.0, init_log_alpha=3.0`` did better: the alive cost
            follows the annealed budget instead of the barrier sitting at its cap, and the
            trained network starts with its gates open (LeNet-5 at 1/16 of its MACs: 99.00%
            mean over 3 seeds against 98.28% over 2 with these defaults, before fill existed;
            benchmarks/RESULTS.md, "BAR in the suite"); these are the benchmark suite's settings.
        margin, margin_of, cap, fill: the band below the budget where the barrier is 0, the
            barrier's largest value, and whether hard pruning spends what the soft phase left
            of the budget; see :class:`~lightning_prune.methods.BarrierPenalty`.
        penalty: ``"cost"`` (the paper: the expected cost over the full cost) or ``"channels"``
            (the expected number of open channels over all channels).
        gate_lr: learning rate of the gates' optimizer.
        gate_optimizer, init_log_alpha: see :class:`~lightning_prune.methods.BarrierPenalty`.
        distillation: learn from a frozen copy of the network taken at fit start: the user's
            loss gradient is blended with ``T^2 KL(teacher || student)`` (``alpha`` of the
            latter), assuming the user's loss is a batch mean.
        distill_fine_tuning: with ``distillation``, keep distilling from the same teacher (the
            full network at fit start) after hard pruning, while the shrunk network fine-tunes
            (the teacher's forward pass then costs one dense forward per step). A run resumed
            after hard pruning rebuilds the teacher from the full network the LightningModule
            is constructed with, before the checkpoint shrinks it.
        temperature, alpha: of the distillation.
        residual: ``"mixed"`` (default): the paper's mixed-connectivity residual blocks
            (supplementary material, Algorithm 1): every residual branch has gates of its own,
            adds only its alive channels into the alive stream channels, and is removed when
            its gates all close (the depth is learned too); ``"tied"``: one gate per channel
            of a residual stream and of every branch adding into it (the "regular" block,
            12-58% more activation volume at the same pruning factor per the supplementary
            material, Sec. 5).
    """

    def __init__(
        self,
        *,
        budget: float | None = None,
        factor: float | None = None,
        cost: str = "volume",
        latency: Any = None,
        lambda_: float = 0.01,
        margin: float = 0.05,
        margin_of: str = "target",
        cap: float = 1e3,
        fill: bool = True,
        penalty: str = "cost",
        gate_lr: float = 0.02,
        gate_optimizer: str = "adam",
        init_log_alpha: float = 0.0,
        distillation: bool = False,
        distill_fine_tuning: bool = False,
        temperature: float = 4.0,
        alpha: float = 0.9,
        residual: str = "mixed",
        module: str | None = None,
        example_input: Any = None,
        ignore: Sequence[str] = (),
        verbose: bool = True,
    ) -> None:
        self._method_args = {"lambda_": lambda_, "margin": margin, "margin_of": margin_of, "cap": cap, "fill": fill, "penalty": penalty, "gate_lr": gate_lr,
                             "gate_optimizer": gate_optimizer, "init_log_alpha": init_log_alpha, "residual": residual}
        super().__init__(budget=budget, factor=factor, cost=cost, latency=latency, module=module, example_input=example_input,
                         ignore=ignore, verbose=verbose)
        check_bool("distillation", distillation)
        check_bool("distill_fine_tuning", distill_fine_tuning)
        if distill_fine_tuning and not distillation:
            raise ValueError("distill_fine_tuning: distilling after hard pruning needs distillation=True")
        self.temperature = finite_real("temperature", temperature)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha = finite_real("alpha", alpha)
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.distillation = distillation
        self.distill_fine_tuning = distill_fine_tuning
        self.teacher: torch.nn.Module | None = None
        self._full_network: torch.nn.Module | None = None  # resuming after hard pruning: the teacher's architecture
        self._teacher_state: dict[str, Tensor] | None = None
        self._trainer: L.Trainer | None = None
        self._distill_handle: Any = None

    def make_method(self) -> BarrierPenalty:
        return BarrierPenalty(**self._method_args)

    # -- distillation from the network as it was at fit start ---------------------------------------
    @property
    def distilling(self) -> bool:
        """True while the network learns from the teacher: the soft phase, and with
        ``distill_fine_tuning`` the fine-tuning after hard pruning too."""
        return self.distillation and self.session is not None and (self.active or (self.distill_fine_tuning and self.session.phase == "hard"))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.distill_fine_tuning and self.teacher is None and self.session is not None:
            # Before a checkpoint loads (and, resumed after hard pruning, shrinks the network):
            # the full architecture a resumed run's teacher is rebuilt in.
            gates = self.session.gates
            with gates.suspended() if gates is not None else contextlib.nullcontext():
                self._full_network = copy.deepcopy(self.session.network)

    def _fit_started(self, trainer: L.Trainer) -> None:
        super()._fit_started(trainer)
        self._trainer = trainer
        full, self._full_network = self._full_network, None
        if not self.distilling:
            return
        if self.teacher is not None:  # fit called again on this callback: the hook comes back
            self._hook_teacher()
            return
        if self.active:
            with self.gates.suspended():
                self.teacher = copy.deepcopy(self.session.network)
        else:  # resumed after hard pruning: the network is shrunk, the full one was kept at setup
            if full is None or self._teacher_state is None:
                raise RuntimeError("distill_fine_tuning: the checkpoint holds no teacher to resume fine-tuning from")
            self.teacher = full.to(next(self.session.network.parameters()).device)
        if self._teacher_state is not None:  # resumed: the teacher of the original run
            self.teacher.load_state_dict(self._teacher_state)
        self.teacher.eval().requires_grad_(False)
        self._hook_teacher()

    def _hook_teacher(self) -> None:
        if self._distill_handle is not None:
            return
        callback = self

        def distill(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            return callback._distill_hook(module, args, output)

        # A plain function, not the bound method: copies of the network (export, deepcopy)
        # keep the function as it is instead of copying this callback and its trainer.
        self._distill_handle = self.session.network.register_forward_hook(distill)

    def _distill_hook(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if not (self.distilling and module.training and torch.is_grad_enabled() and isinstance(output, Tensor)):
            if not self.distilling:  # hard pruning happened (without distill_fine_tuning): the teacher and the hook are done
                self.teacher = None
                if self._distill_handle is not None:
                    self._distill_handle.remove()
                    self._distill_handle = None
            return None
        trainer = self._trainer
        with torch.no_grad():
            teacher = self.teacher(*args)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = (float(scaler.get_scale()) if scaler is not None else 1.0) / trainer.accumulate_grad_batches
        return _DistillGradient.apply(output, teacher.detach(), self.temperature, self.alpha, scale)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the trained network leaves fit without the hook (exports and saves must not carry it)
        if self._distill_handle is not None:
            self._distill_handle.remove()
            self._distill_handle = None

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.teacher is not None and self.distilling:
            state["teacher"] = {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._teacher_state = state_dict.get("teacher")
