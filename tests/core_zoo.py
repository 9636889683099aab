"""Model zoo shared by the pruning-core tests (test_core_*.py): small inputs, cached graphs."""

from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.core.cost.latency import LatencyKey, LatencyTable, LayerTiming
from lightning_prune.core.gates import HardConcreteGate
from lightning_prune.core.graph import ChannelGraph
from lightning_prune.core.trace import build_graph
from lightning_prune.models import CifarResNet, CifarVGG, LeNet5, WideResNet, torchvision_model


@pytest.fixture(autouse=True)
def one_thread() -> None:
    """One intra-op thread: the 2-core CPU is shared, and two threads under load are much slower.
    (conftest restores the thread count after each test.) Autouse where imported."""
    torch.set_num_threads(1)


class FunctionalNet(nn.Module):
    """A small model written with functional ops: F.relu, torch.cat, x + y, F.max_pool2d, flatten."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 6, 3, padding=1)
        self.right = nn.Conv2d(8, 10, 1)
        self.bn = nn.BatchNorm2d(16)
        self.mix = nn.Conv2d(16, 8, 3, padding=1, bias=False)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.left(x)), self.right(x)], dim=1)
        y = F.relu(self.bn(y))
        z = self.mix(y) + x  # residual addition with the stem
        z = F.max_pool2d(F.relu(z), 2)
        z = torch.flatten(F.adaptive_avg_pool2d(z, 4), 1)
        return self.fc2(F.relu(self.fc1(z)))


ZOO = {
    "lenet5": (lambda: LeNet5(), (1, 1, 28, 28)),
    "vgg16": (lambda: CifarVGG(), (1, 3, 32, 32)),
    "resnet20": (lambda: CifarResNet(20), (1, 3, 32, 32)),
    "resnet56": (lambda: CifarResNet(56), (1, 3, 32, 32)),
    "wrn16_4": (lambda: WideResNet(16, 4), (1, 3, 32, 32)),
    "resnet18": (lambda: torchvision_model("resnet18", 10), (1, 3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision_model("mobilenet_v2", 10), (1, 3, 32, 32)),
    "densenet121": (lambda: torchvision_model("densenet121", 10), (1, 3, 32, 32)),
    "functional": (lambda: FunctionalNet(), (1, 3, 16, 16)),
}


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial batch-norm statistics and affine parameters (beta != 0 makes masking before a BN visible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 2 - 1)
    return model


@lru_cache(maxsize=None)
def _pristine(name: str) -> tuple[nn.Module, ChannelGraph]:
    torch.manual_seed(0)
    factory, shape = ZOO[name]
    model = randomize_norms(factory()).eval()
    return model, build_graph(model, torch.zeros(shape))


def zoo(name: str) -> tuple[nn.Module, ChannelGraph, tuple[int, ...]]:
    """A fresh copy of zoo model ``name`` (eval mode, random BN statistics), its graph and input shape."""
    model, graph = _pristine(name)
    return copy.deepcopy(model), graph, ZOO[name][1]


def random_group_masks(graph: ChannelGraph, seed: int) -> dict[str, Tensor]:
    """Each group keeps a random number (1..size) of random channels."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for group in graph:
        k = int(torch.randint(1, group.size + 1, (1,), generator=g))
        m = torch.zeros(group.size, dtype=torch.bool)
        m[torch.randperm(group.size, generator=g)[:k]] = True
        masks[group.name] = m
    return masks


def closed_gates(graph, seed: int) -> dict[str, HardConcreteGate]:
    """Hard Concrete gates whose deterministic value is exactly 0 or 1 (log_alpha = -6 or 6)."""
    gates = {}
    for name, mask in random_group_masks(graph, seed).items():
        gate = HardConcreteGate(mask.numel())
        with torch.no_grad():
            gate.log_alpha.copy_(torch.where(mask, 6.0, -6.0))
        gates[name] = gate
    return gates


TEST_KEY = LatencyKey("cpu: test", "cpu", torch.__version__, "float32", 1, 4, True)  # of the tables made up here


def grid(full: int) -> tuple[int, ...]:
    return tuple(sorted({0, 1, full // 3, (2 * full) // 3, full}))


def macs_table(graph, per_volume: float = 0.0, offset: float | None = None) -> LatencyTable:
    """A table whose layer 'timings' are the layers' MACs: bilinear in (cin, out), so the
    interpolation reproduces them exactly at any widths."""
    layers = {}
    for name, layer in graph.layers.items():
        if layer.kind == "norm":
            continue
        a, b = layer.coefficients("macs")
        cin = 1 if layer.depthwise else layer.in_channels // layer.groups
        cin_grid, out_grid = grid(cin), grid(layer.out_channels)
        layers[name] = LayerTiming(cin_grid, out_grid, tuple(tuple(float(a * c * o + b * o) for o in out_grid) for c in cin_grid))
    offset = float(graph.untracked["macs"]) if offset is None else offset
    return LatencyTable(TEST_KEY, layers, offset, per_volume, 0.0, {}, {})
