"""Building a channel graph: trace a network with Torch-Pruning and turn its groups into data.

``build_graph(model, example_input)`` traces ``model`` once with Torch-Pruning's
``DependencyGraph`` and turns its pruning groups into the plain, picklable
:class:`~lightning_prune.core.graph.ChannelGraph` (see :mod:`lightning_prune.core.graph` for
what a group, a member and a gate site are). This module and the per-layer pruning functions
of :mod:`lightning_prune.core.surgery` are the only places that import ``torch_pruning``, and
they use its public API only.

Groups that are never pruned (``ChannelGraph.excluded``, with the reason): groups whose
channels are an output of the model (classifier heads, found automatically), groups that
contain an output-channel layer listed in ``ignore=``, and groups that touch a grouped
convolution (``1 < groups`` and not depthwise: removing arbitrary channels would break its
equal-size groups). A group that reaches any other parametrised layer type (LayerNorm,
GroupNorm, PReLU, LSTM, a raw ``nn.Parameter``, a transposed convolution...) raises a
``TypeError`` naming the module and its type, because masking its channels is not
equivalent to removing them or its cost cannot be counted; ``ignore=`` the group's layer to
leave those channels alone.

Every module with parameters of its own must be reached by the example's forward pass (its
forward runs, or autograd reaches one of its parameters from the output): a layer that the
trace never reached (the other side of a data-dependent ``if``, an auxiliary head used only
in training, a layer used only in eval or by another method) reads channels that no group
knows about, so pruning would leave it with the wrong input width and the network would
crash later with a raw shape error. ``build_graph`` raises a ``ValueError`` naming them. List
them in ``ignore=`` to accept them as they are: an ignored module that the trace never
reached is never pruned and its parameters are never touched, but since no group knows
which channels it reads, the channels feeding it *are* pruned as if it did not exist -- it
must not run on the pruned network (drop it, or also ``ignore=`` the layers producing its
input so that those channels stay). They are listed in ``ChannelGraph.unreached``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_prune.core.cost.measure import CostReport, check_example, count_cost, forward_with_hooks
from lightning_prune.core.gating import attached_gates
from lightning_prune.core.residual import uses_mixed_modules
from lightning_prune.core.graph import (
    COSTS,
    RESIDUAL_MODES,
    ROLES,
    ChannelGraph,
    ChannelGroup,
    LayerInfo,
    Member,
    layer_kind,
    layer_sizes,
)

__all__ = ["build_graph"]

# The node type Torch-Pruning (>= 1.5.3) gives the model's output; earlier versions have no
# such node, and a head is recognised by its autograd output or its lack of successors.
OUTPUT_NODE_TYPE = getattr(tp.ops.OPTYPE, "OUTPUT", None)
ELEMENTWISE = tp.ops.OPTYPE.ELEMENTWISE


def _resolve_ignore(model: nn.Module, ignore: Iterable[nn.Module | str], names: dict[nn.Module, str]) -> set[str]:
    if isinstance(ignore, (str, nn.Module)):
        ignore = [ignore]
    try:
        items = list(ignore)
    except TypeError:
        raise TypeError(f"ignore must be an iterable of modules or module names, got {type(ignore).__name__}") from None
    modules = dict(model.named_modules())
    out: set[str] = set()
    for item in items:
        if isinstance(item, str):
            if item not in modules:
                raise ValueError(f"ignore: {type(model).__name__} has no submodule named {item!r}")
            root = modules[item]
        elif isinstance(item, nn.Module):
            if item not in names:
                raise ValueError(f"ignore: {type(item).__name__} module is not a submodule of the model")
            root = item
        else:
            raise TypeError(f"ignore must contain modules or module names, got {type(item).__name__}")
        out.update(names[m] for m in root.modules())
    return out


def _measure_layers(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[dict[str, LayerInfo], tuple[str, ...]]:
    """One forward pass with hooks: output positions per layer (summed over calls) and call order."""
    names = {m: n for n, m in model.named_modules()}
    spatial: dict[str, int] = {}
    order: list[str] = []
    batch = inputs[0].shape[0]

    def hook(module: nn.Module, _inp: object, out: object) -> None:
        name = names[module]
        if not isinstance(out, Tensor):
            raise TypeError(f"module {name!r} ({type(module).__name__}) returned {type(out).__name__}, not a tensor")
        channels = layer_sizes(module)[1]
        spatial[name] = spatial.get(name, 0) + out.numel() // (batch * channels)
        if name not in order:
            order.append(name)

    tracked = [(n, m) for n, m in model.named_modules() if layer_kind(m) is not None]
    forward_with_hooks(model, inputs, [(m, hook) for _, m in tracked])
    layers = {}
    for name, m in tracked:
        kind = layer_kind(m)
        cin, cout = layer_sizes(m)
        if kind == "conv":
            kernel, groups = int(torch.tensor(m.kernel_size).prod()), m.groups
            bias = m.bias is not None
        elif kind == "linear":
            kernel, groups, bias = 1, 1, m.bias is not None
        else:
            kernel, groups, bias = 1, 1, m.affine
        layers[name] = LayerInfo(name, type(m).__name__, kind, cin, cout, groups, kernel, bias, spatial.get(name, 0))
    return layers, tuple(order)


def _untracked(model: nn.Module, layers: dict[str, LayerInfo], report: CostReport) -> dict[str, int]:
    """Cross-check every layer formula against the measurement and return the rest."""
    for name, layer in layers.items():
        if layer.kind == "norm":
            continue
        measured = report.per_layer.get(name)
        for cost in ("macs", "volume"):
            got = 0 if measured is None else getattr(measured, cost)
            if name == "":  # the model is a single layer: count_cost attributes its MACs to no name
                got = report[cost]
            if got != layer.cost(cost):
                module = model.get_submodule(name)
                raise TypeError(
                    f"cannot count the cost of module {name!r} ({type(module).__name__}): FlopCounterMode and hooks "
                    f"measure {got} {cost} per sample, the layer formula gives {layer.cost(cost)}"
                )
    tracked = {c: sum(layer.cost(c) for layer in layers.values()) for c in COSTS}
    if tracked["volume"] != report.volume:
        raise TypeError(f"activation volume: measured {report.volume}, layers give {tracked['volume']}")
    return {"macs": report.macs - tracked["macs"], "params": report.params - tracked["params"]}


def _trace(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Any, set, set[nn.Module]]:
    """Trace with Torch-Pruning; also return the modules with parameters of their own that the
    forward reached: their forward ran, or autograd reaches one of their parameters from the
    output (a parameter used directly by another module, e.g. ``MultiheadAttention.out_proj``)."""
    outputs: list[Tensor] = []
    ran: set[nn.Module] = set()

    def forward_fn(m: nn.Module, x: tuple[Tensor, ...]) -> Any:
        out = m(*x)
        outputs.extend(tp.utils.flatten_as_list(out))
        return out

    def record(module: nn.Module, _args: object) -> None:
        ran.add(module)

    owners = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    handles = [m.register_forward_pre_hook(record) for m in owners]
    was_training = model.training
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, forward_fn=forward_fn, verbose=False)
    except Exception as e:  # the tracer's own errors are not actionable; say what failed
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise ValueError(
            f"could not trace {type(model).__name__} with example_input of shape {shapes}: {type(e).__name__}: {e}"
        ) from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    grad_fns = {o.grad_fn for o in outputs if isinstance(o, Tensor) and o.grad_fn is not None}
    if not grad_fns:
        raise ValueError(
            f"could not trace {type(model).__name__}: its output does not depend on its parameters through autograd "
            "(does forward run under torch.no_grad() or detach its output?)"
        )
    used = _autograd_parameters(grad_fns)
    reached = {m for m in owners if m in ran or any(id(p) in used for p in m.parameters(recurse=False))}
    return dg, grad_fns, reached


def _autograd_parameters(grad_fns: Iterable[Any]) -> set[int]:
    """``id`` of every leaf tensor (parameter) that autograd reaches from ``grad_fns``."""
    stack, seen, leaves = list(grad_fns), set(), set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if isinstance(variable, Tensor):
            leaves.add(id(variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


def _check_reached(model: nn.Module, reached: set[nn.Module], ignored: set[str]) -> tuple[str, ...]:
    """Raise for modules with parameters that the trace did not reach and that are not
    ignored; return the ignored ones (they stay untouched, see the module docstring)."""
    missed = [
        name
        for name, m in model.named_modules()
        if m not in reached and next(m.parameters(recurse=False), None) is not None
    ]
    if not missed:
        return ()
    pending = _outermost(model, [n for n in missed if n not in ignored])
    if pending:
        listed = ", ".join(f"{n!r} ({type(model.get_submodule(n)).__name__})" for n in pending)
        raise ValueError(
            f"{type(model).__name__}: the example input's forward pass never reached {listed}, which "
            f"{'has' if len(pending) == 1 else 'have'} parameters. No channel group knows which channels "
            f"{'it reads' if len(pending) == 1 else 'they read'}, so pruning would leave a wrong input width "
            "there and the network would fail later with a shape error (a data-dependent branch that the "
            "example does not take, an auxiliary head used only in training, a layer used only in eval or "
            "by another method). Give an example input that reaches them, or pass "
            f"ignore={pending!r} to leave them untouched if they will not run on the pruned network "
            "(ignore= the layers producing their input as well to keep the channels they read)"
        )
    return tuple(sorted(missed))


def _outermost(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` with every group of them that makes up a whole submodule (all of its modules
    with parameters) replaced by that submodule's name: report a missed block, not each layer."""
    chosen = set(names)

    def top(name: str) -> str:
        parts, best = name.split("."), name
        for k in range(len(parts) - 1, 0, -1):
            ancestor = ".".join(parts[:k])
            owners = [
                n for n, m in model.get_submodule(ancestor).named_modules(prefix=ancestor)
                if next(m.parameters(recurse=False), None) is not None
            ]  # fmt: skip
            if not all(n in chosen for n in owners):
                break
            best = ancestor
        return best

    return list(dict.fromkeys(top(n) for n in names))


def build_graph(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...],
    *,
    ignore: Iterable[nn.Module | str] = (),
    residual: str = "tied",
) -> ChannelGraph:
    """Trace ``model`` on ``example_input`` and return its channel groups.

    Args:
        model: any ``nn.Module`` (its train/eval mode is restored).
        example_input: a tensor or tuple of tensors with a leading batch dimension; only
            shapes matter (the cost is counted per sample).
        ignore: modules (or qualified names) whose output channels must never be pruned; a
            group is left out when one of its producing layers (or a layer inside an ignored
            module) is ignored. Output heads are left out automatically. Modules with
            parameters that the example's forward never reaches must be listed here
            (see the module docstring).
        residual: ``"tied"``: a residual stream and every branch that a residual addition
            adds into it are one group (the "regular" block). ``"mixed"``: the
            mixed-connectivity block of Lemaire, Achkar and Jodoin (CVPR 2019, supplementary
            material, Algorithm 1): the last layer of each residual branch is a group of its
            own, gated and pruned on its own, and may keep no channel at all (the branch is
            then removed: depth is learned); the stream (stem, projection shortcuts and
            every layer reading it) stays one group. Residual additions are found in the
            trace (see :func:`_residual_branches`), whatever the model's classes.

    Raises:
        TypeError: ``model`` is not a module; a group reaches a layer type that cannot be
            pruned exactly (the message names the module and its type).
        ValueError: the model cannot be traced, has nothing prunable, has gates attached, or
            has modules with parameters that the example's forward does not reach (named).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if attached_gates(model) is not None:
        raise ValueError("model has gates attached; detach them (GateSet.detach()) before building its channel graph")
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"residual must be one of {', '.join(map(repr, RESIDUAL_MODES))}, got {residual!r}")
    mixed_modules = uses_mixed_modules(model)
    if mixed_modules:
        raise ValueError(
            f"{type(model).__name__} was shrunk with mixed-connectivity residual blocks (scattered or removed layers: "
            f"{', '.join(mixed_modules[:3])}{', ...' if len(mixed_modules) > 3 else ''}), which cannot be traced again; "
            "use the graph that shrink returned, or rebuild it from a fresh model (lightning_prune.core.surgery.replay)"
        )
    inputs = check_example(example_input)
    names = {m: n for n, m in model.named_modules()}
    if not any(layer_kind(m) in ("conv", "linear") for m in names):
        raise ValueError(f"{type(model).__name__} has nothing prunable (it has no convolution or linear layer)")
    ignored = _resolve_ignore(model, ignore, names)
    index = {n: i for i, n in enumerate(names.values())}

    dg, out_grad_fns, reached = _trace(model, inputs)
    unreached = _check_reached(model, reached, ignored)
    layers, order = _measure_layers(model, inputs)
    report = count_cost(model, inputs)
    untracked = _untracked(model, layers, report)

    groups: dict[str, ChannelGroup] = {}
    excluded: dict[str, str] = {}
    param_names = {id(p): n for n, p in model.named_parameters()}
    branches = _residual_branches(dg, names, layers, ignored, index) if residual == "mixed" else {}
    for tp_group in dg.get_all_groups(root_module_types=(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        group, reason, nodes = _convert(dg, tp_group, names, param_names, layers, ignored, out_grad_fns, index)
        if reason is None:
            for part in _split(group, nodes, branches, names, layers, index) if branches else (group,):
                groups[part.name] = part
        else:
            excluded[group.name] = reason
    if not groups:
        detail = "; ".join(f"{n!r}: {r}" for n, r in excluded.items()) or "no convolution or linear layer was traced"
        raise ValueError(f"{type(model).__name__} has nothing prunable ({detail})")
    groups = dict(sorted(groups.items(), key=lambda kv: index[kv[0]]))
    excluded = dict(sorted(excluded.items(), key=lambda kv: index.get(kv[0], -1)))
    return ChannelGraph(
        groups=groups,
        excluded=excluded,
        layers=layers,
        untracked=untracked,
        input_shapes=tuple(tuple(t.shape) for t in inputs),
        input_dtypes=tuple(str(t.dtype).removeprefix("torch.") for t in inputs),
        ignore=tuple(sorted(ignored)),
        execution_order=order,
        model_name=type(model).__name__,
        unreached=unreached,
        residual=residual,
    )


def _convert(dg, tp_group, names, param_names, layers, ignored, out_grad_fns, index) -> tuple[ChannelGroup, str | None, dict]:
    """A Torch-Pruning group -> (ChannelGroup, reason it is excluded or None, its nodes by ``(layer, role)``).

    ``names``: ``{module: qualified name}``; ``param_names``: ``{id(parameter): qualified name}``
    (from ``model.named_parameters()``, for a raw ``nn.Parameter`` that a group reaches)."""
    members: list[Member] = []
    problems: list[str] = []
    reason: str | None = None
    nodes = {}
    items = tp_group.items
    for item in items:
        dep, node = item.dep, item.dep.target
        target, is_out = node.module, dg.is_out_channel_pruning_fn(dep.handler)
        if is_out and (node.type == OUTPUT_NODE_TYPE or node.grad_fn in out_grad_fns or not node.outputs):
            reason = reason or "its channels are an output of the model (head)"
        if isinstance(target, nn.Parameter):
            name = param_names.get(id(target), "a parameter")
            problems.append(f"parameter {name!r} (nn.Parameter used directly in forward)")
            continue
        if target not in names:
            continue  # a parameter-free operation recorded by the tracer (add, cat, flatten, ...)
        name = names[target]
        kind = layer_kind(target)
        if kind is None:
            problems.append(f"module {name!r} of type {type(target).__name__}")
            continue
        layer = layers[name]
        if layer.grouped:
            reason = reason or f"it touches the grouped convolution {name!r} (groups={layer.groups})"
            continue
        if kind == "norm" or layer.depthwise:
            role = "channel"
        else:
            role = "out" if is_out else "in"
        if role != "in" and name in ignored:
            reason = reason or f"ignored ({name!r} is in ignore=)"
        pairs = sorted(zip(item.idxs, item.root_idxs))
        members.append(Member(name, role, tuple(int(p) for p, _ in pairs), tuple(int(c) for _, c in pairs)))
        nodes[(name, role)] = node
    root = names.get(items[0].dep.target.module, str(items[0].dep.target.module))
    size = len(items[0].idxs)
    name = _group_name(members, size, root, layers, index)
    if reason is None and problems:
        raise TypeError(
            f"channel group {name!r} reaches {problems[0]}, which lightning-prune cannot prune exactly "
            f"(supported: Conv1d/2d/3d with groups=1 or depthwise, Linear, BatchNorm); "
            f"pass ignore=[{name!r}] to leave these channels unpruned"
        )
    return _make_group(name, size, members, nodes, names, layers, index), reason, nodes


def _group_name(members: list[Member], size: int, root: str, layers: dict[str, LayerInfo], index: dict[str, int]) -> str:
    """The qualified name of the group's first output-channel layer (in ``named_modules()``
    order) that carries the group's channels in order, else ``root``."""
    producers = [m for m in members if m.role == "out" or (m.role == "channel" and layers[m.module].kind == "conv")]
    identity = tuple(range(size))
    named = [m.module for m in producers if m.positions == identity and m.channels == identity]
    return min(named, key=index.__getitem__) if named else root


def _make_group(name, size, members, nodes, names, layers, index, **extra: Any) -> ChannelGroup:
    """A ChannelGroup of ``members`` (sorted) with its gate sites."""
    members = sorted(members, key=lambda m: (index[m.module], ROLES.index(m.role)))
    producers = [m for m in members if m.role == "out" or (m.role == "channel" and layers[m.module].kind == "conv")]
    norms = {m.module for m in members if m.role == "channel" and layers[m.module].kind == "norm"}
    depthwise = {m.module for m in members if m.role == "channel" and layers[m.module].kind == "conv"}
    sites = [
        m.module
        for m in members
        if (m.module in norms or m in producers) and _reaches_consumer(nodes[(m.module, m.role)], names, norms, depthwise)
    ]
    return ChannelGroup(name, size, tuple(members), tuple(dict.fromkeys(sites)), **extra)


# -- mixed-connectivity residual blocks ----------------------------------------------------------


@dataclass(frozen=True)
class _Branch:
    """The branch of a residual addition: ``keys`` are the ``(layer, role)`` of its last layer
    (the producer and the channel-wise layers after it), ``output`` the layer whose output the
    addition adds, ``layers`` every layer of the branch (removed when it keeps no channel)."""

    producer: str
    keys: frozenset[tuple[str, str]]
    output: str
    layers: tuple[str, ...]


def _ancestors(node) -> set:
    """``node`` and every node it is computed from."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.inputs)
    return seen


def _topological(nodes) -> dict:
    """``{node: position}`` in an order where every node comes after its inputs."""
    order: dict = {}
    for start in nodes:
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node in order:
                continue
            if expanded:
                order[node] = len(order)
                continue
            stack.append((node, True))
            stack.extend((i, False) for i in node.inputs if i not in order)
    return order


def _residual_branches(dg, names, layers, ignored, index) -> dict[str, _Branch]:
    """The residual additions of the traced model, ``{branch producer: _Branch}``.

    An addition ``u + v`` is residual when ``u`` and ``v`` are computed from one tensor, the
    *fork* (their latest common ancestor, of which every other common ancestor is an ancestor),
    and one side has more convolution / linear layers between the fork and the addition than the
    other: that side is the *branch*, the other the *stream* (the identity, or a projection
    shortcut). The branch must be self-contained (its nodes read only the fork and each other,
    and only the addition reads them) so that it can be removed, none of its layers may be in
    ``ignore=``, and walking back from the addition through channel-wise operations (batch
    norms, depthwise convolutions, one-input element-wise operations) must reach its producing
    convolution / linear layer. Additions that do not qualify stay tied.
    """
    nodes = list(dg.module2node.values())
    order = _topological(nodes)
    found: dict[str, _Branch] = {}

    def layer_of(node) -> LayerInfo | None:
        name = names.get(node.module)
        return layers.get(name) if name is not None else None

    for add in nodes:
        if add.type != ELEMENTWISE or add.grad_fn is None or not add.grad_fn.name().startswith("AddBackward"):
            continue
        if len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
            continue
        u, v = add.inputs
        ancestors = {u: _ancestors(u), v: _ancestors(v)}
        common = ancestors[u] & ancestors[v]
        if not common:
            continue
        fork = max(common, key=order.__getitem__)
        before = _ancestors(fork)
        if before != common:
            continue  # several latest common ancestors: not one block
        side = {k: a - before for k, a in ancestors.items()}
        count = {k: sum(1 for n in s if (info := layer_of(n)) is not None and info.kind != "norm") for k, s in side.items()}
        if count[u] == count[v]:
            continue
        branch_in = u if count[u] > count[v] else v
        body = side[branch_in]
        if any(o not in body and o is not add for n in body for o in n.outputs):
            continue  # something outside the branch reads it
        if any(i not in body and i is not fork for n in body for i in n.inputs):
            continue  # it reads something else than the fork
        keys, node, output = set(), branch_in, None
        while True:
            info = layer_of(node)
            if len(node.outputs) != 1:
                keys = None
                break
            if info is not None:
                output = output or info.name
                if info.kind in ("conv", "linear") and not info.depthwise and not info.grouped:
                    keys.add((info.name, "out"))
                    break
                if info.kind == "norm" or info.depthwise:
                    keys.add((info.name, "channel"))
                else:
                    keys = None
                    break
            elif node.type != ELEMENTWISE or len(node.inputs) != 1:
                keys = None
                break
            if len(node.inputs) != 1:
                keys = None
                break
            node = node.inputs[0]
        if not keys or output is None:
            continue
        branch_layers = sorted({info.name for n in body if (info := layer_of(n)) is not None}, key=index.__getitem__)
        if any(name in ignored for name in branch_layers):
            continue
        producer = next(name for name, role in keys if role == "out")
        found[producer] = _Branch(producer, frozenset(keys), output, tuple(branch_layers))
    return found


def _split(group: ChannelGroup, nodes, branches: dict[str, _Branch], names, layers, index) -> list[ChannelGroup]:
    """``group`` split into its stream and one branch group per residual branch adding into it
    (``[group]`` when no branch qualifies): a branch's last layer must carry the group's
    channels in order, and the stream must keep a producing layer (the stem, a projection)."""
    keys = {(m.module, m.role) for m in group.members}
    identity = tuple(range(group.size))
    parts: list[tuple[_Branch, list[Member]]] = []
    for producer, branch in branches.items():
        if (producer, "out") not in keys or not branch.keys <= keys or layers[producer].out_channels != group.size:
            continue
        mine = [m for m in group.members if (m.module, m.role) in branch.keys]
        if all(m.positions == identity and m.channels == identity for m in mine):
            parts.append((branch, mine))
    if not parts:
        return [group]
    taken = set().union(*(b.keys for b, _ in parts))
    stream_members = [m for m in group.members if (m.module, m.role) not in taken]
    stream_producers = [
        m for m in stream_members
        if (m.role == "out" or (m.role == "channel" and layers[m.module].kind == "conv"))
        and m.positions == identity and m.channels == identity
    ]  # fmt: skip
    if not stream_producers:
        return [group]  # e.g. a stream that is the model's input: keep it tied
    stream_name = _group_name(stream_members, group.size, group.name, layers, index)
    out = [_make_group(stream_name, group.size, stream_members, nodes, names, layers, index)]
    for branch, mine in parts:
        out.append(
            _make_group(branch.producer, group.size, mine, nodes, names, layers, index, stream=stream_name, into=identity,
                        branch_output=branch.output, branch_layers=branch.layers)
        )
    return out


def _reaches_consumer(start, names: dict, norms: set[str], depthwise: set[str]) -> bool:
    """Whether some path from ``start``'s output reaches a channel-mixing layer (or the model
    output) through parameter-free operations and depthwise convolutions of the group only,
    i.e. without passing a batch norm of the group."""
    stack, seen = list(start.outputs), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        name = names.get(node.module)
        if name in norms:
            continue  # this batch norm gates the path
        if name is not None and name not in depthwise:
            return True  # a layer mixing channels (or one outside the group) reads them
        if not node.outputs:
            return True  # the model output
        stack.extend(node.outputs)
    return False
