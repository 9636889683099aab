"""The Lightning side shared by the gate-learning methods (BAR, Dirichlet switches).

A :class:`GatedPruning` callback, in ``setup``, finds the network inside the user's
LightningModule, builds its channel graph and cost model, and attaches one gate per channel
group. The gates are registered under the LightningModule (``pl_module.prune_gates``), so
checkpoints save them and DDP all-reduces their gradients, but they are trained by the
callback's own optimizer (``gate_lr``), not by the user's: if the user's
``configure_optimizers`` collected them (``self.parameters()``), they are taken out of its
parameter groups in ``on_fit_start``.

How the method's regularizer reaches the gates without touching ``training_step``: the data
loss reaches them through the user's backward pass (the gates multiply the feature maps).
In ``on_before_optimizer_step`` -- once per optimizer step, after gradient accumulation,
after DDP's all-reduce and after AMP's unscaling of the user's parameters -- the callback
unscales the gates' gradients itself (fp16 GradScaler; bf16 needs none), adds the gradient
of its regularizer (the same on every rank, so ranks stay in sync), and steps the gate
optimizer. A step whose gate gradients are not finite is skipped, as the GradScaler skips
the user's step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_prune.allocation import minimum_cost, top_k_masks
from lightning_prune.budget import finite_real, resolve_budget
from lightning_prune.cost import CostReport, count_cost
from lightning_prune.cost.measure import output_widths
from lightning_prune.cost.model import COSTS, CostModel
from lightning_prune.gates import ChannelGate, FixedMask
from lightning_prune.gating import GateSet, attach_gates
from lightning_prune.graph import ChannelGraph, ChannelGroup, build_graph
from lightning_prune.surgery import enable_pruned_loading, shrink

GATES_ATTR = "prune_gates"


@dataclass(frozen=True)
class Measured:
    cost: CostReport
    widths: dict[str, int]  # output channels of every convolution / linear layer


def find_network(pl_module: nn.Module, module: str | None) -> nn.Module:
    """The network to prune inside ``pl_module``: ``module`` (a dotted attribute path) when
    given, else the only direct child that holds parameters, else ``pl_module`` itself."""
    if module is not None:
        try:
            net = pl_module.get_submodule(module)
        except AttributeError as err:
            raise ValueError(f"module: {type(pl_module).__name__} has no submodule {module!r}") from err
        return net
    with_params = [c for c in pl_module.children() if not isinstance(c, GateSet) and next(c.parameters(), None) is not None]
    return with_params[0] if len(with_params) == 1 else pl_module


def example_from(trainer: L.Trainer, pl_module: L.LightningModule, example_input: Any) -> tuple[Tensor, ...]:
    """The example input used to trace the network: the argument, else the LightningModule's
    ``example_input_array``, else a zero batch of the datamodule's ``input_shape``."""
    value = example_input
    if value is None:
        value = getattr(pl_module, "example_input_array", None)
    if value is None:
        shape = getattr(trainer.datamodule, "input_shape", None) if trainer.datamodule is not None else None
        if shape is None:
            raise ValueError(
                "example_input: give one (a tensor or an input shape without the batch dimension), set "
                "example_input_array on the LightningModule, or use a datamodule with an input_shape attribute"
            )
        value = tuple(shape)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (torch.zeros(1, *value),)
    if isinstance(value, Tensor):
        return (value[:1].detach().cpu(),)
    if isinstance(value, (tuple, list)) and all(isinstance(v, Tensor) for v in value):
        return tuple(v[:1].detach().cpu() for v in value)
    raise TypeError("example_input must be a tensor, a tuple of tensors or an input shape (tuple of ints)")


class GatedPruning(Callback):
    """Base class: gates on every channel group, a budget, and a gate optimizer.

    Subclasses define :meth:`make_gate`, :meth:`regularizer` and :meth:`keep_masks`.

    Args:
        budget: fraction of the full cost to keep, in (0, 1]; or
        factor: the papers' pruning factor, ``1 / budget`` (give exactly one of the two).
        cost: ``"volume"`` (activation volume), ``"macs"`` or ``"params"``.
        gate_lr: learning rate of the gates' Adam optimizer.
        module: dotted path of the network inside the LightningModule (default: its only
            child with parameters, else the LightningModule itself).
        example_input: tensor, tuple of tensors or input shape used to trace the network
            (default: ``example_input_array`` or the datamodule's ``input_shape``).
        ignore: module names never to prune (output heads are never pruned anyway).
        verbose: print what is pruned.
    """

    def __init__(
        self,
        budget: float | None = None,
        factor: float | None = None,
        cost: str = "volume",
        gate_lr: float = 0.01,
        module: str | None = None,
        example_input: Any = None,
        ignore: Sequence[str] = (),
        verbose: bool = True,
    ) -> None:
        self.budget = resolve_budget(budget=budget, factor=factor)
        if cost not in COSTS:
            raise ValueError(f"cost must be one of {', '.join(map(repr, COSTS))}, got {cost!r}")
        gate_lr = finite_real("gate_lr", gate_lr)
        if gate_lr <= 0:
            raise ValueError(f"gate_lr must be > 0, got {gate_lr}")
        if module is not None and not isinstance(module, str):
            raise TypeError(f"module must be a dotted attribute path or None, got {type(module).__name__}")
        if isinstance(ignore, str) or not all(isinstance(n, str) for n in ignore):
            raise TypeError("ignore must be a sequence of module names")
        self.cost = cost
        self.gate_lr = gate_lr
        self.module = module
        self.example_input = example_input
        self.ignore = tuple(ignore)
        self.verbose = verbose
        # Set in setup.
        self.network: nn.Module | None = None
        self.graph: ChannelGraph | None = None
        self.cost_model: CostModel | None = None
        self.gates: GateSet | None = None
        self.gate_optimizer: torch.optim.Optimizer | None = None
        self.full_cost = 0.0
        self.target_cost = 0.0
        # Plain state (saved in checkpoints).
        self.phase = "soft"  # "soft": gates learn; "hard": masks fixed (and network shrunk or masked)
        self.skipped_steps = 0
        self._resumed_rng: Tensor | None = None

    # -- what subclasses provide -------------------------------------------------------
    def make_gate(self, group: ChannelGroup) -> ChannelGate:
        raise NotImplementedError

    def regularizer(self) -> Tensor | None:
        """The term added to the loss for the gates (a scalar with a graph to the gate
        parameters), or None for no term this step."""
        raise NotImplementedError

    def keep_masks(self, widths: Mapping[str, int] | None = None) -> dict[str, Tensor]:
        """Hard keep-masks for every group, at or under the budget (or with ``widths``)."""
        raise NotImplementedError

    def masks_for_widths(self, scores: Mapping[str, Tensor], widths: Mapping[str, int]) -> dict[str, Tensor]:
        """Keep the ``widths[group]`` highest-scoring channels of each listed group; the other groups keep all."""
        return {**self.graph.full_masks(), **top_k_masks(scores, widths)}

    # -- properties ---------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(budget=self.budget, cost=self.cost, module=self.module)

    @property
    def active(self) -> bool:
        """True while the gates learn (the soft phase)."""
        return self.phase == "soft" and self.gates is not None

    # -- setup ----------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.network is not None:
            return
        self.network = find_network(pl_module, self.module)
        example = example_from(trainer, pl_module, self.example_input)
        self.graph = build_graph(self.network, example, ignore=self.ignore)
        self.cost_model = CostModel(self.graph)
        self.full_cost = float(self.cost_model.full(self.cost))
        self.target_cost = self.budget * self.full_cost
        floor = minimum_cost(self.cost_model, self.cost)
        if floor > self.target_cost:
            raise ValueError(
                f"budget: {self.budget:.4g} of the full {self.cost} ({self.full_cost:,.0f}) is {self.target_cost:,.0f}, "
                f"below the {floor:,} that remains with one channel per prunable group; raise the budget"
            )
        # Resuming: the checkpoint decides which gates the module must have before its
        # tensors load (learned gates, fixed masks, or none after shrinking), then the
        # pruning history of a shrunk network is replayed onto this full-size one.
        pl_module.register_load_state_dict_pre_hook(self._before_load)
        enable_pruned_loading(pl_module)
        self._attach(pl_module, self.make_gate)
        self.gate_optimizer = self.make_gate_optimizer()
        if self.verbose:
            rank_zero_info(
                f"{type(self).__name__}: {len(self.graph)} channel groups ({self.graph.num_channels} channels) of "
                f"{type(self.network).__name__}; {self.cost} {self.full_cost:,.0f} -> budget {self.target_cost:,.0f}"
            )

    def make_gate_optimizer(self) -> torch.optim.Optimizer:
        """The gates' optimizer (default: Adam at ``gate_lr``)."""
        return torch.optim.Adam(self.gates.parameters(), lr=self.gate_lr)

    def _attach(self, pl_module: L.LightningModule, gates: Any) -> None:
        self.gates = attach_gates(self.network, self.graph, gates, owner=pl_module, name=GATES_ATTR)

    def _before_load(self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        """Load pre-hook on the LightningModule: give it the gates the checkpoint has."""
        gate_keys = [k for k in state_dict if k.startswith(f"{prefix}{GATES_ATTR}.")]
        masks = {k: v for k, v in state_dict.items() if k in gate_keys and k.endswith(".mask")}
        if gate_keys and len(masks) == len(gate_keys):  # the hard phase, masked
            if self.gates is not None:
                self.gates.detach()
            key_of = {k: k[len(f"{prefix}{GATES_ATTR}.gates.") : -len(".mask")].replace("/", ".") for k in masks}
            self._attach(module, {key_of[k]: FixedMask(v.bool()) for k, v in masks.items()})
            self.gate_optimizer = None
            self.phase = "hard"
        elif not gate_keys and self.gates is not None:  # the hard phase, shrunk
            self.gates.detach()
            self.gates = None
            self.gate_optimizer = None
            self.phase = "hard"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Gate samples and the data order come from torch's global generator: a resumed run
        # continues it from where the checkpoint was taken (on_fit_start runs after the
        # callbacks' state is restored and before the first batch is drawn), so it ends
        # where the unbroken run ends.
        if self._resumed_rng is not None:
            torch.set_rng_state(self._resumed_rng)
            self._resumed_rng = None
        if self.phase == "hard" and self.gates is None:
            # Resumed after shrinking: the checkpoint's pruning history has been replayed.
            try:
                self.graph.check_model(self.network)
            except ValueError:
                self.graph = build_graph(self.network, self.graph.example_input(), ignore=self.ignore)
                self.cost_model = CostModel(self.graph)
        if self.gates is None:
            return
        ours = {id(p) for p in self.gates.parameters()}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ours]

    # -- training -----------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self.active or self.gate_optimizer is None or not trainer.optimizers or optimizer is not trainer.optimizers[0]:
            return
        params = [p for p in self.gates.parameters() if p.requires_grad]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            inv = 1.0 / float(scaler.get_scale())
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(inv)
        if any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in params):
            self.skipped_steps += 1
            self.gate_optimizer.zero_grad(set_to_none=True)
            return
        term = self.regularizer()
        if term is not None and term.requires_grad:
            grads = torch.autograd.grad(term, params, allow_unused=True)
            for p, g in zip(params, grads):
                if g is None:
                    continue
                p.grad = g.to(p.dtype) if p.grad is None else p.grad.add_(g.to(p.dtype))
        self.gate_optimizer.step()
        self.gate_optimizer.zero_grad(set_to_none=True)

    # -- hard pruning (called by HardPruning) -------------------------------------------------
    def harden(self, trainer: L.Trainer, pl_module: L.LightningModule, masks: Mapping[str, Tensor], shrink_network: bool) -> None:
        """Fix the masks: detach the learned gates, then either remove the dropped channels
        physically (slicing the user's optimizer state) or mask them with fixed gates."""
        if self.gates is None or self.graph is None:
            raise RuntimeError(f"{type(self).__name__} has no gates to harden (was setup run?)")
        masks = self.graph.check_masks(dict(masks))
        self.gates.detach()
        self.gates = None
        self.gate_optimizer = None
        self.phase = "hard"
        if shrink_network:
            self.graph = shrink(self.network, masks, graph=self.graph, optimizer=trainer.optimizers)
            self.cost_model = CostModel(self.graph)
        else:
            self._attach(pl_module, {n: FixedMask(m) for n, m in masks.items()})

    def shrink_masked(self) -> None:
        """Remove the channels that the fixed masks of the hard phase drop (used when
        shrinking had to wait, e.g. under DDP, until the end of fit)."""
        if self.phase != "hard" or self.gates is None:
            return
        masks = {n: m.detach().cpu() for n, m in self.gates.alive().items()}
        self.gates.detach()
        self.gates = None
        self.graph = shrink(self.network, masks, graph=self.graph)
        self.cost_model = CostModel(self.graph)

    def measure(self) -> Measured:
        """The network's measured cost and per-layer output channels, as it computes now
        (with fixed masks the dropped channels count as removed)."""
        if self.gates is not None and self.phase == "hard":
            from lightning_prune.export import export

            net = export(self.network)
        else:
            net = self.network
        if self.gates is not None:
            with self.gates.suspended():
                report = count_cost(net, self._example_on(net))
        else:
            report = count_cost(net, self._example_on(net))
        return Measured(report, output_widths(net))

    def _example_on(self, net: nn.Module) -> tuple[Tensor, ...]:
        device = next(net.parameters()).device
        return tuple(t.to(device) for t in self.graph.example_input())

    def current_masks(self) -> dict[str, Tensor]:
        """Keep-masks in terms of the current graph (all-true once shrunk)."""
        if self.gates is not None:
            return {n: m.detach().cpu() for n, m in self.gates.alive().items()}
        return self.graph.full_masks()

    def current_cost(self) -> int:
        return self.cost_model.exact(self.current_masks(), self.cost)

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "phase": self.phase, "skipped_steps": self.skipped_steps,
            "rng_state": torch.get_rng_state(),
        }
        if self.gate_optimizer is not None:
            state["gate_optimizer"] = self.gate_optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.phase = state_dict.get("phase", "soft")
        self.skipped_steps = state_dict.get("skipped_steps", 0)
        self._resumed_rng = state_dict.get("rng_state")
        if self.gate_optimizer is not None and "gate_optimizer" in state_dict:
            self.gate_optimizer.load_state_dict(state_dict["gate_optimizer"])
