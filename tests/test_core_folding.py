"""Hard pruning keeps the masked network's function (lightning_prune.core.folding): constants that
removed channels carry through a Sigmoid or ``x + c`` are folded into the next layer's bias,
what cannot be folded is refused naming the operation, and masked == shrunk is checked."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_prune
from lightning_prune.core.folding import shrink_as_masked
from lightning_prune.core.gates import FixedMask
from lightning_prune.core.gating import attach_gates
from lightning_prune.core.trace import build_graph
from lightning_prune.core.surgery import pruning_history, replay, shrink
from tests.core_zoo import one_thread, random_group_masks, randomize_norms, zoo  # one_thread: autouse fixture


def _conv_sigmoid_conv(padding: int) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Sigmoid(), nn.Conv2d(8, 6, 3, padding=padding), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * (6 if padding else 4) ** 2, 3),
    )  # fmt: skip
    return randomize_norms(net).eval()


class _LinearPlusOne(nn.Module):
    """linear -> x + 1 -> linear (without bias: folding creates one)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 12)
        self.fc2 = nn.Linear(12, 7, bias=False)
        self.head = nn.Linear(7, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.fc2(self.fc1(x) + 1.0)))


def _masked_output(net: nn.Module, graph, masks, x: Tensor) -> Tensor:
    gates = attach_gates(net, graph, {n: FixedMask(m) for n, m in masks.items()})
    with torch.no_grad():
        out = net(x)
    gates.detach()
    return out


def test_sigmoid_between_convolutions_is_folded_into_the_next_bias_on_export() -> None:
    net = _conv_sigmoid_conv(padding=0)
    graph = build_graph(net, torch.zeros(1, 3, 8, 8))
    masks = {"0": torch.arange(8) % 2 == 0}
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # not the batch the check uses
    masked = _masked_output(net, graph, masks, x)
    gates = attach_gates(net, graph, {n: FixedMask(m) for n, m in masks.items()})
    small = lightning_prune.export(net)
    gates.detach()
    assert small[3].in_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked, atol=1e-5, rtol=1e-5)


def test_x_plus_constant_between_linear_layers_is_folded_into_a_created_bias(tmp_path) -> None:
    torch.manual_seed(0)
    net = _LinearPlusOne().eval()
    graph = build_graph(net, torch.zeros(1, 5))
    masks = {"fc1": torch.arange(12) < 5, "fc2": torch.arange(7) != 3}
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    masked = _masked_output(net, graph, masks, x)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    new_graph = shrink_as_masked(net, masks, graph=graph, optimizer=opt)
    assert net.fc2.bias is not None and net.fc2.bias.shape == (6,) and new_graph.layers["fc2"].bias
    assert any(p is net.fc2.bias for g in opt.param_groups for p in g["params"])  # trained from now on
    with torch.no_grad():
        torch.testing.assert_close(net(x), masked, atol=1e-5, rtol=1e-5)
    # the created bias is part of the pruning history: a fresh instance replays it and loads
    assert pruning_history(net)["created_biases"] == ["fc2"]
    fresh = _LinearPlusOne().eval()
    replay(fresh, pruning_history(net))
    fresh.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), masked, atol=1e-5, rtol=1e-5)
    path = tmp_path / "small.pt"
    lightning_prune.save_pruned(net, path)
    loaded = lightning_prune.load_pruned(path, model=_LinearPlusOne())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), masked, atol=1e-5, rtol=1e-5)


def test_conv_padding_with_zeros_cannot_fold_and_is_refused_naming_the_op() -> None:
    net = _conv_sigmoid_conv(padding=1)
    graph = build_graph(net, torch.zeros(1, 3, 8, 8))
    before = copy.deepcopy(net.state_dict())
    gates = attach_gates(net, graph, {"0": FixedMask(torch.arange(8) < 6)})
    with pytest.raises(
        ValueError,
        match=r"group '0' exactly: the path from its gate at '1' to the layer '3' that reads them goes through "
        r"module '2' \(Sigmoid\), which does not map 0 to 0; they carry the constant 0.5 into '3', which pads its "
        r"input with zeros.*ignore=\['0'\]",
    ):
        lightning_prune.export(net)
    gates.detach()
    with pytest.raises(ValueError, match=r"module '2' \(Sigmoid\)"):
        shrink_as_masked(net, {"0": torch.arange(8) < 6}, graph=graph)
    assert net[3].in_channels == 8 and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    # other padding modes repeat the constant at the borders: that folds exactly
    net[3].padding_mode = "replicate"
    x = torch.randn(2, 3, 8, 8)
    masked = _masked_output(net, graph, {"0": torch.arange(8) < 6}, x)
    shrink_as_masked(net, {"0": torch.arange(8) < 6}, graph=graph)
    with torch.no_grad():
        torch.testing.assert_close(net(x), masked, atol=1e-5, rtol=1e-5)


def test_a_value_that_varies_cannot_fold_and_is_refused_naming_the_ops() -> None:
    class Offset(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3)
            self.conv2 = nn.Conv2d(8, 4, 1)
            self.head = nn.Linear(4, 2)
            self.register_buffer("offset", torch.randn(1, 8, 6, 6))  # varies over positions

        def forward(self, x: Tensor) -> Tensor:
            h = torch.sigmoid(self.conv1(x) + self.offset)
            return self.head(F.relu(self.conv2(h)).mean((2, 3)))

    net = Offset().eval()
    graph = build_graph(net, torch.zeros(1, 3, 8, 8))
    with pytest.raises(
        ValueError,
        match=r"from its gate at 'conv1' to the layer 'conv2' that reads them goes through add, sigmoid, which do not "
        r"all map 0 to 0; they carry values that vary .*ignore=\['conv1'\]",
    ):
        shrink_as_masked(net, {"conv1": torch.arange(8) < 4}, graph=graph)
    assert net.conv2.in_channels == 8


def test_an_op_that_depends_on_the_channel_count_fails_the_check() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3)
            self.conv2 = nn.Conv2d(8, 4, 3)
            self.head = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = F.relu(self.conv1(x))
            h = h / h.shape[1]  # the channel count: 8 masked, fewer once shrunk
            return self.head(F.relu(self.conv2(h)).mean((2, 3)))

    net = Scaled().eval()
    graph = build_graph(net, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"computes something else than the masked one.*Pruned groups: 'conv1'"):
        shrink_as_masked(net, {"conv1": torch.arange(8) < 4}, graph=graph)


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2", "functional"])
def test_relu_networks_shrink_as_before(name: str) -> None:
    model, graph, _ = zoo(name)
    plain = copy.deepcopy(model)
    masks = random_group_masks(graph, 3)
    new_graph = shrink_as_masked(model, masks, graph=graph)
    plain_graph = shrink(plain, masks, graph=graph)
    assert new_graph == plain_graph and "created_biases" not in pruning_history(model)
    state, plain_state = model.state_dict(), plain.state_dict()
    assert state.keys() == plain_state.keys()
    for key, value in state.items():  # the same tensors, and the same history
        assert torch.equal(value, plain_state[key]) if isinstance(value, Tensor) else value == plain_state[key]


def test_errors() -> None:
    model, graph, _ = zoo("lenet5")
    with pytest.raises(TypeError, match="graph must be a ChannelGraph"):
        shrink_as_masked(model, {}, graph=None)  # type: ignore[arg-type]
    gates = attach_gates(model, graph, {"features.0": FixedMask(torch.ones(20, dtype=torch.bool))})
    with pytest.raises(ValueError, match="model has gates attached"):
        shrink_as_masked(model, {}, graph=graph)
    gates.detach()
    assert shrink_as_masked(model, {}, graph=graph) == graph  # nothing removed: nothing to check
