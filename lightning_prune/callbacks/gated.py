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

import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_prune.allocation import minimum_cost, top_k_masks
from lightning_prune.budget import finite_real, resolve_budget
from lightning_prune.cost import CostReport, count_cost
from lightning_prune.cost.measure import output_widths
from lightning_prune.cost.model import COSTS, CostModel
from lightning_prune.export import export, record_budget
from lightning_prune.gates import ChannelGate, FixedMask
from lightning_prune.gating import GateSet, attach_gates
from lightning_prune.graph import ChannelGraph, ChannelGroup, build_graph
from lightning_prune.folding import shrink_as_masked
from lightning_prune.surgery import HISTORY_KEY, enable_pruned_loading, pruned_loading_enabled

GATES_ATTR = "prune_gates"


def generator_states(device: torch.device | None = None) -> dict[str, Any]:
    """The states of the random generators that the gates draw from: torch's CPU generator
    (data order, gates on the CPU) and, for gates on an accelerator, that device's generator."""
    states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        states["cuda"] = (device.index if device.index is not None else torch.cuda.current_device(), torch.cuda.get_rng_state(device))
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


def example_from(trainer: L.Trainer, pl_module: L.LightningModule, example_input: Any) -> tuple[Tensor, ...] | None:
    """The example input used to trace the network: the argument, else the LightningModule's
    ``example_input_array``, else a zero batch of the datamodule's ``input_shape``; ``None``
    when there is none of them (then the first training batch gives it, see
    :func:`example_from_batch`)."""
    value = example_input
    if value is None:
        value = getattr(pl_module, "example_input_array", None)
    if value is None:
        shape = getattr(trainer.datamodule, "input_shape", None) if trainer.datamodule is not None else None
        if shape is None:
            return None
        value = tuple(shape)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (torch.zeros(1, *value),)
    if isinstance(value, Tensor):
        return (value[:1].detach().cpu(),)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, Tensor) for v in value):
        return tuple(v[:1].detach().cpu() for v in value)
    raise TypeError("example_input must be a tensor, a tuple of tensors or an input shape (tuple of ints)")


def batch_tensors(batch: Any) -> list[Tensor]:
    """Every tensor of a batch, in order: the batch itself, the items of a tuple or list, the
    values of a mapping (nested containers are walked depth-first)."""
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in batch_tensors(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in batch_tensors(v)]
    return []


@torch.no_grad()
def example_from_batch(network: nn.Module, batch: Any) -> tuple[Tensor, ...]:
    """The first tensor of a training batch that ``network``'s forward accepts, cut to one
    sample (the network runs once per candidate, in eval mode, so nothing it holds changes)."""
    candidates = [t for t in batch_tensors(batch) if t.dim() > 0 and t.shape[0] > 0 and t.is_floating_point()]
    candidates += [t for t in batch_tensors(batch) if t.dim() > 0 and t.shape[0] > 0 and not t.is_floating_point()]
    was_training = network.training
    network.eval()
    try:
        for tensor in candidates:
            example = tensor[:1].detach()
            try:
                network(example)
            except Exception:  # not the network's input (labels, masks, ...): try the next one
                continue
            return (example,)
    finally:
        network.train(was_training)
    shapes = ", ".join(str(tuple(t.shape)) for t in batch_tensors(batch)) or "no tensor"
    raise ValueError(
        f"example_input: none of the tensors of the first training batch ({shapes}) is accepted by "
        f"{type(network).__name__}.forward on its own; pass example_input= (a tensor, a tuple of tensors or an "
        "input shape), or set example_input_array on the LightningModule"
    )


def rewrap_ddp(trainer: L.Trainer) -> None:
    """Wrap the LightningModule in a new ``DistributedDataParallel`` after its parameters
    changed (gates attached or removed, channels removed): DDP records the parameters it
    synchronises when it is built, and would otherwise wait for gradients of parameters that
    no longer take part (or ignore new ones). Ranks hold identical modules, so the broadcast
    from rank 0 at construction changes nothing."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()


def spawned_worker(trainer: L.Trainer) -> bool:
    """Whether this process is a worker started by ``strategy="ddp_spawn"`` / ``"ddp_fork"``:
    the main process then loads the final weights of rank 0 into its own copy of the module."""
    return trainer.world_size > 1 and multiprocessing.parent_process() is not None and isinstance(trainer.strategy, DDPStrategy)


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
        self._resumed_rng: dict[str, Any] | None = None
        self._checks: list[Callable[[GatedPruning], None]] = []

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
        if spawned_worker(trainer) and not pruned_loading_enabled(pl_module):
            raise ValueError(
                f"strategy: under {type(trainer.strategy).__name__} with worker processes started by multiprocessing "
                f"(ddp_spawn / ddp_fork), the main process loads the final weights into its own {type(pl_module).__name__}, "
                "which cannot take the smaller, pruned network; call lightning_prune.enable_pruned_loading(module) "
                "before trainer.fit(module, ...), or use strategy='ddp'"
            )
        # Resuming: the checkpoint decides which gates the module must have before its
        # tensors load (learned gates, fixed masks, or none after shrinking), then the
        # pruning history of a shrunk network is replayed onto this full-size one.
        handle = pl_module.register_load_state_dict_pre_hook(self._before_load)
        # First of the pre-hooks: the gates (and, without an example input, the graph of the
        # unpruned network) must exist before a pruning history is replayed.
        pl_module._load_state_dict_pre_hooks.move_to_end(handle.id, last=False)
        if not pruned_loading_enabled(pl_module):
            enable_pruned_loading(pl_module)
        example = example_from(trainer, pl_module, self.example_input)
        if example is not None:
            self._prepare(pl_module, example)
        elif self.verbose:
            rank_zero_info(f"{type(self).__name__}: no example input given; the first training batch will give one")

    def ensure_ready(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> bool:
        """Trace the network on the first training batch if no example input was known at
        setup (every rank does the same); return True if this call did it."""
        if self.graph is not None or self.network is None:
            return False
        self._prepare(pl_module, example_from_batch(self.network, batch))
        self._fit_started(trainer)
        rewrap_ddp(trainer)  # the gates are new parameters
        return True

    def when_ready(self, check: Callable[[GatedPruning], None]) -> None:
        """Run ``check(self)`` once the channel graph and the budget are known (now, if they are):
        how :class:`HardPruning` validates its widths before training starts."""
        self._checks.append(check)
        if self.graph is not None:
            check(self)

    def _prepare(self, pl_module: L.LightningModule, example: tuple[Tensor, ...]) -> None:
        """Build the channel graph and cost model from ``example``, check the budget, attach the gates."""
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
        record_budget(self.network, self.cost, self.target_cost, self.full_cost, self.graph.example_input())
        self._attach(pl_module, self.make_gate)
        self.gate_optimizer = self.make_gate_optimizer()
        self._prepared()
        for check in self._checks:
            check(self)
        if self.verbose:
            rank_zero_info(
                f"{type(self).__name__}: {len(self.graph)} channel groups ({self.graph.num_channels} channels) of "
                f"{type(self.network).__name__}; {self.cost} {self.full_cost:,.0f} -> budget {self.target_cost:,.0f}"
            )

    def _prepared(self) -> None:
        """Called once the graph, the cost model and the gates exist (for subclasses)."""

    def make_gate_optimizer(self) -> torch.optim.Optimizer:
        """The gates' optimizer (default: Adam at ``gate_lr``)."""
        return torch.optim.Adam(self.gates.parameters(), lr=self.gate_lr)

    def _attach(self, pl_module: L.LightningModule, gates: Any) -> None:
        self.gates = attach_gates(self.network, self.graph, gates, owner=pl_module, name=GATES_ATTR)

    def _before_load(self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        """Load pre-hook on the LightningModule: give it the gates the checkpoint has."""
        gate_keys = [k for k in state_dict if k.startswith(f"{prefix}{GATES_ATTR}.")]
        if self.graph is None:  # no example input at setup: the checkpoint records the input shapes
            self._prepare(module, self._example_in(state_dict, prefix, gate_keys))
        tensors = [k for k in gate_keys if not k.endswith("_extra_state")]
        masks = {k: state_dict[k] for k in tensors if k.endswith(".mask")}
        if tensors and len(masks) == len(tensors):  # the hard phase, masked
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

    def _example_in(self, state_dict: Mapping[str, Any], prefix: str, gate_keys: list[str]) -> tuple[Tensor, ...]:
        """A zero example input of the shapes recorded in a checkpoint (by the gates or by the pruning history)."""
        records = [state_dict[k] for k in gate_keys if k.endswith("._extra_state")]
        records += [v for k, v in state_dict.items() if k.startswith(prefix) and k.endswith(HISTORY_KEY)]
        for record in records:
            if isinstance(record, Mapping) and record.get("input_shapes"):
                dtypes = record.get("input_dtypes") or ["float32"] * len(record["input_shapes"])
                return tuple(torch.zeros(s, dtype=getattr(torch, d)) for s, d in zip(record["input_shapes"], dtypes))
        raise ValueError(
            f"example_input: the checkpoint records no input shape and none was given; pass example_input= to {type(self).__name__}"
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Gate samples and the data order come from torch's generators: a resumed run
        # continues them from where the checkpoint was taken (on_fit_start runs after the
        # callbacks' state is restored and before the first batch is drawn), so it ends
        # where the unbroken run ends.
        if self._resumed_rng is not None:
            restore_generators(self._resumed_rng)
            self._resumed_rng = None
        if self.graph is None:
            return  # traced on the first batch
        if self.phase == "hard" and self.gates is None:
            # Resumed after shrinking: the checkpoint's pruning history has been replayed.
            try:
                self.graph.check_model(self.network)
            except ValueError:
                self.graph = build_graph(self.network, self.graph.example_input(), ignore=self.ignore)
                self.cost_model = CostModel(self.graph)
        self._fit_started(trainer)

    def _fit_started(self, trainer: L.Trainer) -> None:
        if self.gates is None:
            return
        # The strategy may have replaced layers (SyncBatchNorm): hook the gates onto the layers there are now.
        self.gates.reinstall()
        ours = {id(p) for p in self.gates.parameters()}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ours]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.ensure_ready(trainer, pl_module, batch)

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
            self.graph = shrink_as_masked(self.network, masks, graph=self.graph, optimizer=trainer.optimizers)
            self.cost_model = CostModel(self.graph)
        else:
            self._attach(pl_module, {n: FixedMask(m) for n, m in masks.items()})
        rewrap_ddp(trainer)  # the learned gates (and the removed channels) are gone

    def measure(self) -> Measured:
        """The network's measured cost and per-layer output channels, as it computes now
        (with fixed masks the dropped channels count as removed)."""
        if self.gates is not None and self.phase == "hard":
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
        tensor = next(self.gates.parameters(), None) if self.gates is not None else None
        state: dict[str, Any] = {
            "phase": self.phase, "skipped_steps": self.skipped_steps,
            "rng_state": generator_states(tensor.device if tensor is not None else None),
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
