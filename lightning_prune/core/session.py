"""``PruningSession``: one network pruned under one budget by one method, in plain PyTorch.

The session owns the network, its channel graph and cost model, the :class:`~lightning_prune.core.budget.Budget`,
the gates and their optimizer, and the phase::

    pending  -- no example input yet (``trace`` builds the graph from one)
    soft     -- gates attached, learning (or fixed all-ones masks for random pruning)
    hard     -- keep-masks fixed: the network is shrunk (or masked with fixed gates)

A method is a strategy object (:class:`~lightning_prune.core.method.Method`, see :mod:`lightning_prune.methods`) handed to the session:
how its gates are made and optimised, the term it adds to their gradient (its regulariser),
and how keep-masks are chosen under the budget. The Lightning callbacks
(:mod:`lightning_prune.callbacks`) are thin adapters that call the session from Lightning's
hooks; a training loop of your own calls the same methods::

    session = PruningSession(net, BarrierPenalty(), factor=4, cost="macs")
    session.trace(example_batch[:1])
    for x, y in loader:                      # the soft phase
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        session.gate_step()                  # the gates: data gradient + regulariser, one Adam step
        opt.step(); opt.zero_grad()
    session.harden(session.keep_masks(), optimizers=[opt])   # shrunk, under the budget
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune._checks import check_int
from lightning_prune.core.allocation import minimum_cost, round_widths, top_k_masks
from lightning_prune.core.budget import Budget, resolve_budget
from lightning_prune.core.cost import CostModel, CostReport, count_cost
from lightning_prune.core.cost.latency import LATENCY, LatencyTable, check_latency_option
from lightning_prune.core.cost.latency_measure import measure_latency
from lightning_prune.core.cost.model import check_budget_cost
from lightning_prune.core.cost.measure import output_widths
from lightning_prune.core.export import export, record_budget, record_hardened
from lightning_prune.core.folding import shrink_as_masked
from lightning_prune.core.gates import FixedMask
from lightning_prune.core.gating import GateSet, attach_gates, masks_in_state_dict
from lightning_prune.core.graph import RESIDUAL_MODES, ChannelGraph, zero_inputs
from lightning_prune.core.method import Method
from lightning_prune.core.surgery import HISTORY_KEY, pruning_history, replayed_graph
from lightning_prune.core.trace import build_graph

__all__ = ["PruningSession", "Measured", "session_of", "generator_states", "restore_generators"]

GATES_ATTR = "prune_gates"
_SESSIONS: weakref.WeakKeyDictionary[nn.Module, PruningSession] = weakref.WeakKeyDictionary()


def session_of(module: nn.Module) -> PruningSession | None:
    """The :class:`PruningSession` registered for ``module`` (a LightningModule or a network), if any."""
    return _SESSIONS.get(module)


@dataclass(frozen=True)
class Measured:
    cost: CostReport
    widths: dict[str, int]  # output channels of every convolution / linear layer


def generator_states(device: torch.device | None = None) -> dict[str, Any]:
    """The states of the random generators that the gates draw from: torch's CPU generator
    (data order, gates on the CPU) and, for gates on an accelerator, that device's generator."""
    states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        states["cuda"] = (index, torch.cuda.get_rng_state(device))
    elif device is not None and device.type == "mps":
        states["mps"] = torch.mps.get_rng_state()
    return states


def restore_generators(states: dict[str, Any] | Tensor) -> None:
    """Set the generators saved by :func:`generator_states` (a bare tensor: the CPU state of
    checkpoints written before accelerator generators were saved)."""
    if isinstance(states, Tensor):
        torch.set_rng_state(states)
        return
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        index, state = states["cuda"]
        torch.cuda.set_rng_state(state, device=index)
    if "mps" in states:
        torch.mps.set_rng_state(states["mps"])


class PruningSession:
    """Prune ``network`` under a budget with ``method``.

    Args:
        network: the network to prune (not changed until :meth:`trace` attaches the gates).
        method: a :class:`~lightning_prune.core.method.Method` (how gates are made, the
            regulariser, how keep-masks are chosen).
        budget: fraction of the full cost to keep, in (0, 1]; or
        factor: the papers' pruning factor ``1 / budget`` (give exactly one of the two).
        cost: ``"volume"`` (activation volume), ``"macs"``, ``"params"`` or ``"latency"``
            (nanoseconds per forward pass of the network's inference form at a batch size, on
            this device; see :mod:`lightning_prune.core.cost.latency`).
        latency: with ``cost="latency"``: a :class:`~lightning_prune.core.cost.latency.LatencyTable`
            measured for this network, or the keyword arguments of
            :func:`~lightning_prune.core.cost.latency.measure_latency` (at least ``batch_size``),
            with which :meth:`trace` measures it (or finds it in the cache).
        ignore: module names never to prune (output heads are never pruned anyway).
        owner: module to register the gates under (the LightningModule, so that checkpoints,
            optimizers and DDP see them); default: none (the session holds them).
        register: also register the session for ``owner`` (or ``network``) so that
            :func:`session_of` finds it (how the callbacks find each other's session).
        residual: ``"tied"`` or ``"mixed"`` residual blocks (see
            :func:`~lightning_prune.core.trace.build_graph`); default: the method's ``residual``.
    """

    def __init__(
        self,
        network: nn.Module,
        method: Method,
        *,
        budget: float | None = None,
        factor: float | None = None,
        cost: str = "volume",
        ignore: Sequence[str] = (),
        owner: nn.Module | None = None,
        register: bool = True,
        residual: str | None = None,
        latency: LatencyTable | Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be an nn.Module, got {type(network).__name__}")
        if not isinstance(method, Method):
            raise TypeError(f"method must be a lightning_prune.core.method.Method, got {type(method).__name__}")
        check_budget_cost(cost)
        self.latency = check_latency_option(cost, latency)
        if isinstance(ignore, str) or not all(isinstance(n, str) for n in ignore):
            raise TypeError("ignore must be a sequence of module names")
        if owner is not None and not isinstance(owner, nn.Module):
            raise TypeError(f"owner must be an nn.Module or None, got {type(owner).__name__}")
        self.network = network
        self.method = method
        self.fraction = resolve_budget(budget=budget, factor=factor)
        self.cost = cost
        self.ignore = tuple(ignore)
        self.residual = residual if residual is not None else getattr(method, "residual", "tied")
        if self.residual not in RESIDUAL_MODES:
            raise ValueError(f"residual must be one of {', '.join(map(repr, RESIDUAL_MODES))}, got {self.residual!r}")
        self.owner = owner
        self.graph: ChannelGraph | None = None
        self.cost_model: CostModel | None = None
        self.budget: Budget | None = None
        self.gates: GateSet | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.phase = "pending"
        self.progress = 0.0  # of the budget schedule, in [0, 1] (set_progress)
        self.skipped_steps = 0
        self.pruned_at: int | None = None  # the step / epoch number the caller hardened at
        self.hard_pruning_epoch: int | None = None  # when the caller plans to harden (read by methods' adapters)
        self._when_traced: list[Callable[[PruningSession], None]] = []
        if register:
            key = owner if owner is not None else network
            if _SESSIONS.get(key) is not None:
                raise ValueError(
                    f"{type(key).__name__} already has a pruning session: one pruning method per network "
                    "(BudgetAwareRegularization, DirichletImportance or RandomPruning)"
                )
            _SESSIONS[key] = self

    # -- phases ----------------------------------------------------------------------------------
    @property
    def traced(self) -> bool:
        return self.graph is not None

    @property
    def active(self) -> bool:
        """True in the soft phase (gates attached, not yet hardened)."""
        return self.phase == "soft"

    def trace(self, example_input: Tensor | tuple[Tensor, ...]) -> None:
        """Build the channel graph from ``example_input``, check the budget, attach the gates."""
        if self.traced:
            raise RuntimeError("the session is traced already")
        self.graph = build_graph(self.network, example_input, ignore=self.ignore, residual=self.residual)
        if self.cost == LATENCY:
            if not isinstance(self.latency, LatencyTable):
                self.latency = measure_latency(self.network, self.graph, **self.latency)
            self.latency.check_network(self.network)
        self.cost_model = self._cost_model()
        self.budget = Budget.of(self.fraction, self.cost, self.cost_model.full(self.cost), minimum_cost(self.cost_model, self.cost))
        record_budget(self.network, self.cost, self.budget.target, self.budget.full, self.graph.example_input())
        self._attach(self.method.make_gate)
        self.optimizer = self.method.make_optimizer([p for p in self.gates.parameters()])
        self.phase = "soft"
        self.method.start(self)
        for check in self._when_traced:
            check(self)

    def when_traced(self, check: Callable[[PruningSession], None]) -> None:
        """Run ``check(session)`` once the graph and the budget are known (now, if they are)."""
        self._when_traced.append(check)
        if self.traced:
            check(self)

    def _cost_model(self) -> CostModel:
        return CostModel(self.graph, latency=self.latency if isinstance(self.latency, LatencyTable) else None)

    def _attach(self, gates: Any) -> None:
        self.gates = attach_gates(self.network, self.graph, gates, owner=self.owner, name=GATES_ATTR)

    def set_progress(self, t: float) -> None:
        """Progress through the budget schedule, in [0, 1]."""
        self.progress = min(1.0, max(0.0, float(t)))

    # -- the soft phase ------------------------------------------------------------------------
    def gate_step(self, grad_scale: float = 1.0) -> bool:
        """One step of the gates after the data loss's backward pass: divide their gradients
        by ``grad_scale`` (a GradScaler's scale), skip the step if they are not finite (as the
        GradScaler skips the user's), add the gradient of the method's regulariser, step the
        gate optimizer. Returns whether it stepped."""
        if not self.active or self.optimizer is None:
            return False
        params = [p for p in self.gates.parameters() if p.requires_grad]
        if grad_scale != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(1.0 / grad_scale)
        if any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in params):
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            return False
        term = self.method.regularizer(self)
        if term is not None and term.requires_grad:
            grads = torch.autograd.grad(term, params, allow_unused=True)
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g.to(p.dtype) if p.grad is None else p.grad.add_(g.to(p.dtype))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    # -- keep-masks and hard pruning -------------------------------------------------------------
    def check_widths(self, widths: Mapping[str, int] | Sequence[int], *, round_to: int | None = None) -> dict[str, int]:
        """``widths`` (a ``{group: channels}`` mapping, or a list in group order) checked against
        the channel groups and the budget (and, with ``round_to``, each a multiple of it or the
        group's full width); returned as a mapping."""
        if round_to is not None:
            check_int("round_to", round_to, 1)
        names = self.graph.names
        if not isinstance(widths, Mapping):
            widths = list(widths)
            if len(widths) != len(names):
                raise ValueError(f"widths: {len(widths)} numbers for {len(names)} channel groups ({', '.join(names)})")
            widths = dict(zip(names, widths))
        groups = self.graph.groups
        for name, width in widths.items():
            if name not in groups:
                raise ValueError(f"widths: unknown channel group {name!r}; the groups are {', '.join(groups)}")
            if isinstance(width, bool) or not isinstance(width, int):
                raise TypeError(f"widths[{name!r}] must be an int, got {type(width).__name__}")
            low = 0 if groups[name].is_branch else 1  # a mixed residual branch may be removed
            if not low <= width <= groups[name].size:
                raise ValueError(f"widths[{name!r}] must be in {low}..{groups[name].size} (the group's channels), got {width}")
            if round_to is not None and width % round_to and width != groups[name].size:
                raise ValueError(
                    f"widths[{name!r}] must be a multiple of round_to={round_to} or the group's full width "
                    f"{groups[name].size}, got {width}"
                )
        masks = {**self.graph.full_masks(), **{n: torch.arange(groups[n].size) < w for n, w in widths.items()}}
        cost = self.cost_model.exact(masks, self.cost)
        if cost > self.budget.target:
            raise ValueError(
                f"widths: they keep {self.cost} {cost:,}, over the budget {self.budget.target:,.0f} "
                f"({self.fraction:.4g} of {self.budget.full:,.0f}); narrow them or raise the budget"
            )
        return dict(widths)

    def keep_masks(
        self, widths: Mapping[str, int] | Sequence[int] | None = None, *, round_to: int | None = None
    ) -> dict[str, Tensor]:
        """Keep-masks at or under the budget, chosen by the method; or ``widths`` channels per
        group, the method's highest-scoring ones.

        ``round_to``: every group keeps a multiple of ``round_to`` channels (or its full
        width; a residual branch of a mixed-connectivity block may keep none), starting from
        the method's choice, rounded by the method's scores and repaired to stay under the
        budget (:func:`~lightning_prune.core.allocation.round_widths`; a ``ValueError`` if the
        budget cannot be met so). With ``widths``, each must be such a multiple already; a
        branch then keeps only channels whose stream channel is kept.
        """
        if round_to is not None:
            check_int("round_to", round_to, 1)
        if not self.active:
            raise RuntimeError(f"keep_masks: the session is {self.phase}, not in the soft phase")
        if widths is not None:
            widths = self.check_widths(widths, round_to=round_to)
            scores = self.method.scores(self)
            masks = {**self.graph.full_masks(), **top_k_masks(scores, widths, self.graph.branch_names)}
            if round_to is not None:  # the widths are multiples: this only picks branch channels that are computed
                masks = round_widths(self.cost_model, self.cost, math.inf, scores, masks, round_to).masks
        else:
            masks = self.method.keep_masks(self)
            if round_to is not None:
                scores = self.method.scores(self)
                masks = round_widths(self.cost_model, self.cost, self.budget.target, scores, masks, round_to).masks
        self.budget.check(self.cost_model.exact(masks, self.cost), "internal: the keep-masks")
        return masks

    def harden(self, masks: Mapping[str, Tensor], *, shrink: bool = True, optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
        """Fix the keep-masks: detach the gates, then remove the dropped channels (slicing the
        ``optimizers``' state; a removed channel's constant contribution is folded into the next
        layer, or the pruning is refused) or mask them with fixed gates (``shrink=False``)."""
        if not self.active:
            raise RuntimeError(f"harden: the session is {self.phase}, not in the soft phase")
        masks = self.graph.check_masks(dict(masks))
        record_hardened(self.network, self.cost_model.exact(masks, self.cost))
        self.method.stop(self)
        self.gates.detach()
        self.gates = None
        self.optimizer = None
        self.phase = "hard"
        if shrink:
            self.graph = shrink_as_masked(self.network, masks, graph=self.graph, optimizer=list(optimizers))
            self.cost_model = self._cost_model()
        else:
            self._attach({n: FixedMask(m) for n, m in masks.items()})

    def measure(self) -> Measured:
        """The network's measured cost and per-layer output channels as it computes now (with
        fixed masks, the dropped channels count as removed)."""
        net = export(self.network) if self.gates is not None and self.phase == "hard" else self.network
        example = self.example_on(net)
        if self.gates is not None:
            with self.gates.suspended():
                report = count_cost(net, example)
        else:
            report = count_cost(net, example)
        return Measured(report, output_widths(net))

    def bare_copy(self) -> nn.Module:
        """A deep copy of the network as it computes without the gates (their hooks are
        suspended while it is copied): the full network in the soft phase."""
        if self.gates is None:
            return copy.deepcopy(self.network)
        with self.gates.suspended():
            return copy.deepcopy(self.network)

    def example_on(self, net: nn.Module) -> tuple[Tensor, ...]:
        device = next(net.parameters()).device
        return tuple(t.to(device) for t in self.graph.example_input())

    def current_masks(self) -> dict[str, Tensor]:
        """Keep-masks in terms of the current graph (all-true once shrunk)."""
        if self.gates is not None:
            return {n: m.detach().cpu() for n, m in self.gates.alive().items()}
        return self.graph.full_masks()

    def current_cost(self) -> int:
        return self.cost_model.exact(self.current_masks(), self.cost)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain state (the gate parameters themselves are in the owner's ``state_dict``)."""
        tensor = next(self.gates.parameters(), None) if self.gates is not None else None
        state: dict[str, Any] = {
            "phase": self.phase, "progress": self.progress, "skipped_steps": self.skipped_steps,
            "pruned_at": self.pruned_at, "method": self.method.state_dict(),
            "rng_state": generator_states(tensor.device if tensor is not None else None),
        }
        if self.budget is not None and self.budget.schedule is not None:
            state["start_factor"] = self.budget.start_factor
        if self.optimizer is not None:
            state["gate_optimizer"] = self.optimizer.state_dict()
        if isinstance(self.latency, LatencyTable) and self.budget is not None:
            state["latency"] = {"table": self.latency.to_dict(), "full": self.budget.full, "floor": self.budget.floor}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`prepare_load` gave the owner its gates).
        The generators are not set here: :meth:`restore_rng` does it when training resumes."""
        self.phase = state.get("phase", self.phase) if self.phase != "pending" else self.phase
        self.progress = float(state.get("progress", 0.0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.pruned_at = state.get("pruned_at")
        self.method.load_state_dict(state.get("method", {}))
        self._rng = state.get("rng_state")
        if "latency" in state and self.traced:  # the run's own latency model, not one measured again on resuming
            self.latency = LatencyTable.from_dict(state["latency"]["table"])
            self.cost_model = self._cost_model()
            self.budget.full, self.budget.floor = float(state["latency"]["full"]), int(state["latency"]["floor"])
        if self.optimizer is not None and "gate_optimizer" in state:
            self.optimizer.load_state_dict(state["gate_optimizer"])

    def restore_rng(self) -> None:
        """Continue the generators from where the checkpoint was taken (once)."""
        states = getattr(self, "_rng", None)
        if states is not None:
            restore_generators(states)
            self._rng = None

    def prepare_load(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        """Before the owner loads ``state_dict``: give it the gates the checkpoint has (learned
        gates, fixed masks, or none after shrinking); trace first from the recorded input
        shapes if no example was known."""
        gate_keys = [k for k in state_dict if k.startswith(f"{prefix}{GATES_ATTR}.")]
        if not self.traced:
            self.trace(self._recorded_example(state_dict, prefix, gate_keys))
        tensors = [k for k in gate_keys if not k.endswith("_extra_state")]
        masks = masks_in_state_dict(state_dict, f"{prefix}{GATES_ATTR}.")
        if tensors and len(masks) == len(tensors) and self.active:  # the hard phase, masked
            self.method.stop(self)
            self.gates.detach()
            self._attach({n: FixedMask(m) for n, m in masks.items()})
            self.optimizer = None
            self.phase = "hard"
        elif not gate_keys and self.gates is not None:  # the hard phase, shrunk
            self.method.stop(self)
            self.gates.detach()
            self.gates = None
            self.optimizer = None
            self.phase = "hard"

    def after_load(self) -> None:
        """After a shrunk checkpoint was loaded (its pruning history replayed): the graph of
        the network as it is now."""
        if self.phase == "hard" and self.gates is None and self.traced:
            try:
                self.graph.check_model(self.network)
            except ValueError:
                history = pruning_history(self.network)
                if self.graph.residual == "mixed" and history is not None:  # its scattered layers cannot be traced
                    self.graph = replayed_graph(self.graph, history)
                else:
                    self.graph = build_graph(self.network, self.graph.example_input(), ignore=self.ignore)
                self.cost_model = self._cost_model()

    @staticmethod
    def _recorded_example(state_dict: Mapping[str, Any], prefix: str, gate_keys: list[str]) -> tuple[Tensor, ...]:
        records = [state_dict[k] for k in gate_keys if k.endswith("._extra_state")]
        records += [v for k, v in state_dict.items() if k.startswith(prefix) and k.endswith(HISTORY_KEY)]
        for record in records:
            if isinstance(record, Mapping) and record.get("input_shapes"):
                return zero_inputs(record)
        raise ValueError("example_input: the checkpoint records no input shape and none was given; pass example_input=")

    def close(self) -> None:
        """Unregister the session (the gates stay as they are)."""
        for key, value in list(_SESSIONS.items()):
            if value is self:
                del _SESSIONS[key]
