"""Hard pruning that computes exactly what the masked network computes.

A 0/1 gate zeroes a removed channel at its gate site (see
:class:`lightning_prune.core.graph.ChannelGroup`); :func:`lightning_prune.core.surgery.shrink` instead
drops the channel from every layer of its group, in particular from the convolution and
linear layers that read it (the group's ``"in"`` members, the *consumers*). The two agree
when every operation between a gate site and a consumer maps 0 to 0 (ReLU, pooling, addition,
concatenation, flatten, dropout). An operation that does not (a Sigmoid: 0 -> 0.5, ``x + c``,
``cos``...) makes the masked network feed a non-zero value into the consumer where the shrunk
network feeds nothing, so the exported network would silently compute something else.

:func:`shrink_as_masked` removes the channels like ``shrink`` and keeps the function of the
masked network:

1. it runs the masked network (``FixedMask`` gates, eval mode) on an example batch and
   records, at the input of every consumer, the values that the removed channels carry;
2. a removed channel that carries the same value ``c`` everywhere (over the batch and the
   positions of a convolution's input) adds a constant to the consumer's output: ``W[:, k] * c``
   for a linear layer, ``c * W[:, k].sum()`` over the kernel for a convolution that does not
   pad its input with zeros. That constant is folded into the consumer's bias (created when the
   layer has none; the created biases are recorded in the pruning history, so
   :func:`lightning_prune.core.surgery.replay` recreates them). A convolution that pads with zeros
   sees the constant only away from the borders, and a value that varies cannot be folded into
   a bias at all: then nothing is removed and a ``ValueError`` names the group, the consumer
   and the operations between the gate site and the consumer, and suggests ``ignore=``;
3. it shrinks, folds, and checks on the same batch that the shrunk network's output equals the
   masked network's (relative tolerance 1e-4), raising a ``ValueError`` if not (e.g. a mean over
   channels, or the number of channels, used between the gates and the next layer).

Equality is that of eval mode (a dropout between a gate and a consumer makes the masked
network's training-mode contribution random around the folded constant).

The check runs the masked and the shrunk network once each on two example samples (eval mode,
no gradients); in a ReLU network the removed channels carry zeros and nothing is folded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lightning_prune.core.cost.measure import check_example
from lightning_prune.core.gates import FixedMask
from lightning_prune.core.gating import GateSet, attach_gates, attached_gates
from lightning_prune.core.graph import ChannelGraph
from lightning_prune.core.surgery import CREATED_BIASES, pruning_history, restore_created_biases, shrink, zero_bias

# restore_created_biases and CREATED_BIASES live in surgery (replay needs them); re-exported here.
__all__ = ["shrink_as_masked", "restore_created_biases", "CREATED_BIASES"]

RTOL = 1e-4  # masked vs shrunk output, relative to the largest output magnitude
CONSTANT_RTOL = 1e-5  # a removed channel's values count as one constant within this


@torch.no_grad()
def shrink_as_masked(
    model: nn.Module,
    masks: Mapping[str, Any],
    *,
    graph: ChannelGraph,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
) -> ChannelGraph:
    """Remove, in place, the channels that ``masks`` drop, so that the shrunk ``model``
    computes what ``model`` masked with ``masks`` (``FixedMask`` gates) computes; return the
    graph of the shrunk model (see the module docstring).

    Args:
        model: the network (gates must be detached), unshrunk, as ``graph`` describes it.
        masks: ``{group name: bool keep-mask (size,)}`` as for
            :func:`lightning_prune.core.surgery.shrink`.
        graph: the model's current channel graph.
        example_input: the batch on which the removed channels' values are recorded and the
            outputs compared (eval mode); at least two samples, so that a value that varies
            over the batch is seen to vary. Default: two random samples (standard normal for
            floating-point inputs, zeros and ones for others) with the shapes and dtypes
            the graph was built with.
        optimizer: optimizer(s) over the model's parameters, as for ``shrink``; a bias
            created by folding joins the parameter group of its layer's weight.

    Raises:
        ValueError: a removed channel's contribution cannot be folded (the model is left
            unchanged), or the shrunk output differs from the masked one (the model is left
            shrunk); the message names the group, the layer and the operations involved.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(graph, ChannelGraph):
        raise TypeError(f"graph must be a ChannelGraph (from build_graph), got {type(graph).__name__}")
    if attached_gates(model) is not None:
        raise ValueError("model has gates attached; take their masks (GateSet.alive()) and detach them first")
    graph.check_model(model)
    masks = graph.check_masks(masks)
    pruned = {name: m for name, m in masks.items() if not bool(m.all())}
    if not pruned:
        return shrink(model, masks, graph=graph, optimizer=optimizer)
    batches = _batches(model, graph, example_input)
    removed = graph.removed_positions(masks)
    consumers = {name: pos for (name, role), pos in removed.items() if role == "in"}
    modules = dict(model.named_modules())

    was_training = model.training
    model.eval()
    try:
        stats, masked = _masked_pass(model, graph, pruned, batches, consumers, modules)
        deltas, problems = _fold(graph, pruned, consumers, modules, stats)
        if problems:
            raise ValueError(_explain(model, graph, pruned, batches, problems))
        new_graph = shrink(model, masks, graph=graph, optimizer=optimizer)
        new_graph = _apply(model, new_graph, removed, deltas, modules, optimizer)
        _verify(model, batches, masked, pruned)
    finally:
        model.train(was_training)
    return new_graph


# -- example batch -------------------------------------------------------------------------


def _batches(model: nn.Module, graph: ChannelGraph, example_input: Any) -> list[tuple[Tensor, ...]]:
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")

    def place(t: Tensor) -> Tensor:
        if t.is_floating_point() and ref is not None and ref.is_floating_point():
            return t.to(device=device, dtype=ref.dtype)
        return t.to(device)

    if example_input is not None:
        return [tuple(place(t.detach()) for t in check_example(example_input))]
    generator = torch.Generator().manual_seed(0)  # never the global generator: training's RNG stream stays as it was
    batches = []
    for k in range(2):
        batch = []
        for shape, dtype_name in zip(graph.input_shapes, graph.input_dtypes):
            dtype = getattr(torch, dtype_name)
            if dtype.is_floating_point:
                t = torch.randn(shape, generator=generator, dtype=dtype)
            else:
                t = torch.full(shape, k, dtype=dtype)
            batch.append(place(t))
        batches.append(tuple(batch))
    return batches


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _attach_masks(model: nn.Module, graph: ChannelGraph, pruned: Mapping[str, Tensor]) -> GateSet:
    return attach_gates(model, graph, {name: FixedMask(m) for name, m in pruned.items()})


# -- recording the removed channels' values at the consumers ---------------------------------


def _selected(module: nn.Module, x: Tensor, index: Tensor) -> Tensor:
    """``x`` at the removed input positions ``index``: ``(values, len(index))``, one column per position."""
    if isinstance(module, _ConvNd):
        return x.index_select(1, index).movedim(1, -1).reshape(-1, index.numel())
    return x.index_select(-1, index).reshape(-1, index.numel())


def _masked_pass(model, graph, pruned, batches, consumers, modules):
    """Run the masked network on ``batches``; return ``{consumer: (low, high)}`` of the values the
    removed input positions carry (float64, one entry per position) and the outputs."""
    stats: dict[str, list[Tensor]] = {}
    index = {name: torch.tensor(pos, dtype=torch.long) for name, pos in consumers.items()}

    def make(name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, Tensor):
                raise TypeError(f"layer {name!r} was called without a tensor as first argument")
            values = _selected(module, x, index[name].to(x.device)).double()
            low, high = values.amin(0).cpu(), values.amax(0).cpu()
            if name in stats:
                low, high = torch.minimum(stats[name][0], low), torch.maximum(stats[name][1], high)
            stats[name] = [low, high]

        return pre_hook

    gates = _attach_masks(model, graph, pruned)
    handles = [modules[name].register_forward_pre_hook(make(name)) for name in consumers]
    try:
        outputs = [[t.detach().clone() for t in _tensors(model(*batch))] for batch in batches]
    finally:
        for h in handles:
            h.remove()
        gates.detach()
    return {name: (low, high) for name, (low, high) in stats.items()}, outputs


def _pads_with_zeros(conv: _ConvNd) -> bool:
    if conv.padding_mode != "zeros":
        return False  # reflect / replicate / circular padding repeats the constant
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(d * (k - 1) > 0 for d, k in zip(conv.dilation, conv.kernel_size))
    return any(p > 0 for p in conv.padding)


def _fold(graph, pruned, consumers, modules, stats):
    """Per consumer, the constant its removed inputs add to its output (``{name: (out,) float64}``),
    and the contributions that cannot be folded: ``[(group, consumer, reason)]``."""
    deltas: dict[str, Tensor] = {}
    problems: list[tuple[str, str, str]] = []
    position_of = {name: {p: i for i, p in enumerate(pos)} for name, pos in consumers.items()}
    for name, pos in consumers.items():
        if name not in stats:
            continue  # not called on this batch (another branch): nothing to fold; the output check still applies
        low, high = stats[name]
        scale = torch.maximum(low.abs(), high.abs()).clamp_min(1.0)
        constant = torch.isfinite(low) & torch.isfinite(high) & ((high - low) <= CONSTANT_RTOL * scale)
        nonzero = ~constant | (low != 0)
        if not bool(nonzero.any()):
            continue  # the common case: the removed channels carry zeros (ReLU, pooling, ...)
        module = modules[name]
        pads = isinstance(module, _ConvNd) and _pads_with_zeros(module)
        unfoldable = nonzero & (~constant if not pads else torch.ones_like(constant))
        if not bool(unfoldable.any()):
            weight = module.weight.detach().double().cpu()
            if isinstance(module, _ConvNd):
                weight = weight.sum(dim=tuple(range(2, weight.dim())))
            deltas[name] = weight[:, torch.tensor(pos, dtype=torch.long)] @ torch.where(constant, low, 0.0)
            continue
        for group_name in pruned:
            keep = pruned[group_name].tolist()
            for member in graph.groups[group_name].members:
                if member.module != name or member.role != "in":
                    continue
                mine = [position_of[name][p] for p, c in zip(member.positions, member.channels) if not keep[c]]
                bad = [i for i in mine if bool(unfoldable[i])]
                if not bad:
                    continue
                i = bad[0]
                if not bool(constant[i]):
                    reason = (
                        f"they carry values that vary over the example batch and positions (from "
                        f"{float(low[i]):.4g} to {float(high[i]):.4g}) into {name!r}, so their contribution is "
                        "not a constant that a bias could hold"
                    )
                else:
                    reason = (
                        f"they carry the constant {float(low[i]):.4g} into {name!r}, which pads its input with "
                        f"zeros (padding={module.padding}), so their contribution differs at the borders and "
                        "cannot be folded into its bias"
                    )
                problems.append((group_name, name, reason))
    return deltas, problems


# -- naming what lies between the gates and a consumer ---------------------------------------


def _label(fn: Any, owners: Mapping[Any, str]) -> str:
    if fn in owners:
        return owners[fn]
    return re.sub(r"Backward\d*$", "", fn.name()).lower() or fn.name()


def _ops_between(model, graph, pruned, batches, group_name: str, consumer: str) -> list[str]:
    """The operations (autograd nodes; modules where one produced the node) on the paths from
    the gate sites of ``group_name`` to the input of ``consumer``, in forward order."""
    modules = dict(model.named_modules())
    sites = set(graph.groups[group_name].gate_sites)
    site_fns: set = set()
    owners: dict[Any, str] = {}
    starts: list = []

    def on_site(_module, _args, out) -> None:
        if isinstance(out, Tensor) and out.grad_fn is not None:
            site_fns.add(out.grad_fn)

    def on_leaf(name: str):
        def hook(module, _args, out) -> None:
            if isinstance(out, Tensor) and out.grad_fn is not None and out.grad_fn not in owners:
                owners[out.grad_fn] = f"module {name!r} ({type(module).__name__})"

        return hook

    def on_consumer(_module, args) -> None:
        if args and isinstance(args[0], Tensor) and args[0].grad_fn is not None:
            starts.append(args[0].grad_fn)

    gates = _attach_masks(model, graph, pruned)  # its hooks run first: the site hooks see gated outputs
    handles = [modules[s].register_forward_hook(on_site) for s in sites]
    leaves = [(n, m) for n, m in modules.items() if n and n != consumer and next(m.children(), None) is None]
    handles += [m.register_forward_hook(on_leaf(n)) for n, m in leaves]
    handles.append(modules[consumer].register_forward_pre_hook(on_consumer))
    try:
        with torch.enable_grad():
            inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in batches[0]]
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        gates.detach()
    # Nodes from which a site is reachable, walking from the consumer's input towards the inputs.
    reaches: dict[Any, bool] = {}
    for start in starts:
        stack = [(start, False)]
        while stack:
            fn, expanded = stack.pop()
            if fn in reaches and not expanded:
                continue
            if fn in site_fns:
                reaches[fn] = True
                continue
            nexts = [n for n, _ in fn.next_functions if n is not None]
            if not expanded:
                reaches[fn] = False  # provisional (breaks cycles, which autograd graphs do not have)
                stack.append((fn, True))
                stack.extend((n, False) for n in nexts if n not in reaches)
            else:
                reaches[fn] = any(reaches.get(n, False) for n in nexts)
    on_path = [fn for fn, ok in reaches.items() if ok and fn not in site_fns]
    on_path.sort(key=lambda fn: fn._sequence_nr() if hasattr(fn, "_sequence_nr") else 0)
    return list(dict.fromkeys(_label(fn, owners) for fn in on_path))


def _explain(model, graph, pruned, batches, problems) -> str:
    group_name, consumer, reason = problems[0]
    sites = ", ".join(repr(s) for s in graph.groups[group_name].gate_sites)
    try:
        ops = _ops_between(model, graph, pruned, batches, group_name, consumer)
    except Exception:  # naming is a courtesy: never hide the real error behind a diagnostic failure
        ops = []
    if not ops:
        through = "an operation that does not map 0 to 0"
    elif len(ops) == 1:
        through = f"{ops[0]}, which does not map 0 to 0"
    else:
        through = f"{', '.join(ops)}, which do not all map 0 to 0"
    more = ""
    others = sorted({g for g, _, _ in problems[1:]} - {group_name})
    if others:
        more = f" (the same holds for group(s) {', '.join(map(repr, others))})"
    return (
        f"cannot remove the pruned channels of group {group_name!r} exactly: the path from its gate at {sites} to "
        f"the layer {consumer!r} that reads them goes through {through}; {reason}. The shrunk network would "
        f"compute something else than the masked one{more}. Pass ignore=[{group_name!r}] (to build_graph / the "
        "pruning callback) to leave these channels unpruned, or use an operation that maps 0 to 0 there "
        "(ReLU, ELU, tanh, ...)"
    )


# -- folding and checking ------------------------------------------------------------------


def _bias_of(module: nn.Module, name: str, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> Tensor:
    """The layer's bias, created (zeros) when it has none: the creation is recorded in the
    pruning history and the bias joins the optimizer group of the layer's weight."""
    if module.bias is not None:
        return module.bias
    weight = module.weight
    module.bias = zero_bias(weight)
    for opt in optimizers:
        for group in opt.param_groups:
            if any(p is weight for p in group["params"]):
                group["params"].append(module.bias)
    record = pruning_history(model)
    if record is not None:
        created = record.setdefault(CREATED_BIASES, [])
        if name not in created:
            created.append(name)
    return module.bias


def _apply(model, graph, removed, deltas, modules, optimizer) -> ChannelGraph:
    if not deltas:
        return graph
    optimizers = [] if optimizer is None else list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    layers = dict(graph.layers)
    for name, delta in deltas.items():
        module = modules[name]
        keep = torch.ones(delta.numel(), dtype=torch.bool)
        keep[removed.get((name, "out"), [])] = False
        bias = _bias_of(module, name, model, optimizers)
        bias.add_(delta[keep].to(device=bias.device, dtype=bias.dtype))
        layers[name] = replace(layers[name], bias=True)
    return replace(graph, layers=layers)


def _verify(model: nn.Module, batches, masked: list[list[Tensor]], pruned: Mapping[str, Tensor]) -> None:
    for batch, expected in zip(batches, masked):
        got = [t.detach() for t in _tensors(model(*batch))]
        if len(got) != len(expected) or any(a.shape != b.shape for a, b in zip(got, expected)):
            raise ValueError("the shrunk network's outputs do not have the masked network's shapes")
        floats = [(a, b) for a, b in zip(got, expected) if b.is_floating_point()]
        if any(not torch.equal(a, b) for a, b in zip(got, expected) if not b.is_floating_point()):
            raise ValueError("the shrunk network's (non-floating-point) outputs differ from the masked network's")
        if not floats:
            continue
        scale = max(float(b.abs().max()) if b.numel() else 0.0 for _, b in floats)
        error = max(float((a - b).abs().max()) if b.numel() else 0.0 for a, b in floats)
        eps = max(torch.finfo(b.dtype).eps for _, b in floats)
        tolerance = max(RTOL, 100 * eps) * max(scale, 1e-6)
        if not error <= tolerance:
            raise ValueError(
                f"the shrunk network computes something else than the masked one on the example batch (largest "
                f"difference {error:.3g}, outputs up to {scale:.3g}): some operation between the gates and the "
                "layers reading the pruned channels depends on them in a way that removing them cannot reproduce "
                "(e.g. a mean over channels, or the number of channels). Pruned groups: "
                f"{', '.join(map(repr, pruned))}; pass ignore= (to build_graph / the pruning callback) for the "
                "group(s) whose channels reach such an operation"
            )
