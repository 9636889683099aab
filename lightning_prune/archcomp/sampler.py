"""Random architectures for the compressor's training set (Ashok, "Architecture Compression",
arXiv:1902.03326, 2019, appendix Sec. 9).

Length ``l ~ U(length)``; ``l - 1`` layers with type ``t ~ U(1, 8)`` and hyperparameters drawn
uniformly from the configured ranges; the last layer is ``Linear(num_classes)``. Fields a
layer does not have are 0 and channel-preserving layers carry their input channels (the
canonical form of :func:`lightning_prune.archcomp.tokens.plan`). Input channels are inferred,
so the first layer always matches the task input. Once a Linear layer has been drawn, later
types are drawn among the non-spatial ones (a convolution cannot follow a flatten).

Degenerate architectures are rejected and redrawn: no convolution, a feature map shrinking
below ``min_size`` pixels, or a measured cost (``count_cost``) over ``max_macs`` (MACs per
sample), ``max_params`` (parameters) or ``max_activations`` (output elements of all Conv and
Linear layers per sample, the memory taken by activations).

The paper's ranges are the defaults (``length=(2, 50)``, ``kernel=(1, 10)``,
``stride=(1, 10)``, ``channels=(16, 4096)``, ``padding=(1, 10)``); CPU runs use smaller ones.
Sampling is deterministic in ``(seed, index)``: architecture ``i`` is the same in every
process, which is what lets a Hydra multirun train them in parallel jobs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_prune._checks import check_int
from lightning_prune.archcomp.tokens import (
    MAX_DROPOUT_TENTHS,
    POOLS,
    SPATIAL,
    InvalidArchitecture,
    LayerType,
    Plan,
    Token,
    build,
    check_input_shape,
    plan,
)
from lightning_prune.core.cost import count_cost

Range = tuple[int, int]


def _check_range(name: str, value: Sequence[int], low: int) -> Range:
    if not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be a (low, high) pair, got {value!r}")
    lo, hi = value
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (lo, hi)):
        raise TypeError(f"{name} must hold ints, got {value!r}")
    if lo < low or hi < lo:
        raise ValueError(f"{name} must satisfy {low} <= low <= high, got {value!r}")
    return (lo, hi)


def _check_limit(name: str, value: int | float | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise ValueError(f"{name} must be None or a positive number, got {value!r}")


@dataclass(frozen=True)
class SampledArchitecture:
    """One accepted architecture: its canonical tokens and its measured cost per sample."""

    index: int
    tokens: tuple[Token, ...]
    params: int
    macs: int
    activations: int
    rejected: int  # how many draws were rejected before this one


class ArchitectureSampler:
    """Draws valid random architectures for inputs of ``input_shape`` (C, H, W) and ``num_classes`` classes.

    Args:
        input_shape: the task's input (channels, height, width).
        num_classes: outputs of the final Linear layer.
        length: range of the number of layers, including the final Linear (at least 2).
        kernel, stride, padding, channels: ranges of the token fields (pool padding is further
            capped at ``kernel // 2``, as PyTorch requires).
        features: range of a hidden Linear layer's outputs (default: ``channels``).
        dropout: range of the dropout rate in tenths.
        min_size: smallest feature-map height/width allowed after any layer.
        max_macs, max_params, max_activations: rejection limits on the measured cost
            (MACs per sample, parameters, activation elements per sample); None = no limit.
        max_tries: draws per architecture before giving up with an error.
        seed: base seed; architecture ``i`` depends only on ``(seed, i)``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        length: Sequence[int] = (2, 50),
        kernel: Sequence[int] = (1, 10),
        stride: Sequence[int] = (1, 10),
        padding: Sequence[int] = (1, 10),
        channels: Sequence[int] = (16, 4096),
        features: Sequence[int] | None = None,
        dropout: Sequence[int] = (0, 5),
        min_size: int = 1,
        max_macs: float | None = None,
        max_params: float | None = None,
        max_activations: float | None = None,
        max_tries: int = 10000,
        seed: int = 0,
    ) -> None:
        self.input_shape = check_input_shape(input_shape)
        check_int("num_classes", num_classes)
        self.num_classes = num_classes
        self.length = _check_range("length", length, 2)
        self.kernel = _check_range("kernel", kernel, 1)
        self.stride = _check_range("stride", stride, 1)
        self.padding = _check_range("padding", padding, 0)
        self.channels = _check_range("channels", channels, 1)
        self.features = _check_range("features", features, 1) if features is not None else self.channels
        self.dropout = _check_range("dropout", dropout, 0)
        if self.dropout[1] > MAX_DROPOUT_TENTHS:
            raise ValueError(f"dropout must stay within 0..{MAX_DROPOUT_TENTHS} tenths, got {dropout!r}")
        check_int("min_size", min_size)
        for name, value in (("max_macs", max_macs), ("max_params", max_params), ("max_activations", max_activations)):
            _check_limit(name, value)
        check_int("max_tries", max_tries)
        check_int("seed", seed, 0)
        self.min_size = min_size
        self.max_macs, self.max_params, self.max_activations = max_macs, max_params, max_activations
        self.max_tries = max_tries
        self.seed = seed

    def draw(self, rng: random.Random) -> list[Token]:
        """One unchecked draw: random layers then the final Linear, in canonical form."""
        n = rng.randint(*self.length)
        channels = self.input_shape[0]
        tokens: list[Token] = []
        flat = False
        for _ in range(n - 1):
            allowed = [t for t in LayerType if not (flat and t in SPATIAL)]
            t = rng.choice(allowed)
            if t == LayerType.CONV:
                channels = rng.randint(*self.channels)
                tok = Token(t, rng.randint(*self.kernel), channels, rng.randint(*self.stride), rng.randint(*self.padding))
            elif t in POOLS:
                k = rng.randint(*self.kernel)
                pad = min(rng.randint(*self.padding), k // 2)
                tok = Token(t, k, channels, rng.randint(*self.stride), pad)
            elif t == LayerType.LINEAR:
                channels = rng.randint(*self.features)
                flat = True
                tok = Token(t, 0, channels, 0, 0)
            elif t == LayerType.DROPOUT:
                tok = Token(t, 0, channels, 0, rng.randint(*self.dropout))
            else:
                tok = Token(t, 0, channels, 0, 0)
            tokens.append(tok)
        tokens.append(Token(LayerType.LINEAR, 0, self.num_classes, 0, 0))
        return tokens

    def rejection(self, tokens: Sequence[Token]) -> str | None:
        """Why ``tokens`` is degenerate, or None when it is accepted.

        Reasons start with their kind: ``invalid``, ``no-conv``, ``small-map``, ``params``,
        ``macs`` or ``activations``, then a colon and the details.
        """
        return self._judge(tokens)[0]

    def _judge(self, tokens: Sequence[Token]) -> tuple[str | None, tuple[int, int, int] | None]:
        """(rejection reason or None, measured (MACs, params, activations) when measured)."""
        try:
            checked = plan(tokens, self.input_shape, num_classes=self.num_classes)
        except InvalidArchitecture as err:
            return "invalid: " + "; ".join(err.reasons), None
        if checked.num_conv == 0:
            return "no-conv: the architecture has no convolution", None
        small = [s for s in checked.shapes if len(s) == 3 and min(s[1:]) < self.min_size]
        if small:
            return f"small-map: feature map {small[0][1]}x{small[0][2]} smaller than min_size={self.min_size}", None
        if self.max_params is not None and checked.params > self.max_params:
            return f"params: {checked.params} parameters > max_params={self.max_params}", None
        cost = self.measure(checked)
        if self.max_macs is not None and cost[0] > self.max_macs:
            return f"macs: {cost[0]} MACs > max_macs={self.max_macs}", cost
        if self.max_activations is not None and cost[2] > self.max_activations:
            return f"activations: {cost[2]} activation elements > max_activations={self.max_activations}", cost
        return None, cost

    def measure(self, checked: Plan) -> tuple[int, int, int]:
        """Measured (MACs, params, activations) per sample of the built network."""
        cost = count_cost(build(checked), torch.zeros(1, *self.input_shape))
        return cost.macs, cost.params, cost.volume

    def sample(self, index: int) -> SampledArchitecture:
        """Architecture number ``index`` (deterministic in ``(seed, index)``)."""
        check_int("index", index, 0)
        rng = random.Random(f"archcomp-sampler-{self.seed}-{index}")
        reasons: dict[str, int] = {}
        for tries in range(self.max_tries):
            tokens = self.draw(rng)
            reason, cost = self._judge(tokens)
            if reason is None and cost is not None:
                macs, params, acts = cost
                return SampledArchitecture(index, tuple(tokens), params, macs, acts, tries)
            kind = reason.split(":")[0]
            reasons[kind] = reasons.get(kind, 0) + 1
        raise RuntimeError(
            f"no valid architecture in {self.max_tries} draws for index {index} (rejections by kind: {reasons}); "
            "widen the limits or narrow the ranges"
        )
