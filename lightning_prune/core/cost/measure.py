"""Measuring the cost of a concrete network: MACs, parameters and activation volume.

This is the *measurement* side, independent of any pruning bookkeeping: MACs come from
``torch.utils.flop_counter.FlopCounterMode`` (which reports FLOPs = 2 x MACs for convolutions
and matrix products), activation volume from forward hooks, parameters from the tensors.

Definitions (per input sample):
- MACs: multiply-accumulates of convolutions and linear layers (matmuls).
- params: number of parameter elements.
- volume: number of output elements (C x H x W) of every convolution and linear layer (of a
  layer of a mixed-connectivity residual branch, its own channels, not the zeros they are
  scattered into: see :mod:`lightning_prune.core.residual`); for
  the layers that are gated this is the activation volume ``V`` of Lemaire, Achkar and Jodoin,
  "Structured Pruning of Neural Networks with Budget-Aware Regularization" (CVPR 2019,
  arXiv:1811.09332): the sum of H x W over feature maps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune.core.residual import own_output_numel

VOLUME_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class LayerCost:
    macs: int
    params: int
    volume: int


@dataclass(frozen=True)
class CostReport:
    """Cost per input sample. ``per_layer`` maps leaf-module names to their own cost."""

    macs: int
    params: int
    volume: int
    per_layer: dict[str, LayerCost] = field(default_factory=dict)

    def __getitem__(self, cost: str) -> int:
        if cost not in ("macs", "params", "volume"):
            raise KeyError(f"cost must be 'macs', 'params' or 'volume', got {cost!r}")
        return int(getattr(self, cost))


def check_example(example_input: object) -> tuple[Tensor, ...]:
    """``example_input`` as a tuple of tensors with a batch dimension, or a clear error."""
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError("example_input must be a tensor or a tuple of tensors")
    if inputs[0].dim() == 0 or inputs[0].shape[0] < 1:
        raise ValueError("example_input must have a leading batch dimension of at least 1")
    return tuple(inputs)


@torch.no_grad()
def forward_with_hooks(model: nn.Module, inputs: tuple[Tensor, ...], hooks: Iterable[tuple[nn.Module, Callable[..., None]]]) -> None:
    """Run ``model(*inputs)`` once in eval mode without gradients, with each ``(module, hook)``
    registered as a forward hook; the hooks are removed and the model's mode restored after."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    was_training = model.training
    model.eval()
    try:
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


@torch.no_grad()
def count_cost(model: nn.Module, example_input: Tensor | tuple[Tensor, ...]) -> CostReport:
    """Measure MACs, parameters and activation volume of ``model`` per sample of ``example_input``.

    The model is run once in eval mode (its mode is restored afterwards).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = check_example(example_input)
    batch = inputs[0].shape[0]
    volumes: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, _inp: object, out: Tensor) -> None:
        if isinstance(out, Tensor):  # a scattered layer's own output, without the zeros it is placed in
            volumes[names[module]] = volumes.get(names[module], 0) + own_output_numel(module, out[0])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, VOLUME_LAYERS)]
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, depth=None) as counter:
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    prefix = type(model).__name__ + "."
    flops = {
        name[len(prefix):]: sum(ops.values())
        for name, ops in counter.get_flop_counts().items()
        if name.startswith(prefix)
    }
    per_layer: dict[str, LayerCost] = {}
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue  # only leaves: a parent's cost is the sum of its children
        params = sum(p.numel() for p in module.parameters(recurse=False))
        macs = flops.get(name, 0) // (2 * batch)
        volume = volumes.get(name, 0)
        if params or macs or volume:
            per_layer[name] = LayerCost(macs=macs, params=params, volume=volume)
    return CostReport(
        macs=counter.get_total_flops() // (2 * batch),
        params=sum(p.numel() for p in model.parameters()),
        volume=sum(volumes.values()),
        per_layer=per_layer,
    )


def output_widths(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every convolution and linear layer, by qualified name."""
    return {
        name: m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
        for name, m in model.named_modules()
        if isinstance(m, VOLUME_LAYERS)
    }
