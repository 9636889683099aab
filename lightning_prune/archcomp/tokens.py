"""Architectures as sequences of layer tokens ``[t, k, o, s, p]`` (Ashok, "Architecture
Compression", arXiv:1902.03326, 2019, Sec. 3.1, Sec. 4 and appendix Sec. 9).

``to_tokens`` is the paper's ``o(A)``: a feed-forward network (a chain of layers, no skip
connections) to its topologically ordered token sequence. ``build`` is ``o⁻¹``: tokens back to
a working ``nn.Sequential``, with input channels, spatial sizes and the first linear layer's
input size inferred from ``input_shape``. ``plan`` does the inference and the checks without
building anything (it also counts parameters, exactly as the built module has them).

Token fields (all integers; a field a layer does not have is 0):

====  ===========  ======  ===========================  ======  =================================
t     layer        k       o                            s       p
====  ===========  ======  ===========================  ======  =================================
1     Conv2d       kernel  output channels              stride  padding
2     MaxPool2d    kernel  = input channels             stride  padding (at most k // 2)
3     BatchNorm    0       = input channels/features    0       0
4     ReLU         0       = input channels/features    0       0
5     Sigmoid      0       = input channels/features    0       0
6     Dropout      0       = input channels/features    0       drop rate in tenths (0..9)
7     AvgPool2d    kernel  = input channels             stride  padding (at most k // 2)
8     Linear       0       output features              0       0
====  ===========  ======  ===========================  ======  =================================

Conventions the five fields cannot express, fixed here so that ``build(to_tokens(A))`` has the
same layers and parameter count as ``A`` for the networks of Ashok 2019 (CONV-k, VGG):

- a Conv2d directly followed by a BatchNorm has no bias (the BatchNorm's shift replaces it);
  every other Conv2d and every Linear has one;
- the activation is flattened before the first Linear; BatchNorm after that is BatchNorm1d;
- kernels, strides and paddings are square, convolutions are dense (groups = 1, dilation = 1).

``to_tokens`` warns when a network departs from these conventions (the rebuilt network will then
differ in parameter count) and refuses what a chain of tokens cannot describe at all
(skip connections, grouped convolutions, adaptive pooling, ...), naming the layer.
"""

from __future__ import annotations

import enum
import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from lightning_prune._checks import check_int


class LayerType(enum.IntEnum):
    """The 8 layer types of Ashok 2019, appendix Sec. 9 (token field ``t``)."""

    CONV = 1
    MAXPOOL = 2
    BATCHNORM = 3
    RELU = 4
    SIGMOID = 5
    DROPOUT = 6
    AVGPOOL = 7
    LINEAR = 8


SPATIAL = frozenset({LayerType.CONV, LayerType.MAXPOOL, LayerType.AVGPOOL})
POOLS = frozenset({LayerType.MAXPOOL, LayerType.AVGPOOL})
CHANNEL_PRESERVING = frozenset(
    {LayerType.MAXPOOL, LayerType.BATCHNORM, LayerType.RELU, LayerType.SIGMOID, LayerType.DROPOUT, LayerType.AVGPOOL}
)
NUM_FIELDS = 5
MAX_DROPOUT_TENTHS = 9


class Token(NamedTuple):
    """One layer: type ``t`` (a :class:`LayerType` value), kernel ``k``, outputs ``o``, stride ``s``, padding ``p``."""

    t: int
    k: int = 0
    o: int = 0
    s: int = 0
    p: int = 0

    def __str__(self) -> str:
        name = LayerType(self.t).name if self.t in LayerType._value2member_map_ else f"?{self.t}"
        return f"{name}[k={self.k} o={self.o} s={self.s} p={self.p}]"


class InvalidArchitecture(ValueError):
    """A token sequence that does not describe a working network; ``reasons`` says why."""

    def __init__(self, reasons: Sequence[str]) -> None:
        self.reasons = list(reasons)
        super().__init__("invalid architecture: " + "; ".join(self.reasons))


@dataclass(frozen=True)
class Plan:
    """A checked token sequence and what ``build`` will make of it.

    ``tokens`` are canonical (unused fields 0, channel-preserving layers carrying their input
    channels). ``shapes[i]`` is the output shape of layer ``i`` per sample: ``(C, H, W)`` before
    the first Linear, ``(features,)`` from it on. ``layer_params[i]`` is layer ``i``'s parameter
    count. ``repairs`` lists what was changed (empty unless ``repair=True`` was needed).
    """

    tokens: tuple[Token, ...]
    input_shape: tuple[int, int, int]
    shapes: tuple[tuple[int, ...], ...]
    layer_params: tuple[int, ...]
    repairs: tuple[str, ...] = field(default=())

    @property
    def params(self) -> int:
        """Total parameter count of the built network."""
        return sum(self.layer_params)

    @property
    def num_conv(self) -> int:
        return sum(1 for tok in self.tokens if tok.t == LayerType.CONV)


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    if not isinstance(input_shape, Sequence) or isinstance(input_shape, (str, bytes)):
        raise TypeError(f"input_shape must be a (channels, height, width) tuple, got {type(input_shape).__name__}")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (channels, height, width), got {tuple(input_shape)!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_shape):
        raise ValueError(f"input_shape must hold three positive ints, got {tuple(input_shape)!r}")
    return (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))


def _as_tokens(tokens: object) -> list[tuple[float, ...]]:
    if isinstance(tokens, Tensor):
        if tokens.dim() != 2 or tokens.shape[1] != NUM_FIELDS:
            raise ValueError(f"tokens must have shape (T, 5), got a tensor of shape {tuple(tokens.shape)}")
        return [tuple(float(v) for v in row) for row in tokens.tolist()]
    if not isinstance(tokens, Sequence) or isinstance(tokens, (str, bytes)):
        raise TypeError(f"tokens must be a sequence of [t, k, o, s, p] rows or a (T, 5) tensor, got {type(tokens).__name__}")
    rows = []
    for i, row in enumerate(tokens):
        if not isinstance(row, Sequence) or len(row) != NUM_FIELDS:
            raise ValueError(f"tokens[{i}] must have 5 fields [t, k, o, s, p], got {row!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row):
            raise TypeError(f"tokens[{i}] must hold numbers, got {row!r}")
        rows.append(tuple(float(v) for v in row))
    return rows


def _conv_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def plan(
    tokens: Sequence[Sequence[int]] | Tensor,
    input_shape: Sequence[int],
    num_classes: int | None = None,
    repair: bool = False,
) -> Plan:
    """Check ``tokens`` against an input of ``input_shape`` = (C, H, W) and infer every shape.

    With ``repair=False`` anything invalid or non-canonical raises :class:`InvalidArchitecture`
    listing every problem. With ``repair=True`` (what a decoder's rounded output needs) fields
    are rounded and clamped into range, unused fields zeroed, channel fields of
    channel-preserving layers set to their input channels, spatial layers after the first
    Linear and layers that would shrink the feature map below 1x1 dropped, empty slots
    (``t <= 0``) removed, and the last layer made a ``Linear(num_classes)``; each change is
    recorded in ``Plan.repairs``. An empty sequence is rejected either way.

    If ``num_classes`` is given the last layer must be a Linear with that many outputs.
    """
    in_shape = check_input_shape(input_shape)
    if num_classes is not None:
        check_int("num_classes", num_classes)
    rows = _as_tokens(tokens)
    problems: list[str] = []
    repairs: list[str] = []

    def issue(msg: str) -> None:
        (repairs if repair else problems).append(msg)

    out: list[Token] = []
    shapes: list[tuple[int, ...]] = []
    params: list[int] = []
    c, h, w = in_shape
    flat: int | None = None  # features once flattened

    for i, row in enumerate(rows):
        ints = [int(round(v)) for v in row]
        if any(abs(v - r) > 1e-6 for v, r in zip(row, ints)):
            issue(f"layer {i}: fields {list(row)} rounded to integers")
        t, k, o, s, p = ints
        if t < 1:
            if not repair:
                problems.append(f"layer {i}: type {t} is not a layer type (1..8)")
            else:
                repairs.append(f"layer {i}: empty slot (type {t}) removed")
            continue
        if t > len(LayerType):
            issue(f"layer {i}: type {t} is not a layer type (1..8), clamped to {len(LayerType)} (Linear)")
            t = len(LayerType)
        kind = LayerType(t)
        if min(k, o, s, p) < 0:
            issue(f"layer {i} ({kind.name}): negative field in {[t, k, o, s, p]}, set to 0")
            k, o, s, p = (max(0, v) for v in (k, o, s, p))
        if kind in SPATIAL and flat is not None:
            if not repair:
                problems.append(f"layer {i} ({kind.name}): a spatial layer cannot follow a Linear layer")
            else:
                repairs.append(f"layer {i} ({kind.name}): spatial layer after a Linear layer removed")
            continue
        channels = c if flat is None else flat
        want: Token
        if kind == LayerType.CONV:
            want = Token(t, max(k, 1), max(o, 1), max(s, 1), p)
        elif kind in POOLS:
            kk = max(k, 1)
            want = Token(t, kk, channels, max(s, 1), min(p, kk // 2))
        elif kind == LayerType.DROPOUT:
            want = Token(t, 0, channels, 0, min(p, MAX_DROPOUT_TENTHS))
        elif kind == LayerType.LINEAR:
            want = Token(t, 0, max(o, 1), 0, 0)
        else:
            want = Token(t, 0, channels, 0, 0)
        if want != Token(t, k, o, s, p):
            issue(f"layer {i} ({kind.name}): {[t, k, o, s, p]} is not canonical, made {list(want)}")
        if kind in SPATIAL:
            nh, nw = _conv_out(h, want.k, want.s, want.p), _conv_out(w, want.k, want.s, want.p)
            if nh < 1 or nw < 1:
                msg = f"layer {i} ({kind.name}): a {h}x{w} input becomes {nh}x{nw} (kernel {want.k}, stride {want.s}, padding {want.p})"
                if not repair:
                    problems.append(msg)
                    continue
                repairs.append(msg + "; layer removed")
                continue
            h, w = nh, nw
        if kind == LayerType.CONV:
            c = want.o
            params.append(channels * want.k * want.k * want.o)  # bias decided below
            shapes.append((c, h, w))
        elif kind == LayerType.LINEAR:
            fan_in = c * h * w if flat is None else flat
            flat = want.o
            params.append(fan_in * want.o + want.o)
            shapes.append((flat,))
        else:
            params.append(2 * channels if kind == LayerType.BATCHNORM else 0)
            shapes.append((c, h, w) if flat is None else (flat,))
        out.append(want)

    if not out:
        raise InvalidArchitecture([*problems, "the sequence has no layers"])
    if num_classes is not None or out[-1].t != LayerType.LINEAR:
        last_ok = out[-1].t == LayerType.LINEAR and (num_classes is None or out[-1].o == num_classes)
        if not last_ok:
            msg = (
                f"the last layer must be Linear({num_classes if num_classes is not None else 'classes'}), "
                f"got {out[-1]}"
            )
            if not repair or num_classes is None:
                problems.append(msg)
            elif out[-1].t == LayerType.LINEAR:
                repairs.append(msg + f"; its outputs set to {num_classes}")
                fan_in = (params[-1] - out[-1].o) // out[-1].o
                out[-1] = Token(LayerType.LINEAR, 0, num_classes, 0, 0)
                params[-1] = fan_in * num_classes + num_classes
                shapes[-1] = (num_classes,)
            else:
                repairs.append(msg + f"; Linear({num_classes}) appended")
                fan_in = c * h * w if flat is None else flat
                out.append(Token(LayerType.LINEAR, 0, num_classes, 0, 0))
                params.append(fan_in * num_classes + num_classes)
                shapes.append((num_classes,))
    if problems:
        raise InvalidArchitecture(problems)
    # Conv bias convention: a conv directly followed by BatchNorm has none.
    for i, tok in enumerate(out):
        if tok.t == LayerType.CONV and not _followed_by_batchnorm(out, i):
            params[i] += tok.o
    return Plan(tuple(out), in_shape, tuple(shapes), tuple(params), tuple(repairs))


def _followed_by_batchnorm(tokens: Sequence[Token], i: int) -> bool:
    return i + 1 < len(tokens) and tokens[i + 1].t == LayerType.BATCHNORM


def build(
    tokens: Sequence[Sequence[int]] | Tensor | Plan,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    repair: bool = False,
) -> nn.Sequential:
    """``o⁻¹``: the ``nn.Sequential`` that ``tokens`` describe for inputs of ``input_shape`` (C, H, W).

    Accepts a :class:`Plan` (then ``input_shape`` may be omitted) or anything :func:`plan`
    accepts; invalid sequences raise :class:`InvalidArchitecture` unless ``repair=True``.
    The result has a ``plan`` attribute (the checked, canonical tokens and shapes).
    """
    if isinstance(tokens, Plan):
        checked = tokens
        if input_shape is not None and check_input_shape(input_shape) != checked.input_shape:
            raise ValueError(f"input_shape {tuple(input_shape)} differs from the plan's {checked.input_shape}")
    else:
        if input_shape is None:
            raise ValueError("input_shape is required unless tokens is a Plan")
        checked = plan(tokens, input_shape, num_classes=num_classes, repair=repair)
    layers: list[nn.Module] = []
    c = checked.input_shape[0]
    flat: int | None = None
    for i, tok in enumerate(checked.tokens):
        kind = LayerType(tok.t)
        if kind == LayerType.CONV:
            layers.append(nn.Conv2d(c, tok.o, tok.k, stride=tok.s, padding=tok.p, bias=not _followed_by_batchnorm(checked.tokens, i)))
            c = tok.o
        elif kind == LayerType.MAXPOOL:
            layers.append(nn.MaxPool2d(tok.k, stride=tok.s, padding=tok.p))
        elif kind == LayerType.AVGPOOL:
            layers.append(nn.AvgPool2d(tok.k, stride=tok.s, padding=tok.p))
        elif kind == LayerType.BATCHNORM:
            layers.append(nn.BatchNorm2d(c) if flat is None else nn.BatchNorm1d(flat))
        elif kind == LayerType.RELU:
            layers.append(nn.ReLU())  # not in place: a Sigmoid before it needs its output for backward
        elif kind == LayerType.SIGMOID:
            layers.append(nn.Sigmoid())
        elif kind == LayerType.DROPOUT:
            layers.append(nn.Dropout(tok.p / 10))
        else:  # Linear
            if flat is None:
                layers.append(nn.Flatten())
                fan_in = math.prod(checked.shapes[i - 1]) if i > 0 else math.prod(checked.input_shape)
            else:
                fan_in = flat
            layers.append(nn.Linear(fan_in, tok.o))
            flat = tok.o
    net = nn.Sequential(*layers)
    net.plan = checked  # type: ignore[assignment]
    return net


def param_count(tokens: Sequence[Sequence[int]] | Tensor, input_shape: Sequence[int]) -> int:
    """Parameter count of ``build(tokens, input_shape)`` without building it (tokens must be valid)."""
    return plan(tokens, input_shape).params


# --- o(A) ---------------------------------------------------------------------------------

_META_METHODS = frozenset({"size", "dim"})
_FLATTEN_FUNCTIONS = frozenset({torch.flatten})
_FLATTEN_METHODS = frozenset({"flatten", "view", "reshape"})
_ACTIVATION_FUNCTIONS = {F.relu: LayerType.RELU, torch.relu: LayerType.RELU, torch.sigmoid: LayerType.SIGMOID}
_ACTIVATION_METHODS = {"relu": LayerType.RELU, "sigmoid": LayerType.SIGMOID}


def _square(value: int | tuple[int, ...], what: str, name: str) -> int:
    vals = (value,) if isinstance(value, int) else tuple(value)
    if len(set(vals)) != 1:
        raise ValueError(f"layer {name!r}: non-square {what} {value} cannot be written as a token")
    return int(vals[0])


def _lossy(name: str, msg: str) -> None:
    warnings.warn(f"layer {name!r}: {msg}", stacklevel=3)


def _module_token(name: str, module: nn.Module, in_shape: torch.Size, out_shape: torch.Size) -> Token:
    channels = int(in_shape[1])
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or _square(module.dilation, "dilation", name) != 1:
            raise ValueError(f"layer {name!r}: grouped or dilated convolutions cannot be written as tokens")
        if not isinstance(module.padding, (tuple, list)) or module.padding_mode != "zeros":
            raise ValueError(f"layer {name!r}: padding={module.padding!r}, padding_mode={module.padding_mode!r}; only explicit zero padding can be written as a token")
        return Token(
            LayerType.CONV,
            _square(module.kernel_size, "kernel", name),
            module.out_channels,
            _square(module.stride, "stride", name),
            _square(module.padding, "padding", name),
        )
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        if module.ceil_mode:
            raise ValueError(f"layer {name!r}: ceil_mode pooling cannot be written as a token")
        if isinstance(module, nn.MaxPool2d) and _square(module.dilation, "dilation", name) != 1:
            raise ValueError(f"layer {name!r}: dilated pooling cannot be written as a token")
        if isinstance(module, nn.AvgPool2d) and (not module.count_include_pad or module.divisor_override is not None):
            _lossy(name, "AvgPool2d options other than the defaults are not kept by the tokens")
        k = _square(module.kernel_size, "kernel", name)
        stride = module.stride if module.stride is not None else k
        kind = LayerType.MAXPOOL if isinstance(module, nn.MaxPool2d) else LayerType.AVGPOOL
        return Token(kind, k, channels, _square(stride, "stride", name), _square(module.padding, "padding", name))
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if not module.affine or not module.track_running_stats:
            _lossy(name, "BatchNorm without affine parameters or running statistics is rebuilt with both")
        return Token(LayerType.BATCHNORM, 0, channels, 0, 0)
    if isinstance(module, nn.ReLU):
        return Token(LayerType.RELU, 0, channels, 0, 0)
    if isinstance(module, nn.Sigmoid):
        return Token(LayerType.SIGMOID, 0, channels, 0, 0)
    if isinstance(module, (nn.Dropout, nn.Dropout2d)):
        tenths = int(round(module.p * 10))
        if abs(module.p * 10 - tenths) > 1e-6 or tenths > MAX_DROPOUT_TENTHS:
            _lossy(name, f"dropout rate {module.p} stored as {min(tenths, MAX_DROPOUT_TENTHS)}/10")
        return Token(LayerType.DROPOUT, 0, channels, 0, min(tenths, MAX_DROPOUT_TENTHS))
    if isinstance(module, nn.Linear):
        return Token(LayerType.LINEAR, 0, module.out_features, 0, 0)
    raise ValueError(
        f"layer {name!r}: {type(module).__name__} is not one of the 8 token layer types "
        "(Conv2d, MaxPool2d, BatchNorm, ReLU, Sigmoid, Dropout, AvgPool2d, Linear)"
    )


def to_tokens(model: nn.Module, input_shape: Sequence[int]) -> list[Token]:
    """``o(A)``: the token sequence of a feed-forward network ``model`` for inputs of ``input_shape`` (C, H, W).

    The network is traced with ``torch.fx`` and run once on zeros (in eval mode) to learn the
    channel count each layer sees. It must be a chain: every layer consumes the previous
    layer's output (flatten/view/reshape in between are allowed and implied by the first
    Linear). Anything else raises ``ValueError`` naming the layer and the reason.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    shape = check_input_shape(input_shape)
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as err:  # torch.fx raises many types for untraceable code
        raise ValueError(f"model: o(A) needs a torch.fx-traceable feed-forward network; tracing failed: {err}") from err
    was_training = model.training
    graph_module.eval()
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(torch.zeros(2, *shape))
    except Exception as err:
        raise ValueError(f"model: running it on a {shape} input failed: {err}") from err
    finally:
        model.train(was_training)

    def shape_of(node: fx.Node) -> torch.Size:
        return node.meta["tensor_meta"].shape

    tokens: list[Token] = []
    current: fx.Node | None = None
    flattened = False
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                raise ValueError("model: o(A) needs a network with a single input")
            current = node
            continue
        if node.op == "get_attr" or (node.op == "call_method" and node.target in _META_METHODS):
            continue
        if node.op == "call_function" and node.target is getattr:
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise ValueError("model: the output is not the last layer's activation (not a chain of layers)")
            break
        inputs = [a for a in node.all_input_nodes if "tensor_meta" in a.meta and a.op != "get_attr"]
        label = str(node.target) if node.op == "call_module" else node.name
        if len(inputs) != 1 or inputs[0] is not current:
            kind = "an addition or concatenation" if node.target in (operator.add, torch.add, torch.cat) else "a branch"
            raise ValueError(
                f"layer {label!r}: it does not simply consume the previous layer's output ({kind}); "
                "o(A) covers chains of layers only (no skip connections)"
            )
        if node.op == "call_module":
            module = graph_module.get_submodule(node.target)
            if isinstance(module, (nn.Flatten, nn.Identity)):
                flattened = flattened or isinstance(module, nn.Flatten)
            else:
                tok = _module_token(node.target, module, shape_of(current), shape_of(node))
                if tok.t == LayerType.LINEAR and len(shape_of(current)) != 2:
                    raise ValueError(f"layer {label!r}: a Linear layer must see a flattened (N, features) input")
                tokens.append(tok)
        elif node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
            tokens.append(Token(_ACTIVATION_FUNCTIONS[node.target], 0, int(shape_of(current)[1]), 0, 0))
        elif node.op == "call_method" and node.target in _ACTIVATION_METHODS:
            tokens.append(Token(_ACTIVATION_METHODS[node.target], 0, int(shape_of(current)[1]), 0, 0))
        elif (node.op == "call_function" and node.target in _FLATTEN_FUNCTIONS) or (
            node.op == "call_method" and node.target in _FLATTEN_METHODS
        ):
            if len(shape_of(node)) != 2:
                raise ValueError(f"layer {label!r}: only a flatten to (N, features) can be written as tokens")
            flattened = True
        else:
            raise ValueError(f"layer {label!r}: operation {node.target!r} cannot be written as a token")
        current = node
    if not tokens:
        raise ValueError("model: no layers found")
    _check_bias_convention(model, graph_module, tokens)
    return tokens


def _check_bias_convention(model: nn.Module, graph_module: fx.GraphModule, tokens: list[Token]) -> None:
    convs = [
        (str(n.target), graph_module.get_submodule(n.target))
        for n in graph_module.graph.nodes
        if n.op == "call_module" and isinstance(graph_module.get_submodule(n.target), nn.Conv2d)
    ]
    conv_positions = [i for i, tok in enumerate(tokens) if tok.t == LayerType.CONV]
    for (name, conv), i in zip(convs, conv_positions):
        expected = not _followed_by_batchnorm(tokens, i)
        if (conv.bias is not None) != expected:
            _lossy(
                name,
                f"Conv2d with{'' if conv.bias is not None else 'out'} bias; the tokens rebuild it "
                f"with{'' if expected else 'out'} one (a conv followed by BatchNorm has no bias)",
            )
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is None:
            _lossy(name, "Linear without bias; the tokens rebuild it with one")


def describe(tokens: Sequence[Sequence[int]]) -> str:
    """One line per token, e.g. ``CONV[k=3 o=16 s=1 p=1]``."""
    return "\n".join(str(Token(*[int(v) for v in row])) for row in tokens)


def pad_sequences(sequences: Sequence[Sequence[Sequence[int]]], max_len: int) -> tuple[Tensor, Tensor]:
    """Token sequences -> (tokens (B, max_len, 5) long, zero-padded; mask (B, max_len) bool of the real layers)."""
    tokens = torch.zeros(len(sequences), max_len, NUM_FIELDS, dtype=torch.long)
    mask = torch.zeros(len(sequences), max_len, dtype=torch.bool)
    for i, seq in enumerate(sequences):
        if len(seq) > max_len:
            raise ValueError(f"a sequence of {len(seq)} layers does not fit max_len={max_len}")
        if len(seq):
            tokens[i, : len(seq)] = torch.as_tensor([[int(v) for v in row] for row in seq], dtype=torch.long)
            mask[i, : len(seq)] = True
    return tokens, mask
