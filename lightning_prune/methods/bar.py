"""Budget-Aware Regularization (Lemaire, Achkar and Jodoin, "Structured Pruning of Neural
Networks with Budget-Aware Regularization", CVPR 2019, arXiv:1811.09332) as a strategy:
Hard Concrete gates and the barrier penalty that keeps the network under its budget."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune._checks import check_bool
from lightning_prune.core.allocation import fill_budget, fit_budget
from lightning_prune.core.budget import Budget, finite_real
from lightning_prune.core.gates import ChannelGate, HardConcreteGate
from lightning_prune.core.graph import ChannelGroup
from lightning_prune.core.method import Method, PruningSession

__all__ = ["BarrierPenalty"]


class BarrierPenalty(Method):
    """Hard Concrete gates learned under ``lambda_ * f(V, a, b) * L_S`` (Lemaire et al. 2019, eq. 5-7).

    - ``L_S``: the expected cost under the gates' open probabilities over the full cost
      (``penalty="cost"``), or the expected number of open channels over all channels
      (``penalty="channels"``: every gate is pushed alike and the data loss decides which
      channels close); with ``cost_power=p``, the push on each gate is its marginal cost to the
      power ``p`` instead, scaled so that the push summed over the gates stays that of
      ``"cost"``: below 1 expensive channels are pushed less and cheap ones more (``p = 0``:
      alike), above 1 the other way round;
    - ``V``: the current cost, counting the alive channels (``z_hat > 0``) exactly;
    - ``f``: the barrier with ``b`` the session's current budget (the target, or its annealed
      value) and ``a = (1 - margin) * B`` (``B`` the target; ``margin_of="target"``) or
      ``a = (1 - margin) * b`` (``margin_of="current"``); capped when ``V >= b`` (counted in
      ``capped_steps``).

    Hard pruning keeps the alive channels; if they cost more than the budget, channels are
    dropped until it fits (listed in ``dropped``), by the ``repair`` rule; then, with ``fill``,
    closed channels are opened again, the most open first, while the network stays under the
    budget (listed in ``refilled``), so the budget is spent.

    Args:
        lambda_: weight of the penalty (>= 0).
        margin: the width of the band below the budget where ``f = 0``, in (0, 1).
        margin_of: ``"target"``: ``a = (1 - margin) * B`` for the whole run, so while the budget
            anneals the barrier pushes every step until the network is under the final target;
            ``"current"``: ``a = (1 - margin) * b(t)``, so it pushes only while the network is
            above the annealed budget and the gates close along the schedule.
        penalty: ``"cost"`` or ``"channels"``.
        cost_power: with ``penalty="cost"``, the power ``p`` in [0, 3] of every gate's marginal
            cost in its push (above). Under Adam a gate closes when its push outweighs its data
            gradient, i.e. when its importance per unit of cost is lowest: with ``p = 1`` (the
            paper) the most expensive layers are thinned first, sometimes to a width the
            network cannot afford (LeNet-5's conv2, ResNet-20's first stage under a MAC budget).
        gate_lr: learning rate of the gates' optimizer.
        init_log_alpha: the gates start at ``log_alpha ~ U(init_log_alpha, init_log_alpha + 0.01)``:
            0 (the default, Lemaire et al.) opens a gate with probability 0.83, so from a
            trained network every step drops about a sixth of the channels at random; a larger
            value starts from (almost) the trained network.
        gate_optimizer: ``"adam"`` (default) or ``"sgd"`` (with momentum 0.9). Adam scales every
            gate's step alike, so every gate whose penalty outweighs its data gradient closes at
            the same speed, however little it saves; plain SGD keeps the gradients' ratio, i.e.
            the trade of loss against cost of the barrier's Lagrangian.
        cap: the largest barrier value.
        fill: at hard pruning, spend what the soft phase left of the budget on the most open of
            the closed channels (the gates overshoot the band below the budget, and a barrier
            that stops at ``(1 - margin) * b`` leaves up to ``margin`` unspent by design).
        residual: ``"mixed"`` (default): the mixed-connectivity residual blocks of Lemaire et
            al. (supplementary material, Algorithm 1): each residual branch is gated on its own
            and a branch whose gates all close is removed (learned depth); ``"tied"``: a
            residual stream and its branches share one gate per channel.
        repair: how hard pruning drops alive channels when they cost more than the budget.
            ``"least_open"`` (default): the least open first, wherever they are and whatever they
            save (what the soft phase would have closed next; dividing by the cost instead
            would drop the most expensive channels first, since every alive gate is nearly
            fully open); a layer whose gates are all a little less open than the others' can
            lose all but one channel. ``"share"``: the share rule of
            :func:`~lightning_prune.core.allocation.fit_budget` (``relative=True``) on the open
            probabilities: the channel whose loss of its layer's open-probability share costs
            least per unit of cost saved, so a layer gets harder to thin the more it has lost.
    """

    name = "bar"
    PENALTIES = ("cost", "channels")

    GATE_OPTIMIZERS = ("adam", "sgd")
    REPAIRS = ("least_open", "share")

    def __init__(self, lambda_: float = 0.01, margin: float = 0.05, penalty: str = "cost", gate_lr: float = 0.02, cap: float = 1e3,
                 residual: str = "mixed", gate_optimizer: str = "adam", init_log_alpha: float = 0.0,
                 margin_of: str = "target", fill: bool = True, cost_power: float = 1.0, repair: str = "least_open") -> None:
        super().__init__()
        self.residual = self.check_residual(residual)
        self.lambda_ = finite_real("lambda_", lambda_)
        if self.lambda_ < 0:
            raise ValueError(f"lambda_ must be >= 0, got {lambda_}")
        self.margin = finite_real("margin", margin)
        if not 0 < self.margin < 1:
            raise ValueError(f"margin must be in (0, 1), got {margin}")
        if margin_of not in Budget.MARGINS_OF:
            raise ValueError(f"margin_of must be one of {Budget.MARGINS_OF}, got {margin_of!r}")
        self.margin_of = margin_of
        if penalty not in self.PENALTIES:
            raise ValueError(f"penalty must be 'cost' or 'channels', got {penalty!r}")
        self.penalty = penalty
        self.cost_power = finite_real("cost_power", cost_power)
        if not 0 <= self.cost_power <= 3:
            raise ValueError(f"cost_power must be in [0, 3], got {cost_power}")
        if penalty == "channels" and self.cost_power != 1:
            raise ValueError("cost_power: only penalty='cost' weighs the gates by their cost")
        self.gate_lr = finite_real("gate_lr", gate_lr)
        if self.gate_lr <= 0:
            raise ValueError(f"gate_lr must be > 0, got {gate_lr}")
        if gate_optimizer not in self.GATE_OPTIMIZERS:
            raise ValueError(f"gate_optimizer must be one of {self.GATE_OPTIMIZERS}, got {gate_optimizer!r}")
        self.gate_optimizer = gate_optimizer
        self.init_log_alpha = finite_real("init_log_alpha", init_log_alpha)
        self.cap = finite_real("cap", cap)
        if self.cap <= 0:
            raise ValueError(f"cap must be > 0, got {cap}")
        check_bool("fill", fill)
        self.fill = fill
        if repair not in self.REPAIRS:
            raise ValueError(f"repair must be one of {self.REPAIRS}, got {repair!r}")
        self.repair = repair
        self.capped_steps = 0
        self.dropped: dict[str, list[int]] = {}
        self.refilled: dict[str, list[int]] = {}

    def make_gate(self, group: ChannelGroup) -> ChannelGate:
        return HardConcreteGate(group.size, init_log_alpha=(self.init_log_alpha, self.init_log_alpha + 0.01))

    def make_optimizer(self, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
        if self.gate_optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.gate_lr, momentum=0.9)
        return torch.optim.Adam(params, lr=self.gate_lr)

    def regularizer(self, session: PruningSession) -> Tensor | None:
        probs = session.gates.open_probabilities()
        expected = session.cost_model.expected(probs, session.cost)
        v = float(session.current_cost())
        budget = session.budget
        f = budget.barrier(v, session.progress, self.margin, self.cap, self.margin_of)
        if f.capped:
            self.capped_steps += 1
        if self.penalty == "channels":
            l_s = sum(p.sum() for p in probs.values()) / session.graph.num_channels
        elif self.cost_power == 1.0:
            l_s = expected / budget.full
        else:
            l_s = self._powered_cost(session, probs) / budget.full
        self.last = {
            "b": budget.current(session.progress), "V": v, "expected_V": float(expected.detach()), "f": f.value,
            "L_S": float(l_s.detach()), "cost_vs_budget": v / budget.target, "capped_steps": float(self.capped_steps),
        }
        if f.value == 0.0 or self.lambda_ == 0.0:
            return None
        return (self.lambda_ * f.value) * l_s.float()

    def _powered_cost(self, session: PruningSession, probs: dict[str, Tensor]) -> Tensor:
        """A surrogate of the expected cost whose derivative w.r.t. each open probability is the
        channel's marginal cost to the power ``cost_power``, times the one factor that keeps the
        derivatives' sum that of the expected cost."""
        marginal = session.cost_model.channel_weights(session.cost, probs)
        powered = {n: m.clamp_min(0) ** self.cost_power for n, m in marginal.items()}
        total = sum(float(m.clamp_min(0).sum()) for m in marginal.values())
        scale = total / max(sum(float(m.sum()) for m in powered.values()), 1e-30)
        return sum((probs[n].double() * (powered[n] * scale).to(probs[n].device)).sum() for n in probs)

    def scores(self, session: PruningSession) -> dict[str, Tensor]:
        return {n: p.detach().cpu() for n, p in session.gates.open_probabilities().items()}

    def keep_masks(self, session: PruningSession) -> dict[str, Tensor]:
        alive = session.current_masks()
        model, cost, target, scores = session.cost_model, session.cost, session.budget.target, self.scores(session)
        if self.repair == "share":  # shares need positive scores: a fully closed gate's probability may underflow to 0
            result = fit_budget(model, cost, target, {n: s.double().clamp_min(1e-12) for n, s in scores.items()}, alive, relative=True)
        else:
            result = fit_budget(model, cost, target, scores, alive, per_cost=False)
        self.dropped = result.dropped
        if self.fill:
            result = fill_budget(model, cost, target, scores, result.masks)
            self.refilled = result.dropped
        return result.masks

    def state_dict(self) -> dict[str, Any]:
        return {"capped_steps": self.capped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capped_steps = int(state.get("capped_steps", 0))
