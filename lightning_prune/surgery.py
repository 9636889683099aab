"""Physical removal of channels, with a replayable pruning history.

``shrink(model, masks)`` removes the channels that ``masks`` drop from every layer of their
group, in place, using Torch-Pruning's per-layer pruning functions (the handler table of
``torch_pruning.pruner.function``) on the positions recorded in the
:class:`~lightning_prune.graph.ChannelGraph`. The graph, the gates and the cost model all read
the same positions, so "masked == shrunk" and "exact cost == measured cost" hold by
construction (and are tested).

Why not ``Group.prune()`` of Torch-Pruning directly: it needs a live, traced dependency graph
(tracing again after every shrink), and it replaces every pruned ``nn.Parameter`` by a new
object, which silently detaches the parameters from any optimizer. Here every pruned parameter
becomes a new leaf tensor that takes the old one's place in the module *and* in the given
optimizers' parameter groups, and the optimizer's per-parameter state
(``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``, ... -- every state tensor shaped like the
parameter) is sliced with the same indices, so training continues where it was.

The history (plain data: lists, dicts, ints, strings) is kept in a ``PruningHistory``
submodule of the model named ``lightning_prune_history``; it is saved in the model's
``state_dict`` as extra state, so any checkpoint of a shrunk model carries it.
:func:`replay` applies it to a fresh instance of the architecture, and
:func:`enable_pruned_loading` makes ``load_state_dict`` do that by itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torch_pruning.pruner import function as tpf

from lightning_prune.gating import attached_gates
from lightning_prune.graph import ChannelGraph, build_graph

__all__ = ["PruningHistory", "shrink", "replay", "pruning_history", "enable_pruned_loading", "HISTORY_ATTR"]

HISTORY_ATTR = "lightning_prune_history"
HISTORY_VERSION = 1

# Torch-Pruning handler per (layer kind, cut dimension).
_HANDLERS = {
    ("conv", "out"): tpf.prune_conv_out_channels,
    ("conv", "in"): tpf.prune_conv_in_channels,
    ("conv", "channel"): tpf.prune_depthwise_conv_out_channels,
    ("linear", "out"): tpf.prune_linear_out_channels,
    ("linear", "in"): tpf.prune_linear_in_channels,
    ("norm", "channel"): tpf.prune_batchnorm_out_channels,
}


class PruningHistory(nn.Module):
    """Holds the pruning history of its parent module as extra state (saved in ``state_dict``).

    ``record`` is plain data::

        {"version": 1, "model": class name, "input_shapes": [[1, 3, 32, 32]],
         "input_dtypes": ["float32"], "ignore": [module names],
         "steps": [{group name: [removed channel indices], ...}, ...]}

    Indices of step ``k`` refer to the model as it was after steps ``0 .. k-1``.
    """

    def __init__(self, record: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.record: dict[str, Any] = record if record is not None else {}

    @property
    def steps(self) -> list[dict[str, list[int]]]:
        return self.record.get("steps", [])

    def get_extra_state(self) -> dict[str, Any]:
        return self.record

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.record = state

    def extra_repr(self) -> str:
        return f"steps={len(self.steps)}"


def pruning_history(model: nn.Module) -> dict[str, Any] | None:
    """The pruning history recorded on ``model`` by :func:`shrink` (plain data), or ``None``."""
    holder = getattr(model, HISTORY_ATTR, None)
    return holder.record if isinstance(holder, PruningHistory) else None


def _record_step(model: nn.Module, graph: ChannelGraph, removed: dict[str, list[int]]) -> None:
    holder = getattr(model, HISTORY_ATTR, None)
    if holder is None:
        holder = PruningHistory(
            {
                "version": HISTORY_VERSION,
                "model": type(model).__name__,
                "input_shapes": [list(s) for s in graph.input_shapes],
                "input_dtypes": list(graph.input_dtypes),
                "ignore": list(graph.ignore),
                "steps": [],
            }
        )
        model.add_module(HISTORY_ATTR, holder)
    elif not isinstance(holder, PruningHistory):
        raise ValueError(f"model has an attribute {HISTORY_ATTR!r} that is not a PruningHistory")
    holder.record["steps"].append(removed)


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
            Every group must keep at least one channel.
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
            group["params"] = [replaced.get(id(p), p) for p in group["params"]]

    new_graph = graph.shrunk(masks)
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
    if history.get("version") != HISTORY_VERSION:
        raise ValueError(f"history: unsupported version {history.get('version')!r} (this is version {HISTORY_VERSION})")
    steps = list(history["steps"])
    done = (pruning_history(model) or {}).get("steps", [])
    if done != steps[: len(done)]:
        raise ValueError("model has a pruning history that is not a prefix of history; start from a fresh model")
    if graph is None:
        dtypes = history.get("input_dtypes") or ["float32"] * len(history["input_shapes"])
        example = tuple(torch.zeros(s, dtype=getattr(torch, d)) for s, d in zip(history["input_shapes"], dtypes))
        graph = build_graph(model, example, ignore=history.get("ignore", ()))
    for i, step in enumerate(steps[len(done) :], start=len(done)):
        masks = {}
        for name, idx in step.items():
            if name not in graph.groups:
                raise ValueError(f"history step {i}: the model has no channel group {name!r}; is it the same architecture?")
            m = torch.ones(graph.groups[name].size, dtype=torch.bool)
            m[torch.as_tensor(idx, dtype=torch.long)] = False
            masks[name] = m
        graph = shrink(model, masks, graph=graph)
    return graph


def enable_pruned_loading(module: nn.Module) -> RemovableHandle:
    """Make ``module.load_state_dict`` accept a state dict of a shrunk copy of it.

    A load pre-hook looks for pruning histories in the incoming state dict (keys ending in
    ``lightning_prune_history._extra_state``) and replays each onto the corresponding
    submodule before the tensors are copied. Returns the hook handle.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    suffix = f"{HISTORY_ATTR}._extra_state"

    def hook(mod, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        for key in [k for k in state_dict if k.startswith(prefix) and k.endswith(suffix)]:
            path = key[len(prefix) : -len(suffix)].rstrip(".")
            target = mod.get_submodule(path) if path else mod
            done = (pruning_history(target) or {}).get("steps", [])
            if done != list(state_dict[key].get("steps", [])):
                replay(target, state_dict[key])

    return module.register_load_state_dict_pre_hook(hook)
