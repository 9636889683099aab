"""Knowledge distillation from the network as it was when pruning started, for every
channel-selection callback (:class:`~lightning_prune.callbacks.gated.GatedPruning`).

The teacher is a frozen copy of the user's network taken at fit start (without gates); a
forward hook on the network blends the gradient of the user's loss with that of
``T^2 KL(p_teacher || p_student)`` on the logits, so the user's ``training_step`` stays as it
is. BAR's paper distils from the unpruned network in its soft phase (Lemaire, Achkar and
Jodoin, CVPR 2019, arXiv:1811.09332, Sec. 3, the loss ``L_D``; Hinton, Vinyals and Dean,
"Distilling the Knowledge in a Neural Network", arXiv:1503.02531); distilling through the
fine-tuning of the shrunk network as well is this package's option.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune._checks import check_bool
from lightning_prune.core.budget import finite_real
from lightning_prune.core.session import PruningSession


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


class TeacherDistillation:
    """The teacher of one pruning callback and the hook that distils from it.

    Args:
        soft_phase: distil while the channels are being chosen (the session's soft phase).
        fine_tuning: distil after hard pruning, while the shrunk network fine-tunes (one dense
            forward pass of the teacher per step). A run resumed after hard pruning rebuilds the
            teacher in the full network the LightningModule is constructed with, kept at
            ``setup`` before the checkpoint shrinks it.
        temperature, alpha: of the distillation (``alpha`` of the gradient is the KL term's).
    """

    def __init__(self, *, soft_phase: bool, fine_tuning: bool, temperature: float, alpha: float) -> None:
        check_bool("distillation", soft_phase)
        check_bool("distill_fine_tuning", fine_tuning)
        self.temperature = finite_real("temperature", temperature)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha = finite_real("alpha", alpha)
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.soft_phase, self.fine_tuning = soft_phase, fine_tuning
        self.teacher: nn.Module | None = None
        self._full_network: nn.Module | None = None  # resuming after hard pruning: the teacher's architecture
        self._teacher_state: dict[str, Tensor] | None = None
        self._trainer: L.Trainer | None = None
        self._session: PruningSession | None = None
        self._handle: Any = None

    def active(self, session: PruningSession | None) -> bool:
        """True while the network learns from the teacher in ``session``'s phase."""
        if session is None:
            return False
        return (self.soft_phase and session.active) or (self.fine_tuning and session.phase == "hard")

    def _needed_later(self, session: PruningSession) -> bool:
        return self.fine_tuning and session.phase != "hard"

    def keep_full_network(self, session: PruningSession) -> None:
        """At ``setup``, before a checkpoint loads (and, resumed after hard pruning, shrinks the
        network): a copy of the full network, the architecture a resumed run's teacher is rebuilt in."""
        if not self.fine_tuning or self.teacher is not None:
            return
        self._full_network = session.bare_copy()

    def start(self, trainer: L.Trainer, session: PruningSession) -> None:
        """At fit start: take (or restore) the teacher and hook it on the network."""
        self._trainer, self._session = trainer, session
        full, self._full_network = self._full_network, None
        if not (self.active(session) or self._needed_later(session)):
            return
        if self.teacher is None:
            if session.phase != "hard":
                self.teacher = session.bare_copy()
            else:  # resumed after hard pruning: the network is shrunk, the full one was kept at setup
                if full is None or self._teacher_state is None:
                    raise RuntimeError("distill_fine_tuning: the checkpoint holds no teacher to resume fine-tuning from")
                self.teacher = full.to(next(session.network.parameters()).device)
            if self._teacher_state is not None:  # resumed: the teacher of the original run
                self.teacher.load_state_dict(self._teacher_state)
                self._teacher_state = None
            self.teacher.eval().requires_grad_(False)
        self._hook()

    def _hook(self) -> None:
        if self._handle is not None:
            return
        distillation = self

        def distill(module: nn.Module, args: tuple, output: Any) -> Any:
            return distillation._distill(module, args, output)

        # A plain function, not the bound method: copies of the network (export, deepcopy)
        # keep the function as it is instead of copying the callback and its trainer.
        self._handle = self._session.network.register_forward_hook(distill)

    def _distill(self, module: nn.Module, args: tuple, output: Any) -> Any:
        session = self._session
        if not self.active(session):
            if not self._needed_later(session):  # the phases that distil are over: the teacher and the hook are done
                self.teacher = None
                self.stop()
            return None
        if not (module.training and torch.is_grad_enabled() and isinstance(output, Tensor)):
            return None
        trainer = self._trainer
        with torch.no_grad():
            teacher = self.teacher(*args)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = (float(scaler.get_scale()) if scaler is not None else 1.0) / trainer.accumulate_grad_batches
        return _DistillGradient.apply(output, teacher.detach(), self.temperature, self.alpha, scale)

    def stop(self) -> None:
        """Remove the hook (at fit end: exports and saves of the network must not carry it)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.teacher is None else {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor] | None) -> None:
        self._teacher_state = state or None
