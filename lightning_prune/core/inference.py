"""The inference form of a network: every batch norm that can be folded is folded into the
convolution or linear layer before it.

In eval mode a batch norm (Ioffe and Szegedy, "Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift", ICML 2015, arXiv:1502.03167) is a fixed affine
map per channel, ``y = (x - mean) / sqrt(var + eps) * gamma + beta = s * x + t``. When ``x`` is
the output of a convolution or linear layer ``W x + b`` that nothing else reads, the two are one
layer ``(s W) x + (s b + t)``: :func:`fold_batchnorm` scales the layer's weight per output
channel, sets its bias (creating one for a layer without bias) and replaces the batch norm by
``nn.Identity``. The arithmetic is done in float64, then cast to the layer's dtype.

Which pairs fold. A batch norm folds into the layer before it when

- that layer is a convolution (``nn.Conv1d/2d/3d``, not transposed) or ``nn.Linear`` whose
  output (a 2-D ``(batch, features)`` tensor for a linear layer, a batched ``(batch, channels,
  ...)`` tensor for a convolution) is read by the batch norm and by nothing else: not by another
  layer or operation, not returned by the network;
- the batch norm tracks running statistics (``track_running_stats=True``: otherwise it
  normalizes with the batch's own statistics even in eval mode) and is called with that output
  alone;
- each of the two modules runs once per forward pass, and none of their parameters is shared
  with another module (or read directly by the forward code).

Every other batch norm stays as it is: one after an addition or a concatenation (the
post-addition norm of a pre-activation block), after an activation, after a layer whose output
also goes elsewhere (a skip connection), after a scattered layer of a mixed-connectivity residual
block (its output holds zeros for the stream channels the branch does not compute, and the norm
turns those into constants: no per-channel scale of the layer's weight can do that), or after a
layer that a residual branch removed. A scattered batch norm (the last layer of a
mixed-connectivity branch, see :mod:`lightning_prune.core.residual`) folds into the convolution
before it, which then takes over the scatter (same ``scatter_index``, same width).

How the pairs are found. First with a symbolic trace of ``torch.fx`` (convolution, linear,
batch-norm, scattered and removed layers as leaves): a pair is a call of a batch norm whose only
argument is the call of a convolution or linear layer that has no other user, each module is
called once in the graph and no parameter of theirs is read as an attribute. A network that
``torch.fx`` cannot trace symbolically (control flow on tensor values, ...) is run instead on the
example input with forward hooks on every module (the call order, which module is running) and a
``torch.overrides.TorchFunctionMode`` that sees every torch operation and the tensors it reads: a
pair is a batch norm called on the very output tensor of a convolution or linear layer, which no
operation outside that batch norm reads (shape and dtype queries aside), no other module receives
and the network does not return. Either way the network is also run once on the example input
(output shapes, how often each module runs), and the folded network's output is compared with the
unfolded one's: a difference above ``1e-4`` of the largest output magnitude undoes the folding
and raises a ``ValueError``.

The folded pairs are recorded in a plain attribute of the network (see :func:`folded_layers`);
:func:`lightning_prune.core.export.save_pruned` saves them, and
:func:`lightning_prune.core.export.load_pruned` rebuilds the network, replays its pruning and
then folds the same pairs before loading the weights.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.parameter import UninitializedParameter
from torch.overrides import TorchFunctionMode

from lightning_prune.core.cost.measure import check_example
from lightning_prune.core.gating import attached_gates
from lightning_prune.core.residual import RemovedLayer, ScatteredOutput, is_scattered, scatter_output, unscatter_output
from lightning_prune.core.surgery import BUDGET_ATTR, pruning_history

__all__ = ["fold_batchnorm", "fold_pairs", "folded_layers", "example_for", "INFERENCE_ATTR"]

INFERENCE_ATTR = "_lightning_prune_inference"  # {"folded": [[layer, norm], ...]} on the network
RTOL = 1e-4  # folded vs unfolded output, relative to the largest output magnitude
# Tensor queries that read no values (a shape check before a batch norm is not a second consumer).
_METADATA = frozenset({
    "dim", "size", "shape", "ndim", "ndimension", "dtype", "device", "layout", "numel", "nelement",
    "is_floating_point", "is_complex", "is_cuda", "is_sparse", "is_quantized", "is_meta", "requires_grad",
    "stride", "is_contiguous", "element_size", "get_device", "names", "__len__",
})  # fmt: skip


def folded_layers(network: nn.Module) -> list[tuple[str, str]]:
    """The ``(layer, batch norm)`` name pairs folded into ``network`` by :func:`fold_batchnorm`
    (empty when nothing was folded). Copies of the network (``copy.deepcopy``) carry them."""
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be an nn.Module, got {type(network).__name__}")
    record = network.__dict__.get(INFERENCE_ATTR) or {}
    return [(layer, norm) for layer, norm in record.get("folded", [])]


def example_for(network: nn.Module, example_input: Any, *, argument: str = "example_input") -> tuple[Tensor, ...]:
    """``example_input`` checked (a tensor or tuple of tensors, batch first), or, when it is
    ``None``, random inputs of the shapes and dtypes the network's pruning history (or the budget a
    pruning callback noted on it) records: standard normal for floating-point inputs, zeros
    otherwise, from a fixed seed (the global generator is not touched). Placed on the network's
    device; floating-point inputs take the dtype of its floating-point parameters."""
    if example_input is None:
        record = pruning_history(network) or network.__dict__.get(BUDGET_ATTR)
        if record is None:
            raise ValueError(
                f"{argument}: the network records no input shapes (it was not pruned by lightning-prune); pass "
                f"{argument}= a batch for it"
            )
        generator = torch.Generator().manual_seed(0)
        dtypes = record.get("input_dtypes") or ["float32"] * len(record["input_shapes"])
        inputs = []
        for shape, name in zip(record["input_shapes"], dtypes):
            dtype = getattr(torch, name)
            if dtype.is_floating_point:
                inputs.append(torch.randn(tuple(shape), generator=generator, dtype=dtype))
            else:
                inputs.append(torch.zeros(tuple(shape), dtype=dtype))
        example = tuple(inputs)
    else:
        try:
            example = check_example(example_input)
        except (TypeError, ValueError) as error:
            raise type(error)(str(error).replace("example_input", argument, 1)) from None
    ref = next((p for p in network.parameters() if not isinstance(p, UninitializedParameter)), None)
    if ref is None:
        return tuple(t.detach() for t in example)
    return tuple(
        t.detach().to(device=ref.device, dtype=ref.dtype if t.is_floating_point() and ref.is_floating_point() else t.dtype)
        for t in example
    )


@torch.no_grad()
def fold_batchnorm(network: nn.Module, example_input: Tensor | tuple[Tensor, ...] | None = None) -> list[tuple[str, str]]:
    """Fold, in place, every batch norm that directly follows a convolution or linear layer
    feeding only it into that layer (see the module docstring for which pairs fold and how they
    are found); put ``network`` in eval mode and return the folded ``(layer, batch norm)`` name
    pairs (in the order of the network's modules).

    Args:
        network: the network (pruned or not; gates must be detached, see
            :func:`lightning_prune.core.export.export` for a gated or Lightning module).
        example_input: a batch for ``network`` (a tensor or a tuple of tensors): it is run once
            to see output shapes and how often each module runs (and to find the pairs of a
            network that ``torch.fx`` cannot trace), and the folded output is checked against
            the unfolded one on it. Default: random inputs of the shapes recorded in the
            network's pruning history.

    Raises:
        TypeError: ``network`` is not an ``nn.Module``, or ``example_input`` not tensors.
        ValueError: ``example_input`` is ``None`` and the network records no input shapes; or
            the folded network's output differs from the unfolded one's (nothing is folded then).
    """
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be an nn.Module, got {type(network).__name__}")
    if attached_gates(network) is not None:
        raise ValueError("network has gates attached; export it first (lightning_prune.export) and fold the export")
    example = example_for(network, example_input)
    network.eval()
    modules = dict(network.named_modules())
    names = {id(m): n for n, m in modules.items()}
    observed = _observe(network, example, names)
    try:
        candidates = _fx_pairs(network)
    except Exception:  # noqa: BLE001 - any tracing failure (TraceError, TypeError, ...) means: not symbolically traceable
        candidates = observed.pairs
    shared = _shared_parameters(network)
    pairs = [(layer, norm) for layer, norm in candidates if layer in modules and norm in modules
             and _foldable(modules[layer], modules[norm], layer, norm, observed, shared)]
    order = {n: i for i, n in enumerate(modules)}
    pairs.sort(key=lambda pair: order[pair[0]])
    if not pairs:
        return []
    undo = [_fold(network, modules[layer], modules[norm]) for layer, norm in pairs]
    try:
        problem = _difference(_tensors(network(*example)), observed.outputs)
    except Exception as error:  # noqa: BLE001 - e.g. the forward code reads an attribute of a replaced batch norm
        problem = f"the folded network raised {type(error).__name__}: {error}"
    if problem is not None:
        for restore in reversed(undo):
            restore()
        raise ValueError(
            f"network: folding the batch norms {', '.join(norm for _, norm in pairs)} changed its output ({problem}); "
            "nothing was folded (does the forward code read a layer's output or parameters in a way the trace missed?)"
        )
    _record(network, pairs)
    return pairs


@torch.no_grad()
def fold_pairs(network: nn.Module, pairs: Iterable[Sequence[str]]) -> None:
    """Fold the given ``(layer, batch norm)`` pairs of ``network`` in place, without looking for
    them or running the network (the folding recorded in a saved file, replayed on the rebuilt
    network before its weights are loaded). Puts ``network`` in eval mode.

    Raises:
        ValueError: a name is not a module of ``network``, or not a convolution / linear layer
            and a batch norm of matching widths that tracks running statistics.
    """
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be an nn.Module, got {type(network).__name__}")
    pairs = [tuple(pair) for pair in pairs]
    modules = dict(network.named_modules())
    seen: set[str] = set()
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(n, str) for n in pair):
            raise ValueError(f"pairs: each entry must be a [layer, batch norm] pair of module names, got {list(pair)!r}")
        layer, norm = pair
        if layer in seen or norm in seen:
            raise ValueError(f"pairs: {layer if layer in seen else norm!r} appears in more than one pair")
        seen.update(pair)
        for name in pair:
            if name not in modules:
                raise ValueError(f"pairs: the network has no module {name!r}")
        reason = _unfoldable(modules[layer], modules[norm])
        if reason is not None:
            raise ValueError(f"pairs: cannot fold {norm!r} into {layer!r}: {reason}")
    network.eval()
    for layer, norm in pairs:
        _fold(network, modules[layer], modules[norm])
    _record(network, [(layer, norm) for layer, norm in pairs])


def _record(network: nn.Module, pairs: list[tuple[str, str]]) -> None:
    record = network.__dict__.setdefault(INFERENCE_ATTR, {"folded": []})
    record["folded"].extend([layer, norm] for layer, norm in pairs)


# -- finding the pairs -------------------------------------------------------------------------


class _LeafTracer(fx.Tracer):
    """``torch.fx`` tracer that keeps the layers folding cares about as single calls (a scattered
    layer's class lives outside ``torch.nn``, so the default tracer would trace into it)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (_ConvNd, nn.Linear, _BatchNorm, ScatteredOutput, RemovedLayer)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _fx_pairs(network: nn.Module) -> list[tuple[str, str]]:
    """Candidate pairs from a symbolic trace (raises when the network cannot be traced)."""
    tracer = _LeafTracer()
    graph = tracer.trace(network)
    calls: Counter[int] = Counter()
    for node in graph.nodes:
        if node.op == "call_module":
            calls[id(network.get_submodule(node.target))] += 1
    read_attributes = [str(node.target) for node in graph.nodes if node.op == "get_attr"]
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(network.get_submodule(node.target), _BatchNorm):
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        if source.op != "call_module" or not isinstance(network.get_submodule(source.target), (_ConvNd, nn.Linear)):
            continue
        if len(source.users) != 1:
            continue  # the layer's output goes elsewhere too
        layer, norm = network.get_submodule(source.target), network.get_submodule(node.target)
        if calls[id(layer)] != 1 or calls[id(norm)] != 1:
            continue
        if any(a == name or a.startswith(name + ".") for a in read_attributes for name in (source.target, node.target)):
            continue  # a parameter of theirs is used directly by the forward code
        pairs.append((str(source.target), str(node.target)))
    return pairs


class _Observation:
    """What one forward pass showed: module calls, layer output shapes, reads of layer outputs,
    the layers whose parameters or buffers an operation outside them read, the hook-trace pairs,
    and the network's outputs."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.out_dims: dict[str, int] = {}
        self.exposed: set[str] = set()
        self.pairs: list[tuple[str, str]] = []
        self.outputs: list[Tensor] = []


class _Reads(TorchFunctionMode):
    """Records which module was running when a torch operation read a watched tensor."""

    def __init__(self, watched: Mapping[int, Any], own: Mapping[int, str], reads: dict[int, list[str | None]],
                 stack: list[str]) -> None:
        super().__init__()
        self.watched, self.own, self.reads, self.stack = watched, own, reads, stack

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if name not in _METADATA:
            for t in _flat(args, kwargs):
                if id(t) in self.watched or id(t) in self.own:
                    self.reads.setdefault(id(t), []).append(self.stack[-1] if self.stack else None)
        return func(*args, **kwargs)


def _flat(*values: Any) -> Iterable[Tensor]:
    for v in values:
        if isinstance(v, Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _flat(*v)
        elif isinstance(v, Mapping):
            yield from _flat(*v.values())


def _tensors(out: Any) -> list[Tensor]:
    return [t.detach().clone() for t in _flat(out)]


def _observe(network: nn.Module, example: tuple[Tensor, ...], names: dict[int, str]) -> _Observation:
    """Run ``network`` once on ``example`` with hooks on every module and a torch function mode."""
    seen = _Observation()
    stack: list[str] = []
    watched: dict[int, tuple[str, Tensor]] = {}  # id(layer output) -> (layer, output): the tensor kept alive
    reads: dict[int, list[str | None]] = {}
    received: dict[int, list[str]] = {}  # id(layer output) -> modules called with it
    norm_inputs: list[tuple[str, int]] = []  # (batch norm, id of its input) where it was called with one tensor
    own = {  # id(parameter or buffer) -> the layer or batch norm holding it
        id(t): names[id(m)] for m in network.modules() if isinstance(m, (_ConvNd, nn.Linear, _BatchNorm))
        for t in [*m._parameters.values(), *m._buffers.values()] if t is not None
    }  # fmt: skip

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen.calls[name] += 1
            for t in _flat(args, kwargs):
                if id(t) in watched:
                    received.setdefault(id(t), []).append(name)
            if isinstance(module, _BatchNorm) and len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
                norm_inputs.append((name, id(args[0])))
            stack.append(name)

        return hook

    def post_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            stack.pop()
            if isinstance(module, (_ConvNd, nn.Linear)) and isinstance(output, Tensor):
                seen.out_dims[name] = output.dim()
                watched[id(output)] = (name, output)

        return hook

    handles = []
    for module in network.modules():
        name = names[id(module)]
        handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook(name), always_call=True))
    try:
        with _Reads(watched, own, reads, stack):
            out = network(*example)
    finally:
        for h in handles:
            h.remove()
    seen.exposed = {own[key] for key, readers in reads.items() if key in own and any(r != own[key] for r in readers)}
    returned = {id(t) for t in _flat(out)}
    seen.outputs = _tensors(out)
    for norm, key in norm_inputs:
        if key not in watched or key in returned:
            continue
        layer = watched[key][0]
        # Received by the batch norm and by the containers it sits in (which pass the tensor on), read
        # by no operation outside the batch norm's own forward.
        if norm not in received.get(key, []) or any(
            r != norm and r != "" and not norm.startswith(r + ".") for r in received[key]
        ) or any(reader != norm for reader in reads.get(key, [])):
            continue  # read by another module or operation
        seen.pairs.append((layer, norm))
    return seen


def _shared_parameters(network: nn.Module) -> set[int]:
    """Ids of the parameters registered in more than one module (or twice in one)."""
    counts = Counter(id(p) for m in network.modules() for p in m._parameters.values() if p is not None)
    return {key for key, n in counts.items() if n > 1}


def _unfoldable(layer: nn.Module, norm: nn.Module) -> str | None:
    """Why ``norm`` cannot fold into ``layer`` by their types and sizes, or ``None``."""
    if not isinstance(layer, (_ConvNd, nn.Linear)) or (isinstance(layer, _ConvNd) and layer.transposed):
        return f"{type(layer).__name__} is not a convolution (Conv1d/2d/3d) or linear layer"
    if is_scattered(layer):
        return "the layer is scattered into a wider stream (its zeros would not stay zeros)"
    if isinstance(layer.weight, UninitializedParameter) or not layer.weight.is_floating_point():
        return "the layer's weight is not an initialized floating-point tensor"
    if not isinstance(norm, _BatchNorm):
        return f"{type(norm).__name__} is not a batch norm"
    if norm.running_mean is None or norm.running_var is None:
        return "the batch norm does not track running statistics (it normalizes with batch statistics in eval mode)"
    width = layer.out_channels if isinstance(layer, _ConvNd) else layer.out_features
    if norm.num_features != width:
        return f"the batch norm has {norm.num_features} features, the layer {width} outputs"
    return None


def _foldable(layer: nn.Module, norm: nn.Module, layer_name: str, norm_name: str, seen: _Observation, shared: set[int]) -> bool:
    if _unfoldable(layer, norm) is not None:
        return False
    if seen.calls[layer_name] != 1 or seen.calls[norm_name] != 1:
        return False  # not run, or run more than once per forward
    if layer_name in seen.exposed or norm_name in seen.exposed:
        return False  # the forward code reads their parameters or statistics outside them
    expected = 2 if isinstance(layer, nn.Linear) else layer.weight.dim()  # (batch, features) / (batch, channels, ...)
    if seen.out_dims.get(layer_name) != expected:
        return False
    return not any(id(p) in shared for m in (layer, norm) for p in m._parameters.values() if p is not None)


# -- folding -----------------------------------------------------------------------------------


def _fold(network: nn.Module, layer: nn.Module, norm: _BatchNorm):
    """Fold ``norm`` into ``layer``; return a function undoing it."""
    weight, bias = layer.weight, layer.bias
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach().double()
    shift = -norm.running_mean.double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().double()
    w = weight.detach().double() * scale.view(-1, *[1] * (weight.dim() - 1))
    b = shift if bias is None else bias.detach().double() * scale + shift
    layer.weight = nn.Parameter(w.to(weight.dtype), requires_grad=weight.requires_grad)
    layer.bias = nn.Parameter(b.to(weight.dtype), requires_grad=weight.requires_grad)
    scattered = is_scattered(norm)
    if scattered:
        scatter_output(layer, norm.scatter_index.clone(), norm.scatter_width)
    places = [(parent, name) for parent in network.modules() for name, child in parent.named_children() if child is norm]
    for parent, name in places:
        setattr(parent, name, nn.Identity())

    def undo() -> None:
        layer.weight, layer.bias = weight, bias
        if scattered:
            unscatter_output(layer)
        for parent, name in places:
            setattr(parent, name, norm)

    return undo


def _difference(out: list[Tensor], ref: list[Tensor]) -> str | None:
    """Why the folded outputs ``out`` differ from the unfolded ``ref``, or ``None``."""
    if len(out) != len(ref) or any(a.shape != b.shape for a, b in zip(out, ref)):
        return "the outputs' number or shapes changed"
    for a, b in zip(out, ref):
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return "an integer output changed"
            continue
        scale = max(float(b.abs().max()) if b.numel() else 0.0, 1.0)
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        if not math.isfinite(diff) or diff > RTOL * scale:
            return f"largest difference {diff:.3g}, allowed {RTOL * scale:.3g}"
    return None
