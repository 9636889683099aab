"""Dirichlet pruning (Adamczewski and Park, "Dirichlet Pruning for Neural Network
Compression", AISTATS 2021, arXiv:2011.05985) as a strategy: per-layer Dirichlet importance
switches learned by variational inference, then widths allocated under the budget."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune._checks import check_bool
from lightning_prune.core.allocation import fill_budget, fit_budget
from lightning_prune.core.budget import finite_real
from lightning_prune.core.gates import ChannelGate, DirichletSwitch
from lightning_prune.core.graph import ChannelGroup
from lightning_prune.core.method import Method, PruningSession

__all__ = ["DirichletSwitches"]


class _Switch(DirichletSwitch):
    """A :class:`DirichletSwitch` that can be held at the identity: before and after the switch
    phase, and layer by layer while another group learns.

    With ``saliency=True`` every backward pass through the acting switch adds, per channel,
    ``|dL/dm_k * m_k|`` to ``saliency_sum`` (``m = K * s`` the multiplier, ``dL/dm_k`` summed
    over the batch): the size of the first-order change of the loss if channel k's multiplier
    went to 0, Molchanov et al.'s Taylor criterion (arXiv:1611.06440, eq. 7) taken at the
    switch. ``saliency_passes`` counts the passes. Both are buffers, so checkpoints keep them."""

    saliency_sum: Tensor
    saliency_passes: Tensor

    def __init__(self, *args: Any, saliency: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.identity = True
        if saliency:
            self.register_buffer("saliency_sum", torch.zeros(self.num_channels, dtype=torch.float64))
            self.register_buffer("saliency_passes", torch.zeros((), dtype=torch.float64))

    def forward(self) -> Tensor:
        if self.identity:
            # Exactly 1; theta stays in the graph (with a zero gradient) so that DDP sees
            # every gate parameter used in every step.
            return torch.ones_like(self.theta) + 0.0 * self.theta
        multiplier = super().forward()
        if hasattr(self, "saliency_sum") and self.training and multiplier.requires_grad:
            value = multiplier.detach()
            multiplier.register_hook(lambda grad: self._record(grad, value))
        return multiplier

    @torch.no_grad()
    def _record(self, grad: Tensor, value: Tensor) -> None:
        self.saliency_sum += (grad.detach().double() * value.double()).abs()
        self.saliency_passes += 1


class DirichletSwitches(Method):
    """One Dirichlet switch per channel group, multiplying the group's channels by ``K * s``
    (``K`` channels, ``s`` on the simplex; a uniform switch is the identity). The regulariser
    is ``kl_scale * sum_l KL(Dir(phi_l) || Dir(alpha0))`` over the groups that learn
    (Adamczewski and Park 2021, eq. 4); the keep-masks drop channels greedily, the least
    important per unit of marginal cost first, until the budget is met:

    - ``allocation="share"``: dropping channel i of group l loses ``log(m_l) - log(m_l - E[s_li])``
      (``m_l`` the kept posterior mass of the group), times the number of layers writing the
      group's channels: the greedy maximises ``sum_l n_l log m_l``;
    - ``allocation="score"``: the plain score ``K * E[s]`` per unit of cost;
    - ``allocation="taylor"``: the share rule above on the switches' first-order saliency
      ``t_k``, the mean over the switch phase's backward passes of ``|dL/dm_k * m_k|``, ``m = K *
      E[s]`` (Molchanov, Tyree, Karras, Aila and Kautz, "Pruning Convolutional Neural Networks
      for Resource Efficient Inference", ICLR 2017, arXiv:1611.06440, eq. 7, taken at the
      switch), with each group weighted by its total saliency ``T_l`` instead of ``n_l``: the
      greedy maximises ``sum_l T_l log(kept t_l / T_l)``, so the first channel dropped from a
      group costs about its own saliency (a loss change, comparable across layers, where the
      posterior's shares of one layer say nothing about another) and each further one more,
      as the group thins.

    With ``fill``, channels the greedy dropped are then added back, highest score first (``K *
    E[s]``, or the saliency with ``"taylor"``), while the network stays under the budget (the
    last channels dropped can overshoot it by a whole convolution channel's cost).

    Args:
        alpha0: concentration of the symmetric Dirichlet prior.
        estimator: ``"mean"`` (the posterior mean) or ``"gamma"`` (reparameterised samples).
        init: initial concentration of every switch.
        allocation: ``"share"``, ``"score"`` or ``"taylor"``.
        fill: spend what the greedy left of the budget (above).
        gate_lr: learning rate of the switches' Adam optimizer.
        kl_scale: weight of the KL term (``None`` until the caller sets it, e.g. 1 / N samples).
        residual: ``"tied"`` (default) or ``"mixed"`` residual blocks (see
            :func:`lightning_prune.core.trace.build_graph`); with ``"mixed"`` the allocation
            may remove a residual branch entirely.
    """

    name = "dirichlet"
    ALLOCATIONS = ("share", "score", "taylor")

    def __init__(self, alpha0: float = 0.5, estimator: str = "mean", init: float = 1.0, allocation: str = "share",
                 fill: bool = True, gate_lr: float = 0.1, kl_scale: float | None = None, residual: str = "tied") -> None:
        super().__init__()
        self.residual = self.check_residual(residual)
        self.alpha0 = finite_real("alpha0", alpha0)
        if self.alpha0 <= 0:
            raise ValueError(f"alpha0 must be > 0, got {alpha0}")
        if estimator not in DirichletSwitch.ESTIMATORS:
            raise ValueError(f"estimator must be one of {DirichletSwitch.ESTIMATORS}, got {estimator!r}")
        self.init = finite_real("init", init)
        if self.init <= 0:
            raise ValueError(f"init must be > 0 (the initial Dirichlet concentration), got {init}")
        if allocation not in self.ALLOCATIONS:
            raise ValueError(f"allocation must be one of {self.ALLOCATIONS}, got {allocation!r}")
        self.gate_lr = finite_real("gate_lr", gate_lr)
        if self.gate_lr <= 0:
            raise ValueError(f"gate_lr must be > 0, got {gate_lr}")
        if kl_scale is not None:
            kl_scale = finite_real("kl_weight", kl_scale)
            if kl_scale < 0:
                raise ValueError(f"kl_weight must be >= 0 or None (1 / number of training samples), got {kl_scale}")
        self.estimator = estimator
        self.allocation = allocation
        self.fill = check_bool("fill", fill)
        self.kl_scale = kl_scale
        self.learning_groups: tuple[str, ...] = ()

    def make_gate(self, group: ChannelGroup) -> ChannelGate:
        return _Switch(group.size, alpha0=self.alpha0, estimator=self.estimator, init=self.init, saliency=self.allocation == "taylor")

    def make_optimizer(self, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.gate_lr)

    def learn(self, session: PruningSession, groups: Iterable[str] | None = None) -> None:
        """Let the switches of ``groups`` (all when ``None``) act and learn; every other switch
        is the identity. ``learn(session, ())`` makes every switch the identity."""
        if session.gates is None:
            raise RuntimeError("DirichletSwitches: no switches (not traced yet, or hardened)")
        names = tuple(session.gates) if groups is None else tuple(groups)
        for name in names:
            if name not in session.gates:
                raise ValueError(f"groups: unknown channel group {name!r}; groups: {', '.join(session.gates)}")
        for name, gate in session.gates.items():
            gate.identity = name not in names
        self.learning_groups = names

    def stop(self, session: PruningSession) -> None:
        self.learning_groups = ()

    def regularizer(self, session: PruningSession) -> Tensor | None:
        if not self.learning_groups:
            return None
        kl = torch.stack([session.gates[n].kl_divergence() for n in self.learning_groups]).sum()
        self.last = {"kl": float(kl.detach())}
        if not self.kl_scale:
            return None
        return self.kl_scale * kl

    def scores(self, session: PruningSession) -> dict[str, Tensor]:
        """``{group: K * E[s]}`` per channel: 1 for every channel of a uniform switch."""
        if session.gates is None:
            raise RuntimeError("DirichletSwitches: no switches (not traced yet, or hardened)")
        return {n: (g.posterior_mean() * g.num_channels).detach().cpu() for n, g in session.gates.items()}

    def saliency(self, session: PruningSession) -> dict[str, Tensor]:
        """``{group: mean |dL/dm * m|}`` per channel over the switch phase's backward passes
        (``allocation="taylor"`` only; under DDP, after :meth:`reduce_saliency`)."""
        if self.allocation != "taylor":
            raise RuntimeError(f"DirichletSwitches: the saliency is recorded with allocation='taylor' only, not {self.allocation!r}")
        if session.gates is None:
            raise RuntimeError("DirichletSwitches: no switches (not traced yet, or hardened)")
        unseen = [n for n, g in session.gates.items() if float(g.saliency_passes) == 0]
        if unseen:
            raise RuntimeError(
                "allocation='taylor': no backward pass went through the switches of " + ", ".join(unseen)
                + " (the switch phase had no training step for them)"
            )
        return {n: (g.saliency_sum / g.saliency_passes).cpu() for n, g in session.gates.items()}

    def reduce_saliency(self, session: PruningSession, reduce: Callable[[Tensor], Tensor]) -> None:
        """Replace every switch's saliency sums by ``reduce`` of them (a sum over processes
        under DDP, so that every rank allocates the same widths); call it on every rank once
        the switch phase has ended."""
        if self.allocation != "taylor" or session.gates is None:
            return
        for _, gate in session.gates.items():
            gate.saliency_sum.copy_(reduce(gate.saliency_sum))
            gate.saliency_passes.copy_(reduce(gate.saliency_passes))

    def keep_masks(self, session: PruningSession) -> dict[str, Tensor]:
        model, cost, target = session.cost_model, session.cost, session.budget.target
        weights = None
        if self.allocation == "taylor":
            scores = self.saliency(session)
            floor = 1e-12 * max(float(s.max()) for s in scores.values()) + 1e-300  # a dead channel: dropped first, logs finite
            scores = {n: s + floor for n, s in scores.items()}
            weights = {n: float(s.sum()) for n, s in scores.items()}
        else:
            scores = self.scores(session)
        masks = fit_budget(model, cost, target, scores, relative=self.allocation != "score", weights=weights).masks
        return fill_budget(model, cost, target, scores, masks).masks if self.fill else masks
