"""Channel groups: the sets of channels that must be removed together.

``build_graph(model, example_input)`` traces ``model`` once with Torch-Pruning's
``DependencyGraph`` (this module and ``surgery`` are the only places that import
``torch_pruning``) and turns its pruning groups into plain, picklable data:

- a :class:`ChannelGroup` per prunable group: a stable ``name`` (the qualified name of its
  first output-channel layer in ``model.named_modules()`` order), its ``size`` (number of
  channels) and its :class:`Member` layers. Each member says which dimension of which layer
  the group cuts (``role``) and, for every position along that dimension, which channel of
  the group it carries (``positions`` / ``channels``). This covers conv -> BN -> next layer,
  residual additions (several producers share one group), concatenation (a consumer reads
  the group at an offset), flattening (one channel feeds ``H*W`` inputs of a linear layer)
  and depthwise convolutions (``role="channel"``: input and output channels go together).
- a :class:`LayerInfo` per convolution, linear and batch-norm layer: what the cost model
  needs to count MACs, parameters and activation volume exactly.
- ``gate_sites`` per group: the layers whose *outputs* a gate must multiply so that a hard
  0/1 gate is equivalent to removing the channel (see :class:`ChannelGroup`).

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

if TYPE_CHECKING:
    from lightning_prune.cost.measure import CostReport

__all__ = ["Member", "ChannelGroup", "LayerInfo", "ChannelGraph", "build_graph", "random_masks"]

ROLES = ("out", "in", "channel")
COSTS = ("volume", "macs", "params")


@dataclass(frozen=True)
class Member:
    """One layer's share of a channel group.

    ``role``: ``"out"`` cuts the output channels of a convolution or linear layer, ``"in"``
    its input channels (input features of a linear layer), ``"channel"`` cuts a channel-wise
    layer whose input and output channels are the same (batch norm, depthwise convolution).
    ``positions[k]`` is an index along that dimension and ``channels[k]`` the group channel
    it carries; a channel maps to several positions after a flatten (conv -> linear).
    """

    module: str
    role: str
    positions: tuple[int, ...]
    channels: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels removed together.

    ``gate_sites`` are the layers whose outputs a gate multiplies: the *last per-channel
    operation* before every layer that mixes channels (the in-channel consumers) and before
    the model output. A producer (conv/linear output, depthwise conv) or batch norm of the
    group is a site when some path from its output reaches such a consumer through
    parameter-free operations and depthwise convolutions only, without passing another batch
    norm of the group. So the gate goes after a batch norm, never before it (zeroing a channel
    before a batch norm leaves its bias); in a post-activation ResNet the sites are the batch
    norms that feed the residual additions; in a pre-activation network (WideResNet) the
    residual stream is read only through batch norms (each block's first one, the final one),
    and those are the sites; in a DenseNet, every batch norm reading a concatenation gates the
    groups it reads. Each path from a producer to a consumer crosses exactly one site, so a
    soft gate scales a channel once, and with hard 0/1 gates, as long as the parameter-free
    operations map 0 to 0 (ReLU, pooling, addition, concatenation, flatten, dropout), the
    gated network computes exactly what the shrunk network computes.
    """

    name: str
    size: int
    members: tuple[Member, ...]
    gate_sites: tuple[str, ...]

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the member layers, in member order, without repeats."""
        return tuple(dict.fromkeys(m.module for m in self.members))

    def per_channel(self, member: Member) -> Tensor:
        """How many positions of ``member`` each channel of the group occupies (int64, ``(size,)``)."""
        return torch.bincount(torch.tensor(member.channels, dtype=torch.long), minlength=self.size)


@dataclass(frozen=True)
class LayerInfo:
    """Static description of a convolution, linear or batch-norm layer for exact counting.

    ``spatial`` is the number of output positions per sample summed over the layer's calls
    in one forward pass (``H_out * W_out`` for a 2-d convolution called once; 1 for a linear
    layer on ``(batch, features)``). Per sample, with ``cin = in_channels // groups``:
    MACs = ``spatial * kernel * cin * out_channels`` (conv, linear; 0 for batch norm),
    params = ``kernel * cin * out_channels + bias * out_channels`` (conv, linear) or
    ``2 * out_channels`` (affine batch norm), volume = ``spatial * out_channels`` (conv,
    linear; 0 for batch norm) -- the same definitions as :func:`lightning_prune.count_cost`.
    ``bias``: the layer has a bias (batch norm: it is affine, with a weight and a bias).
    """

    name: str
    type: str
    kind: str  # "conv" | "linear" | "norm"
    in_channels: int
    out_channels: int
    groups: int
    kernel: int
    bias: bool
    spatial: int

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @property
    def grouped(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and not self.depthwise

    def coefficients(self, cost: str) -> tuple[int, int]:
        """``(a, b)`` with ``cost = a * cin * out_channels + b * out_channels`` per sample,
        ``cin = in_channels // groups`` (1 for batch norm)."""
        if cost == "macs":
            return (0 if self.kind == "norm" else self.spatial * self.kernel), 0
        if cost == "params":
            if self.kind == "norm":
                return 0, 2 * int(self.bias)
            return self.kernel, int(self.bias)
        if cost == "volume":
            return 0, (0 if self.kind == "norm" else self.spatial)
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")

    @property
    def cost_in(self) -> int:
        return 1 if self.kind == "norm" else self.in_channels // self.groups

    def cost(self, cost: str) -> int:
        a, b = self.coefficients(cost)
        return a * self.cost_in * self.out_channels + b * self.out_channels


@dataclass
class ChannelGraph:
    """The prunable channel groups of a model, plus what is needed to count its cost.

    Plain data: module names, not module objects, so the same graph applies to a copy of
    the model (``lightning_prune.surgery.shrink`` checks that the sizes still match).
    Iterating yields the groups in ``named_modules()`` order of their names.

    Attributes:
        groups: ``{name: ChannelGroup}`` of the prunable groups.
        excluded: ``{name: reason}`` of the groups that are never pruned.
        layers: ``{module name: LayerInfo}`` of every convolution, linear and batch-norm layer.
        untracked: ``{"macs": int, "params": int}``: cost of everything else (e.g. a
            functional matmul, a LayerNorm outside every group); constant under pruning.
        input_shapes, input_dtypes: of the example input (used to replay a pruning history).
        ignore: the ``ignore=`` module names.
        execution_order: the layers of ``layers`` in the order of their first call.
        model_name: class name of the traced model.
        unreached: modules with parameters that the example's forward did not reach (all of
            them in ``ignore=``); no group knows which channels they read (module docstring).
    """

    groups: dict[str, ChannelGroup]
    excluded: dict[str, str]
    layers: dict[str, LayerInfo]
    untracked: dict[str, int]
    input_shapes: tuple[tuple[int, ...], ...]
    input_dtypes: tuple[str, ...]
    ignore: tuple[str, ...] = ()
    execution_order: tuple[str, ...] = ()
    model_name: str = ""
    unreached: tuple[str, ...] = ()

    # -- container protocol -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups.values())

    def __contains__(self, name: object) -> bool:
        return name in self.groups

    def __getitem__(self, name: str) -> ChannelGroup:
        try:
            return self.groups[name]
        except KeyError:
            hint = f" (it is not pruned: {self.excluded[name]})" if name in self.excluded else ""
            raise KeyError(f"no channel group named {name!r}{hint}; groups: {', '.join(self.groups)}") from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.groups)

    @property
    def num_channels(self) -> int:
        """Total number of prunable channels (sum of group sizes)."""
        return sum(g.size for g in self.groups.values())

    def example_input(self) -> tuple[Tensor, ...]:
        """Zero tensors with the shapes and dtypes of the example input the graph was built with."""
        return tuple(
            torch.zeros(shape, dtype=getattr(torch, dtype)) for shape, dtype in zip(self.input_shapes, self.input_dtypes)
        )

    # -- masks ----------------------------------------------------------------------------
    def full_masks(self) -> dict[str, Tensor]:
        """Keep-everything masks: ``{name: ones(size, dtype=bool)}``."""
        return {name: torch.ones(g.size, dtype=torch.bool) for name, g in self.groups.items()}

    def check_masks(self, masks: Mapping[str, Any], *, allow_empty: bool = False, argument: str = "masks") -> dict[str, Tensor]:
        """Validate keep-masks and return ``{name: bool tensor (size,)}`` for *every* group
        (groups not in ``masks`` keep all their channels). Entries may be bool tensors,
        0/1 tensors or sequences of bools. ``allow_empty=False`` rejects a mask that keeps no
        channel of a group (a layer with zero channels cannot be built)."""
        if not isinstance(masks, Mapping):
            raise TypeError(f"{argument} must be a mapping from group name to a boolean mask, got {type(masks).__name__}")
        out = self.full_masks()
        for name, mask in masks.items():
            if name not in self.groups:
                hint = f" (it is not pruned: {self.excluded[name]})" if name in self.excluded else ""
                raise ValueError(f"{argument}: unknown channel group {name!r}{hint}; groups: {', '.join(self.groups)}")
            m = torch.as_tensor(mask).detach().cpu()
            if m.dtype != torch.bool:
                if m.is_floating_point() or m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
                    raise ValueError(f"{argument}[{name!r}] must be boolean (or 0/1), got dtype {m.dtype}")
                m = m.bool()
            size = self.groups[name].size
            if m.shape != (size,):
                raise ValueError(f"{argument}[{name!r}] must have shape ({size},), got {tuple(m.shape)}")
            if not allow_empty and not bool(m.any()):
                raise ValueError(
                    f"{argument}[{name!r}] keeps no channel of group {name!r}; keep at least one channel of every group"
                )
            out[name] = m
        return out

    def removed_positions(self, masks: Mapping[str, Tensor]) -> dict[tuple[str, str], list[int]]:
        """``{(module, dim): sorted removed indices}`` with ``dim`` one of ``"out"``, ``"in"``,
        ``"channel"``, for already checked full masks."""
        removed: dict[tuple[str, str], set[int]] = {}
        for name, group in self.groups.items():
            if bool(masks[name].all()):
                continue
            keep = masks[name].tolist()
            for member in group.members:
                pos = [p for p, c in zip(member.positions, member.channels) if not keep[c]]
                if pos:
                    removed.setdefault((member.module, member.role), set()).update(pos)
        return {key: sorted(v) for key, v in removed.items()}

    def shrunk(self, masks: Mapping[str, Any]) -> ChannelGraph:
        """The graph of the model after removing the channels that ``masks`` drop (no tracing:
        positions and channels are renumbered, layer sizes reduced)."""
        masks = self.check_masks(masks)
        removed = self.removed_positions(masks)
        renumber: dict[tuple[str, str], list[int]] = {}
        for (module, role), pos in removed.items():
            layer = self.layers[module]
            n = layer.in_channels if role == "in" else layer.out_channels
            keep = torch.ones(n, dtype=torch.bool)
            keep[pos] = False
            renumber[(module, role)] = (torch.cumsum(keep.long(), 0) - 1).tolist()
        groups = {}
        for name, group in self.groups.items():
            if bool(masks[name].all()):
                members = [
                    replace(m, positions=tuple(renumber[(m.module, m.role)][p] for p in m.positions))
                    if (m.module, m.role) in renumber
                    else m
                    for m in group.members
                ]
                groups[name] = replace(group, members=tuple(members))
                continue
            keep = masks[name].tolist()
            new_channel = (torch.cumsum(masks[name].long(), 0) - 1).tolist()
            members = []
            for member in group.members:
                ren = renumber.get((member.module, member.role))
                kept = [(p, c) for p, c in zip(member.positions, member.channels) if keep[c]]
                members.append(
                    Member(
                        member.module,
                        member.role,
                        tuple(ren[p] if ren is not None else p for p, _ in kept),
                        tuple(new_channel[c] for _, c in kept),
                    )
                )
            groups[name] = replace(group, size=int(masks[name].sum()), members=tuple(members))
        layers = {}
        for name, layer in self.layers.items():
            n_out = len(removed.get((name, "out"), ())) + len(removed.get((name, "channel"), ()))
            n_in = len(removed.get((name, "in"), ())) + len(removed.get((name, "channel"), ()))
            new = replace(layer, out_channels=layer.out_channels - n_out, in_channels=layer.in_channels - n_in)
            if layer.depthwise:
                new = replace(new, groups=new.out_channels)
            layers[name] = new
        return replace(self, groups=groups, layers=layers)

    def check_model(self, model: nn.Module, argument: str = "model") -> None:
        """Raise ``ValueError`` unless ``model`` has the layers and sizes this graph describes."""
        modules = dict(model.named_modules())
        for name, layer in self.layers.items():
            module = modules.get(name)
            if module is None:
                raise ValueError(f"{argument} has no layer {name!r}: the channel graph was built for another architecture")
            sizes = _sizes(module)
            if sizes != (layer.in_channels, layer.out_channels):
                raise ValueError(
                    f"{argument}: layer {name!r} has (in, out) channels {sizes}, the channel graph expects "
                    f"{(layer.in_channels, layer.out_channels)}; the graph is stale (use the graph returned by shrink) "
                    "or was built for another model"
                )


def _sizes(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, _ConvNd):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, _BatchNorm):
        return module.num_features, module.num_features
    raise TypeError(f"not a convolution, linear or batch-norm layer: {type(module).__name__}")


def _layer_kind(module: nn.Module) -> str | None:
    if isinstance(module, _ConvNd) and not module.transposed:
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _BatchNorm):
        return "norm"
    return None


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
        channels = _sizes(module)[1]
        spatial[name] = spatial.get(name, 0) + out.numel() // (batch * channels)
        if name not in order:
            order.append(name)

    tracked = [(n, m) for n, m in model.named_modules() if _layer_kind(m) is not None]
    handles = [m.register_forward_hook(hook) for _, m in tracked]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    layers = {}
    for name, m in tracked:
        kind = _layer_kind(m)
        cin, cout = _sizes(m)
        if kind == "conv":
            kernel, groups = int(torch.tensor(m.kernel_size).prod()), m.groups
            bias = m.bias is not None
        elif kind == "linear":
            kernel, groups, bias = 1, 1, m.bias is not None
        else:
            kernel, groups, bias = 1, 1, m.affine
        layers[name] = LayerInfo(name, type(m).__name__, kind, cin, cout, groups, kernel, bias, spatial.get(name, 0))
    return layers, tuple(order)


def _untracked(model: nn.Module, layers: dict[str, LayerInfo], report: "CostReport") -> dict[str, int]:
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
    model: nn.Module, example_input: Tensor | tuple[Tensor, ...], *, ignore: Iterable[nn.Module | str] = ()
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

    Raises:
        TypeError: ``model`` is not a module; a group reaches a layer type that cannot be
            pruned exactly (the message names the module and its type).
        ValueError: the model cannot be traced, has nothing prunable, has gates attached, or
            has modules with parameters that the example's forward does not reach (named).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # Imported here: lightning_prune.cost.model and lightning_prune.gating import this module.
    from lightning_prune.cost.measure import check_example, count_cost
    from lightning_prune.gating import attached_gates

    if attached_gates(model) is not None:
        raise ValueError("model has gates attached; detach them (GateSet.detach()) before building its channel graph")
    inputs = check_example(example_input)
    names = {m: n for n, m in model.named_modules()}
    if not any(_layer_kind(m) in ("conv", "linear") for m in names):
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
    for tp_group in dg.get_all_groups(root_module_types=(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        group, reason = _convert(dg, tp_group, names, layers, ignored, out_grad_fns, index)
        if reason is None:
            groups[group.name] = group
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
    )


def _convert(dg, tp_group, names, layers, ignored, out_grad_fns, index) -> tuple[ChannelGroup, str | None]:
    """A Torch-Pruning group -> (ChannelGroup, reason it is excluded or None)."""
    members: list[Member] = []
    problems: list[str] = []
    reason: str | None = None
    nodes = {}
    for item in tp_group:
        dep, node = item.dep, item.dep.target
        target, is_out = node.module, dg.is_out_channel_pruning_fn(dep.handler)
        if is_out and (isinstance(target, tp.ops._OutputOp) or node.grad_fn in out_grad_fns or not node.outputs):
            reason = reason or "its channels are an output of the model (head)"
        if isinstance(target, nn.Parameter):
            name = dg._param_to_name.get(target, "a parameter")
            problems.append(f"parameter {name!r} (nn.Parameter used directly in forward)")
            continue
        if target not in names:
            continue  # a parameter-free operation recorded by the tracer (add, cat, flatten, ...)
        name = names[target]
        kind = _layer_kind(target)
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
    root = names.get(tp_group[0].dep.target.module, str(tp_group[0].dep.target.module))
    size = len(tp_group[0].idxs)
    producers = [m for m in members if m.role == "out" or (m.role == "channel" and layers[m.module].kind == "conv")]
    identity = tuple(range(size))
    named = [m.module for m in producers if m.positions == identity and m.channels == identity]
    name = min(named, key=index.__getitem__) if named else root
    if reason is None and problems:
        raise TypeError(
            f"channel group {name!r} reaches {problems[0]}, which lightning-prune cannot prune exactly "
            f"(supported: Conv1d/2d/3d with groups=1 or depthwise, Linear, BatchNorm); "
            f"pass ignore=[{name!r}] to leave these channels unpruned"
        )
    members.sort(key=lambda m: (index[m.module], ROLES.index(m.role)))
    norms = {m.module for m in members if m.role == "channel" and layers[m.module].kind == "norm"}
    depthwise = {m.module for m in members if m.role == "channel" and layers[m.module].kind == "conv"}
    sites = [
        m.module
        for m in members
        if (m.module in norms or m in producers) and _reaches_consumer(nodes[(m.module, m.role)], names, norms, depthwise)
    ]
    return ChannelGroup(name, size, tuple(members), tuple(dict.fromkeys(sites))), reason


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


def random_masks(
    graph: ChannelGraph, keep: float, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Random keep-masks keeping ``max(1, round(keep * size))`` channels of every group."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")
    masks = {}
    for name, group in graph.groups.items():
        k = max(1, int(round(keep * group.size)))
        idx = torch.randperm(group.size, generator=generator)[:k]
        m = torch.zeros(group.size, dtype=torch.bool)
        m[idx] = True
        masks[name] = m
    return masks
