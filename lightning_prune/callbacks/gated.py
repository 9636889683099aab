"""The Lightning side shared by the pruning methods: a thin adapter from Lightning's hooks to
a :class:`~lightning_prune.core.session.PruningSession`.

A :class:`GatedPruning` callback, in ``setup``, finds the network inside the user's
LightningModule and opens a session on it with the callback's method (BAR, Dirichlet,
random); the session's gates are registered under the LightningModule (``pl_module.prune_gates``),
so checkpoints save them and DDP all-reduces their gradients, but they are trained by the
session's own optimizer, not by the user's: if the user's ``configure_optimizers`` collected
them (``self.parameters()``), they are taken out of its parameter groups.

How the method's regularizer reaches the gates without touching ``training_step``: the data
loss reaches them through the user's backward pass (the gates multiply the feature maps).
In ``on_before_optimizer_step`` -- once per optimizer step, after gradient accumulation,
after DDP's all-reduce and after AMP's unscaling of the user's parameters -- the callback
asks the session for a gate step with the GradScaler's scale (fp16; bf16 needs none); the
regularizer is the same on every rank, so ranks stay in sync.

Other callbacks (:class:`~lightning_prune.callbacks.HardPruning`,
:class:`~lightning_prune.callbacks.SigmoidalBudgetAnnealing`) find the session with
:func:`~lightning_prune.core.session.session_of` (the LightningModule), never this callback.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_prune.callbacks.distillation import TeacherDistillation
from lightning_prune.core.budget import resolve_budget
from lightning_prune.core.cost.latency import LatencyTable, check_latency_option
from lightning_prune.core.cost.latency_measure import measure_latency
from lightning_prune.core.cost.model import check_budget_cost
from lightning_prune.core.gating import GateSet
from lightning_prune.core.method import Method
from lightning_prune.core.session import PruningSession, session_of
from lightning_prune.core.surgery import enable_pruned_loading, pruned_loading_enabled
from lightning_prune.core.trace import build_graph

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


@functools.cache
def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, while it is still alive.
    Lightning does this for NCCL only; a gloo group (DDP on CPUs) left to the interpreter's
    finalization can abort the process after training finished ("terminate called without an
    active exception", exit code -6), its worker threads still holding tensors. Registered once
    per process; a group the user destroyed already is left alone."""
    atexit.register(_destroy_default_process_group)


def _destroy_default_process_group() -> None:
    if process_group_initialized():
        torch.distributed.destroy_process_group()


def process_group_initialized() -> bool:
    """Whether this process has a default ``torch.distributed`` process group (DDP's)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def spawned_worker(trainer: L.Trainer) -> bool:
    """Whether this process is a worker started by ``strategy="ddp_spawn"`` / ``"ddp_fork"``:
    the main process then loads the final weights of rank 0 into its own copy of the module."""
    return trainer.world_size > 1 and multiprocessing.parent_process() is not None and isinstance(trainer.strategy, DDPStrategy)


class GatedPruning(Callback):
    """Base class of the pruning-method callbacks: subclasses say which
    :class:`~lightning_prune.core.method.Method` the session uses (:meth:`make_method`).

    Args (keyword-only):
        budget: fraction of the full cost to keep, in (0, 1]; or
        factor: the papers' pruning factor, ``1 / budget`` (give exactly one of the two).
        cost: ``"volume"`` (activation volume), ``"macs"``, ``"params"`` or ``"latency"``
            (nanoseconds per batch of the network's inference form on this device).
        latency: with ``cost="latency"``: the keyword arguments of
            :func:`lightning_prune.measure_latency` (at least ``batch_size``; the network is timed
            when it is traced, or its timings are read from the cache) or a measured
            :class:`~lightning_prune.core.cost.latency.LatencyTable`. Under DDP rank 0 measures
            and the other ranks receive its table, so that every rank prunes the same channels.
        module: dotted path of the network inside the LightningModule (default: its only
            child with parameters, else the LightningModule itself).
        example_input: tensor, tuple of tensors or input shape used to trace the network
            (default: ``example_input_array``, the datamodule's ``input_shape``, else the
            first training batch).
        ignore: module names never to prune (output heads are never pruned anyway).
        verbose: print what is pruned.
        distillation: learn from a frozen copy of the network taken at fit start while the
            channels are chosen (the soft phase): the user's loss gradient is blended with
            that of ``T^2 KL(teacher || student)`` (``alpha`` of the latter), assuming the
            user's loss is a batch mean. For pruning a *trained* network.
        distill_fine_tuning: learn from the same teacher after hard pruning, while the shrunk
            network fine-tunes (one dense forward pass of the teacher per step). A run resumed
            after hard pruning rebuilds the teacher in the full network the LightningModule is
            constructed with, before the checkpoint shrinks it.
        temperature, alpha: of the distillation.
    """

    def __init__(
        self,
        *,
        budget: float | None = None,
        factor: float | None = None,
        cost: str = "volume",
        latency: Any = None,
        module: str | None = None,
        example_input: Any = None,
        ignore: Sequence[str] = (),
        verbose: bool = True,
        distillation: bool = False,
        distill_fine_tuning: bool = False,
        temperature: float = 4.0,
        alpha: float = 0.9,
    ) -> None:
        self.budget = resolve_budget(budget=budget, factor=factor)
        check_budget_cost(cost)
        self.latency = check_latency_option(cost, latency)
        if module is not None and not isinstance(module, str):
            raise TypeError(f"module must be a dotted attribute path or None, got {type(module).__name__}")
        if isinstance(ignore, str) or not all(isinstance(n, str) for n in ignore):
            raise TypeError("ignore must be a sequence of module names")
        self.cost = cost
        self.module = module
        self.example_input = example_input
        self.ignore = tuple(ignore)
        self.verbose = verbose
        self.distiller = TeacherDistillation(soft_phase=distillation, fine_tuning=distill_fine_tuning, temperature=temperature, alpha=alpha)
        self.method = self.make_method()
        self.session: PruningSession | None = None

    def make_method(self) -> Method:
        raise NotImplementedError(f"{type(self).__name__} must say which method it runs (make_method)")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(budget=self.budget, cost=self.cost, module=self.module, method=self.method.name)

    # -- what the session holds, for users and logs ---------------------------------------------
    @property
    def gates(self) -> GateSet | None:
        return self.session.gates if self.session is not None else None

    @property
    def graph(self) -> Any:
        return self.session.graph if self.session is not None else None

    @property
    def active(self) -> bool:
        """True while the gates learn (the soft phase)."""
        return self.session is not None and self.session.active

    @property
    def distilling(self) -> bool:
        """True while the network learns from the teacher (``distillation``: the soft phase;
        ``distill_fine_tuning``: after hard pruning)."""
        return self.distiller.active(self.session)

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen copy of the network distilled from (``None`` without distillation)."""
        return self.distiller.teacher

    # -- setup ----------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.session is not None:
            return
        network = find_network(pl_module, self.module)
        if process_group_initialized():
            destroy_process_group_at_exit()
        if spawned_worker(trainer) and not pruned_loading_enabled(pl_module):
            raise ValueError(
                f"strategy: under {type(trainer.strategy).__name__} with worker processes started by multiprocessing "
                f"(ddp_spawn / ddp_fork), the main process loads the final weights into its own {type(pl_module).__name__}, "
                "which cannot take the smaller, pruned network; call lightning_prune.enable_pruned_loading(module) "
                "before trainer.fit(module, ...), or use strategy='ddp'"
            )
        self.session = PruningSession(
            network, self.method, budget=self.budget, cost=self.cost, latency=self.latency, ignore=self.ignore, owner=pl_module
        )
        # Resuming: the checkpoint decides which gates the module must have before its tensors
        # load, before a pruning history is replayed (so this pre-hook goes first).
        handle = pl_module.register_load_state_dict_pre_hook(self._before_load)
        pl_module._load_state_dict_pre_hooks.move_to_end(handle.id, last=False)
        if not pruned_loading_enabled(pl_module):
            enable_pruned_loading(pl_module)
        self.distiller.keep_full_network(self.session)
        example = example_from(trainer, pl_module, self.example_input)
        if example is not None:
            self._trace(example, trainer)
        elif self.verbose:
            rank_zero_info(f"{type(self).__name__}: no example input given; the first training batch will give one")

    def _trace(self, example: tuple[Tensor, ...], trainer: L.Trainer) -> None:
        self._share_latency(example, trainer)
        self.session.trace(example)
        if self.verbose:
            s = self.session
            rank_zero_info(
                f"{type(self).__name__}: {len(s.graph)} channel groups ({s.graph.num_channels} channels) of "
                f"{type(s.network).__name__}; {self.cost} {s.budget.full:,.0f} -> budget {s.budget.target:,.0f}"
            )

    def _share_latency(self, example: tuple[Tensor, ...], trainer: L.Trainer) -> None:
        """Under DDP with a latency budget: rank 0 measures the latency model, every rank uses it
        (timings differ between processes; different budgets would prune different channels)."""
        session = self.session
        if session.cost != "latency" or isinstance(session.latency, LatencyTable) or trainer.world_size == 1:
            return
        table = None
        if trainer.global_rank == 0:
            graph = build_graph(session.network, example, ignore=session.ignore, residual=session.residual)
            table = measure_latency(session.network, graph, **session.latency)
        session.latency = trainer.strategy.broadcast(table, src=0)

    def _before_load(self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        self.session.prepare_load(state_dict, prefix)

    def ensure_traced(self, trainer: L.Trainer, batch: Any) -> bool:
        """Trace the network on this training batch if no example input was known at setup
        (every rank does the same); return True if this call did it."""
        if self.session is None or self.session.traced:
            return False
        self._trace(example_from_batch(self.session.network, batch), trainer)
        self._fit_started(trainer)
        rewrap_ddp(trainer)  # the gates are new parameters
        return True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Gate samples and the data order come from torch's generators: a resumed run continues
        # them from where the checkpoint was taken (on_fit_start runs after the callbacks' state
        # is restored and before the first batch is drawn), so it ends where the unbroken run ends.
        self.session.restore_rng()
        if not self.session.traced:
            return  # traced on the first batch
        self.session.after_load()
        self._fit_started(trainer)

    def _fit_started(self, trainer: L.Trainer) -> None:
        self.distiller.start(trainer, self.session)
        gates = self.session.gates
        if gates is None:
            return
        gates.reinstall()  # the strategy may have replaced layers (SyncBatchNorm)
        ours = {id(p) for p in gates.parameters()}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ours]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.ensure_traced(trainer, batch)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self.active or not trainer.optimizers or optimizer is not trainer.optimizers[0]:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.session.gate_step(float(scaler.get_scale()) if scaler is not None else 1.0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.active or not self.method.last:
            return
        for key, value in self.method.last.items():
            pl_module.log(f"{self.method.name}/{key}", value, prog_bar=key == "cost_vs_budget", on_step=True, on_epoch=False, batch_size=1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.gates is None:
            return
        for name, mask in self.gates.alive().items():
            pl_module.log(f"{self.method.name}_alive/{name}", float(mask.sum()), on_step=False, on_epoch=True, batch_size=1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.distiller.stop()  # the trained network leaves fit without the hook

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.session is None:
            return {}
        state = self.session.state_dict()
        teacher = self.distiller.state_dict()
        if teacher:
            state["teacher"] = teacher
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.session is not None:
            self.session.load_state_dict(state_dict)
        self.distiller.load_state_dict(state_dict.get("teacher"))


def require_session(pl_module: L.LightningModule, who: str) -> PruningSession:
    """The module's pruning session, or a ``ValueError`` saying that ``who`` needs one."""
    session = session_of(pl_module)
    if session is None:
        raise ValueError(
            f"{who} needs exactly one channel-selection callback (BudgetAwareRegularization, DirichletImportance "
            "or RandomPruning) in the Trainer, found none"
        )
    return session
