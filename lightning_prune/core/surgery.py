"""Physical removal of channels, with a replayable pruning history.

``shrink(model, masks)`` removes the channels that ``masks`` drop from every layer of their
group, in place, using Torch-Pruning's per-layer pruning functions (the handler table of
``torch_pruning.pruner.function``) on the positions recorded in the
:class:`~lightning_prune.core.graph.ChannelGraph`. The graph, the gates and the cost model all read
the same positions, so "masked == shrunk" and "exact cost == measured cost" hold by
construction (and are tested).

Why not ``Group.prune()`` of Torch-Pruning directly: it needs a live, traced dependency graph
(tracing again after every shrink), and it replaces every pruned ``nn.Parameter`` by a new
object, which silently detaches the parameters from any optimizer. Here every pruned parameter
becomes a new leaf tensor that takes the old one's place in the module *and* in the given
optimizers' parameter groups, and the optimizer's per-parameter state
(``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``, ... -- every state tensor shaped like the
parameter) is sliced with the same indices, so training continues where it was.

The history (plain data: lists, dicts, ints, strings) is kept in a plain attribute of the
model, never a submodule (an ``nn.Sequential`` would call it), and written into the model's
``state_dict`` by a state-dict hook, so any checkpoint of a shrunk model carries it.
:func:`replay` applies it to a fresh instance of the architecture, and
:func:`enable_pruned_loading` makes ``load_state_dict`` do that by itself.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.utils.hooks import RemovableHandle
from torch_pruning.pruner import function as tpf

from lightning_prune.core.gating import attached_gates
from lightning_prune.core.graph import ChannelGraph, zero_inputs
from lightning_prune.core.residual import RemovedLayer, is_scattered, scatter_output, unscatter_output
from lightning_prune.core.trace import build_graph

__all__ = [
    "shrink",
    "replay",
    "replayed_graph",
    "pruning_history",
    "enable_pruned_loading",
    "pruned_loading_enabled",
    "restore_created_biases",
    "HISTORY_KEY",
    "CREATED_BIASES",
]

HISTORY_ATTR = "_lightning_prune_history"  # the attribute holding the record
BUDGET_ATTR = "_lightning_prune_budget"  # the budget a pruning callback noted on the network (core.export.record_budget)
HISTORY_KEY = "lightning_prune_history._extra_state"  # its key in state dicts (the name of earlier versions)
HISTORY_VERSION = 1  # what a tied history is written as (unchanged since version 1)
MIXED_HISTORY_VERSION = 2  # a history of mixed-connectivity residual blocks (it records "residual": "mixed")
HISTORY_VERSIONS = (HISTORY_VERSION, MIXED_HISTORY_VERSION)
# Key of the pruning history listing the layers whose bias lightning_prune.core.folding created.
CREATED_BIASES = "created_biases"

# Torch-Pruning handler per (layer kind, cut dimension).
_HANDLERS = {
    ("conv", "out"): tpf.prune_conv_out_channels,
    ("conv", "in"): tpf.prune_conv_in_channels,
    ("conv", "channel"): tpf.prune_depthwise_conv_out_channels,
    ("linear", "out"): tpf.prune_linear_out_channels,
    ("linear", "in"): tpf.prune_linear_in_channels,
    ("norm", "channel"): tpf.prune_batchnorm_out_channels,
}


class _HistoryInStateDict:
    """State-dict post-hook: writes the module's pruning history under ``HISTORY_KEY``."""

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        record = module.__dict__.get(HISTORY_ATTR)
        if record is not None:
            state_dict[prefix + HISTORY_KEY] = copy.deepcopy(record)


def pruning_history(model: nn.Module) -> dict[str, Any] | None:
    """The pruning history recorded on ``model`` by :func:`shrink` (plain data), or ``None``.

    The history is plain data::

        {"version": 1, "model": class name, "input_shapes": [[1, 3, 32, 32]],
         "input_dtypes": ["float32"], "ignore": [module names],
         "steps": [{group name: [removed channel indices], ...}, ...]}

    Indices of step ``k`` refer to the model as it was after steps ``0 .. k-1``. A graph built
    with ``residual="mixed"`` that has residual branches writes ``"version": 2`` and
    ``"residual": "mixed"``: the structural changes of mixed-connectivity residual blocks (a
    branch's last layer scattered into its stream's channels, a branch that keeps no channel
    removed, see :mod:`lightning_prune.core.residual`) follow from the steps and the graph, so
    ``replay`` rebuilds them. An optional ``"created_biases": [layer names]`` lists the layers whose bias
    :func:`lightning_prune.core.folding.shrink_as_masked` created (``replay`` recreates them). It is kept
    in a plain attribute of the model (not a submodule, so that no container's ``forward``
    sees it) and written into the model's ``state_dict`` under ``lightning_prune_history``
    by a state-dict hook, so every checkpoint of a shrunk network carries it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return model.__dict__.get(HISTORY_ATTR)


def _record_step(model: nn.Module, graph: ChannelGraph, removed: dict[str, list[int]]) -> None:
    # A mixed graph without residual branches (a network with no residual addition) is the tied
    # graph: its history stays a version-1 history.
    mixed = graph.residual == "mixed" and bool(graph.branch_names or graph.zero_outputs)
    record = model.__dict__.get(HISTORY_ATTR)
    if record is None:
        record = {
            "version": HISTORY_VERSION,
            "model": type(model).__name__,
            "input_shapes": [list(s) for s in graph.input_shapes],
            "input_dtypes": list(graph.input_dtypes),
            "ignore": list(graph.ignore),
            "steps": [],
        }
        if mixed:
            record.update(version=MIXED_HISTORY_VERSION, residual="mixed")
        _set_history(model, record)
    elif mixed and record.get("residual", "tied") != "mixed":
        raise ValueError(
            "graph: built with residual='mixed', but the model's earlier pruning steps used residual='tied'; "
            "keep one residual mode for a model (or rebuild it with replay)"
        )
    record["steps"].append(removed)


def _set_history(model: nn.Module, record: dict[str, Any]) -> None:
    if HISTORY_ATTR in model._modules or HISTORY_ATTR in model._parameters or HISTORY_ATTR in model._buffers:
        raise ValueError(f"model has a submodule, parameter or buffer named {HISTORY_ATTR!r}; rename it")
    if HISTORY_ATTR not in model.__dict__:
        model.register_state_dict_post_hook(_HistoryInStateDict())
    if not pruned_loading_enabled(model):  # so that it loads its own state dicts
        enable_pruned_loading(model)
    model.__dict__[HISTORY_ATTR] = record


def _optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    items = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    for opt in items:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, a list of them or None, got {type(opt).__name__}")
    return items


def _param_dims(kind: str, depthwise: bool, param: str) -> dict[int, str]:
    """Which dimension of a layer parameter follows which cut dimension."""
    if kind == "norm" or depthwise:
        return {0: "channel"}
    if param == "weight":
        return {0: "out", 1: "in"}
    return {0: "out"}


@torch.no_grad()
def shrink(
    model: nn.Module,
    masks: Mapping[str, Any],
    *,
    graph: ChannelGraph | None = None,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
) -> ChannelGraph:
    """Remove, in place, the channels that ``masks`` drop; return the graph of the shrunk model.

    Args:
        model: the network (gates must be detached).
        masks: ``{group name: bool keep-mask (size,)}``; groups not given keep every channel.
            Every group must keep at least one channel, except the branch groups of a graph
            built with ``residual="mixed"``: a branch that keeps no channel is removed (its
            layers become :class:`~lightning_prune.core.residual.RemovedLayer` stand-ins, their
            parameters leave the optimizers), and a branch keeping fewer channels than its
            stream has its last layer scattered into the stream's channels (see
            :mod:`lightning_prune.core.residual`).
        graph: the model's current channel graph; built from ``example_input`` when ``None``.
        example_input: needed only when ``graph`` is ``None``.
        optimizer: optimizer(s) over the model's parameters; their per-parameter state is
            sliced like the parameters (parameters keep their identity).

    Returns:
        The :class:`ChannelGraph` of the shrunk model (no new tracing), for further gating,
        cost counting or shrinking.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if attached_gates(model) is not None:
        raise ValueError("model has gates attached; take their masks (GateSet.alive()) and detach them before shrink")
    optimizers = _optimizers(optimizer)
    if graph is None:
        if example_input is None:
            raise ValueError("shrink needs graph= (from build_graph) or example_input= to build one")
        graph = build_graph(model, example_input)
    elif not isinstance(graph, ChannelGraph):
        raise TypeError(f"graph must be a ChannelGraph or None, got {type(graph).__name__}")
    graph.check_model(model)
    masks = graph.check_masks(masks)
    removed = graph.removed_positions(masks)
    modules = dict(model.named_modules())

    # Every affected parameter: its dims -> kept indices, and its shape before pruning.
    plan: dict[str, list[tuple[str, nn.Parameter, dict[int, Tensor]]]] = {}
    for module_name in dict.fromkeys(name for name, _ in removed):
        layer, module = graph.layers[module_name], modules[module_name]
        keep = {}
        for role in ("out", "in", "channel"):
            n = layer.in_channels if role == "in" else layer.out_channels
            k = torch.ones(n, dtype=torch.bool)
            k[removed.get((module_name, role), [])] = False
            keep[role] = torch.nonzero(k).flatten()
        entries = []
        for pname, p in module.named_parameters(recurse=False):
            dims = {d: keep[role] for d, role in _param_dims(layer.kind, layer.depthwise, pname).items()}
            entries.append((pname, p, dims))
        plan[module_name] = entries

    for (module_name, role), positions in removed.items():
        _HANDLERS[(graph.layers[module_name].kind, role)](modules[module_name], positions)

    new_graph = graph.shrunk(masks)
    # Mixed-connectivity residual blocks: removed branches, and the branches' placement in their streams.
    gone = graph.removed_layers(masks) if graph.branch_names else set()
    dropped: set[int] = set()
    for module_name in sorted(gone):
        module = modules[module_name]
        dropped.update(id(p) for p in module.parameters())
        width = new_graph.groups[new_graph.zero_outputs[module_name]].size if module_name in new_graph.zero_outputs else None
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, RemovedLayer.replacing(module, width))
    if graph.branch_names or graph.zero_outputs:
        modules = dict(model.named_modules())
        for group in new_graph.groups.values():
            if group.is_branch:
                width = new_graph.groups[group.stream].size
                if group.into == tuple(range(width)):
                    unscatter_output(modules[group.branch_output])
                else:
                    scatter_output(modules[group.branch_output], list(group.into), width)
        for module_name, stream in new_graph.zero_outputs.items():
            modules[module_name].width = new_graph.groups[stream].size

    states = [opt.state for opt in optimizers]
    replaced: dict[int, nn.Parameter] = {}
    for module_name, entries in plan.items():
        module = modules[module_name]
        for pname, old, dims in entries:
            pruned = getattr(module, pname)
            # A new leaf: autograd keeps per-parameter metadata (the shape) in its gradient
            # accumulator, which any graph still alive from before the shrink would reuse.
            fresh = nn.Parameter(pruned.detach(), requires_grad=old.requires_grad)
            if pruned.grad is not None and pruned.grad.shape == fresh.shape:
                fresh.grad = pruned.grad.detach()
            setattr(module, pname, fresh)
            replaced[id(old)] = fresh
            for state in states:
                if old not in state:
                    continue
                sliced = {}
                for key, value in state.pop(old).items():
                    if isinstance(value, Tensor) and value.shape == old.shape and value.dim() > 0:
                        for dim, index in dims.items():
                            value = value.index_select(dim, index.to(value.device))
                        if value.shape != fresh.shape:
                            raise RuntimeError(f"internal: optimizer state {key!r} of {module_name}.{pname} mis-sliced")
                    sliced[key] = value
                state[fresh] = sliced
    for opt in optimizers:
        for group in opt.param_groups:
            if dropped:  # the parameters of removed branches leave the optimizer, with their state
                for p in group["params"]:
                    if id(p) in dropped:
                        opt.state.pop(p, None)
            group["params"] = [replaced.get(id(p), p) for p in group["params"] if id(p) not in dropped]

    new_graph.check_model(model)
    step = {name: torch.nonzero(~m).flatten().tolist() for name, m in masks.items() if not bool(m.all())}
    _record_step(model, graph, step)
    return new_graph


def replay(model: nn.Module, history: Mapping[str, Any], *, graph: ChannelGraph | None = None) -> ChannelGraph:
    """Apply a pruning ``history`` (from :func:`pruning_history`) to a fresh, unpruned ``model``
    of the same architecture; return its channel graph. Steps already recorded on ``model``
    (a prefix of ``history``) are skipped."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(history, Mapping) or "steps" not in history or "input_shapes" not in history:
        raise ValueError("history must be a pruning history (a mapping with 'steps' and 'input_shapes')")
    if history.get("version") not in HISTORY_VERSIONS:
        raise ValueError(
            f"history: unsupported version {history.get('version')!r} (this reads versions "
            f"{', '.join(map(str, HISTORY_VERSIONS))})"
        )
    steps = list(history["steps"])
    done = (pruning_history(model) or {}).get("steps", [])
    if done != steps[: len(done)]:
        raise ValueError("model has a pruning history that is not a prefix of history; start from a fresh model")
    if graph is None:
        graph = build_graph(model, zero_inputs(history), ignore=history.get("ignore", ()), residual=history.get("residual", "tied"))
    for i, step in enumerate(steps[len(done) :], start=len(done)):
        graph = shrink(model, step_masks(graph, step, i, "the model"), graph=graph)
    if history.get(CREATED_BIASES):  # biases that lightning_prune.core.folding created: recreate them
        graph = restore_created_biases(model, history, graph)
    return graph


def step_masks(graph: ChannelGraph, step: Mapping[str, Any], i: int, what: str) -> dict[str, Tensor]:
    """The keep-masks of history step ``i`` (``{group: removed indices}``) on ``graph``."""
    masks = {}
    for name, idx in step.items():
        if name not in graph.groups:
            raise ValueError(f"history step {i}: {what} has no channel group {name!r}; is it the same architecture?")
        m = torch.ones(graph.groups[name].size, dtype=torch.bool)
        m[torch.as_tensor(idx, dtype=torch.long)] = False
        masks[name] = m
    return masks


def replayed_graph(graph: ChannelGraph, history: Mapping[str, Any]) -> ChannelGraph:
    """The graph of a model that ``history`` shrank, from ``graph`` (of the same model before
    those steps), without tracing: each step's masks applied to the graph data, and the biases
    that folding created marked."""
    for i, step in enumerate(history.get("steps", [])):
        graph = graph.shrunk(step_masks(graph, step, i, "the graph"))
    names = [n for n in history.get(CREATED_BIASES) or [] if n in graph.layers]
    if names:
        graph = replace(graph, layers={**graph.layers, **{n: replace(graph.layers[n], bias=True) for n in names}})
    return graph


def zero_bias(weight: Tensor) -> nn.Parameter:
    """A zero bias for a layer with this ``weight`` (same dtype, device and ``requires_grad``)."""
    zeros = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return nn.Parameter(zeros, requires_grad=weight.requires_grad)


def restore_created_biases(model: nn.Module, history: Mapping[str, Any], graph: ChannelGraph) -> ChannelGraph:
    """Create (zeros) the biases that :func:`lightning_prune.core.folding.shrink_as_masked` created,
    as recorded in ``history``, on a model rebuilt by :func:`replay` (the values come with its state dict);
    return ``graph`` with those layers marked as having a bias."""
    names = history.get(CREATED_BIASES) or []
    if not names:
        return graph
    modules = dict(model.named_modules())
    layers = dict(graph.layers)
    for name in names:
        module = modules.get(name)
        if not isinstance(module, (_ConvNd, nn.Linear)):
            raise ValueError(
                f"history: {CREATED_BIASES} names {name!r}, which is not a convolution or linear layer of the model"
            )
        if module.bias is None:
            module.bias = zero_bias(module.weight)
        if name in layers:
            layers[name] = replace(layers[name], bias=True)
    record = pruning_history(model)
    if record is not None and record is not history:
        record[CREATED_BIASES] = list(names)
    return replace(graph, layers=layers)


class _ReplayHistories:
    """Load pre-hook of :func:`enable_pruned_loading` (a class, so that modules carrying it
    can be pickled, e.g. by ``strategy="ddp_spawn"``)."""

    def __call__(self, mod: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix) and k.endswith(HISTORY_KEY)]:
            path = key[len(prefix) : -len(HISTORY_KEY)].rstrip(".")
            try:
                target = mod.get_submodule(path) if path else mod
            except AttributeError:
                continue  # not ours to replay: torch reports the key as unexpected
            history = state_dict[key]
            if not isinstance(history, Mapping):
                raise ValueError(f"load_state_dict: {key!r} is not a pruning history")
            steps = list(history.get("steps", []))
            done = (pruning_history(target) or {}).get("steps", [])
            if done == steps[: len(done)]:
                if len(done) < len(steps):
                    replay(target, history)
            else:  # pruned otherwise already: the tensors' shapes decide whether they fit
                _set_history(target, copy.deepcopy(dict(history)))


def _expect_histories(module: nn.Module, incompatible_keys: Any) -> None:
    """Load post-hook: pruning histories are read by the pre-hook, not "unexpected" keys."""
    incompatible_keys.unexpected_keys[:] = [k for k in incompatible_keys.unexpected_keys if not k.endswith(HISTORY_KEY)]


def enable_pruned_loading(module: nn.Module) -> RemovableHandle:
    """Make ``module.load_state_dict`` accept a state dict of a shrunk copy of it.

    A load pre-hook looks for pruning histories in the incoming state dict (keys ending in
    ``lightning_prune_history``) and replays each onto the corresponding submodule before the
    tensors are copied. Registering it twice is harmless. Returns the hook handle.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    module.register_load_state_dict_post_hook(_expect_histories)
    return module.register_load_state_dict_pre_hook(_ReplayHistories())


def pruned_loading_enabled(module: nn.Module) -> bool:
    """Whether :func:`enable_pruned_loading` was called on ``module``."""
    return any(isinstance(getattr(h, "hook", h), _ReplayHistories) for h in module._load_state_dict_pre_hooks.values())
