"""Channel groups (lightning_prune.core.graph, built by core.trace): golden structure, exclusions, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.core.graph import random_masks
from lightning_prune.core.trace import build_graph
from tests.core_zoo import one_thread, zoo  # one_thread: autouse fixture


def _member(group, module, role):
    (m,) = [m for m in group.members if m.module == module and m.role == role]
    return m


def test_lenet5_groups_and_flatten_mapping() -> None:
    _, graph, _ = zoo("lenet5")
    assert [(g.name, g.size) for g in graph] == [("features.0", 20), ("features.2", 50), ("classifier.1", 500)]
    assert graph.excluded == {"classifier.3": "its channels are an output of the model (head)"}
    conv2 = graph["features.2"]
    fc1_in = _member(conv2, "classifier.1", "in")
    # each of the 50 conv channels feeds 4x4 = 16 inputs of the linear layer, in flatten order
    assert fc1_in.positions == tuple(range(800))
    assert fc1_in.channels == tuple(c for c in range(50) for _ in range(16))
    assert conv2.per_channel(fc1_in).tolist() == [16] * 50
    assert conv2.layers == ("features.2", "classifier.1")
    assert graph.layers["features.2"].spatial == 8 * 8
    assert graph.layers["classifier.1"].spatial == 1


def test_resnet20_residual_group_and_gate_sites() -> None:
    _, graph, _ = zoo("resnet20")
    assert len(graph) == 12 and list(graph.excluded) == ["fc"]
    stream = graph["conv1"]  # stem + every block output of stage 1, tied by the residual additions
    assert stream.size == 16
    roles = {(m.module, m.role) for m in stream.members}
    assert {("conv1", "out"), ("bn1", "channel"), ("layer1.2.conv2", "out"), ("layer1.2.bn2", "channel")} <= roles
    assert {("layer1.0.conv1", "in"), ("layer2.0.conv1", "in"), ("layer2.0.shortcut.0", "in")} <= roles
    # gates go after the batch norms that feed the additions, never between conv and BN
    assert stream.gate_sites == ("bn1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2")
    stage2 = graph["layer2.0.conv2"]
    assert ("layer2.0.shortcut.0", "out") in {(m.module, m.role) for m in stage2.members}
    assert "layer2.0.shortcut.1" in stage2.gate_sites
    inner = graph["layer1.0.conv1"]
    assert [(m.module, m.role) for m in inner.members] == [
        ("layer1.0.conv1", "out"),
        ("layer1.0.bn1", "channel"),
        ("layer1.0.conv2", "in"),
    ]
    assert inner.gate_sites == ("layer1.0.bn1",)


def test_resnet56_has_one_group_per_block_plus_streams() -> None:
    _, graph, _ = zoo("resnet56")
    assert len(graph) == 27 + 3  # the first conv of each of the 27 blocks + 3 residual streams


def test_wideresnet_preactivation_stream_is_gated_at_the_batch_norms_reading_it() -> None:
    _, graph, _ = zoo("wrn16_4")
    stream = graph["block1.0.conv2"]
    assert stream.size == 64
    assert ("block1.0.shortcut", "out") in {(m.module, m.role) for m in stream.members}
    # the stream is read only through BN-ReLU: those batch norms are the sites
    assert stream.gate_sites == ("block1.1.bn1", "block2.0.bn1")
    assert graph["block3.0.conv2"].gate_sites == ("block3.1.bn1", "bn")


def test_mobilenet_v2_depthwise_conv_shares_the_expansion_group() -> None:
    _, graph, _ = zoo("mobilenet_v2")
    group = graph["features.2.conv.0.0"]
    assert group.size == 96
    assert [(m.module, m.role) for m in group.members] == [
        ("features.2.conv.0.0", "out"),
        ("features.2.conv.0.1", "channel"),
        ("features.2.conv.1.0", "channel"),  # depthwise: input and output channels together
        ("features.2.conv.1.1", "channel"),
        ("features.2.conv.2", "in"),
    ]
    assert group.gate_sites == ("features.2.conv.1.1",)
    assert graph.layers["features.2.conv.1.0"].depthwise


def test_densenet121_concatenation_offsets() -> None:
    _, graph, _ = zoo("densenet121")
    assert len(graph) == 120
    group = graph["features.denseblock1.denselayer1.conv2"]  # 32 new channels after the 64 input ones
    assert group.size == 32
    norm = _member(group, "features.denseblock1.denselayer3.norm1", "channel")
    assert norm.positions == tuple(range(64, 96)) and norm.channels == tuple(range(32))
    consumer = _member(group, "features.denseblock1.denselayer6.conv1", "in")
    assert consumer.positions == tuple(range(64, 96))
    transition = _member(group, "features.transition1.conv", "in")
    assert transition.positions == tuple(range(64, 96))
    # the concatenation is read only through batch norms: they are the sites, the conv is not
    assert "features.denseblock1.denselayer1.conv2" not in group.gate_sites
    assert "features.transition1.norm" in group.gate_sites


def test_functional_ops() -> None:
    _, graph, _ = zoo("functional")
    assert [(g.name, g.size) for g in graph] == [("stem", 8), ("left", 6), ("right", 10), ("fc1", 32)]
    stem = graph["stem"]
    assert {(m.module, m.role) for m in stem.members} == {
        ("stem", "out"), ("left", "in"), ("right", "in"), ("mix", "out"), ("fc1", "in"),
    }  # fmt: skip
    assert stem.per_channel(_member(stem, "fc1", "in")).tolist() == [16] * 8
    right = graph["right"]  # concatenated after the 6 channels of "left"
    assert _member(right, "bn", "channel").positions == tuple(range(6, 16))
    assert _member(right, "mix", "in").positions == tuple(range(6, 16))
    assert graph["left"].gate_sites == ("bn",) and right.gate_sites == ("bn",)
    assert stem.gate_sites == ("stem", "mix")


def test_two_heads_and_returned_features_are_never_pruned() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 8, 3)
            self.mid = nn.Conv2d(8, 8, 3)
            self.a = nn.Linear(8, 4)
            self.b = nn.Linear(8, 2)

        def forward(self, x):
            f = F.relu(self.body(x))
            m = self.mid(f)
            h = m.mean((2, 3))
            return self.a(h), self.b(h), m  # m is an output and also feeds the heads

    graph = build_graph(TwoHeads(), torch.zeros(1, 3, 8, 8))
    assert graph.names == ("body",)
    assert set(graph.excluded) == {"a", "b", "mid"}


def test_ignore_by_module_and_by_name() -> None:
    model, _, shape = zoo("resnet20")
    graph = build_graph(model, torch.zeros(shape), ignore=[model.layer1[0].conv1, "layer2.0.shortcut"])
    assert "layer1.0.conv1" not in graph and "layer2.0.conv2" not in graph
    assert graph.excluded["layer1.0.conv1"].startswith("ignored")
    assert graph.excluded["layer2.0.conv2"] == "ignored ('layer2.0.shortcut.0' is in ignore=)"
    assert len(graph) == 10


def test_grouped_convolution_groups_are_excluded_with_the_reason() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 4, 1),
                        nn.Flatten(), nn.LazyLinear(2))  # fmt: skip
    net(torch.zeros(1, 3, 8, 8))
    graph = build_graph(net, torch.zeros(1, 3, 8, 8))
    assert graph.names == ("4",)
    assert "grouped convolution '2'" in graph.excluded["0"]
    assert "grouped convolution '2'" in graph.excluded["2"]


def test_random_masks_keep_counts() -> None:
    _, graph, _ = zoo("lenet5")
    masks = random_masks(graph, 0.25, torch.Generator().manual_seed(0))
    assert {n: int(m.sum()) for n, m in masks.items()} == {"features.0": 5, "features.2": 12, "classifier.1": 125}
    with pytest.raises(ValueError, match="keep must be a fraction"):
        random_masks(graph, 0.0)


# -- clear errors ------------------------------------------------------------------------------


def test_error_nothing_prunable() -> None:
    with pytest.raises(ValueError, match=r"Linear has nothing prunable \('': its channels are an output"):
        build_graph(nn.Linear(4, 2), torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"Sequential has nothing prunable \(it has no convolution or linear layer\)"):
        build_graph(nn.Sequential(nn.ReLU()), torch.zeros(1, 4))


def test_error_untraceable_model() -> None:
    with pytest.raises(ValueError, match=r"could not trace LeNet5 with example_input of shape \(1, 3, 32, 32\): RuntimeError"):
        build_graph(zoo("lenet5")[0], torch.zeros(1, 3, 32, 32))

    class NoGrad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            with torch.no_grad():
                return self.conv(x)

    with pytest.raises(ValueError, match=r"could not trace NoGrad.*torch.no_grad"):
        build_graph(NoGrad(), torch.zeros(1, 3, 8, 8))


def test_error_unsupported_layer_names_module_and_type() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1))
    with pytest.raises(TypeError, match=r"reaches module '1' of type GroupNorm.*pass ignore=\['0'\]"):
        build_graph(net, torch.zeros(1, 3, 8, 8))
    graph = build_graph(net, torch.zeros(1, 3, 8, 8), ignore=["0"])  # the suggested way out
    assert graph.names == ("3",) and graph.excluded["0"] == "ignored ('0' is in ignore=)"

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(self.conv(x) * self.scale)

    with pytest.raises(TypeError, match=r"channel group 'conv' reaches parameter 'scale'"):
        build_graph(Scaled(), torch.zeros(1, 3, 8, 8))


def test_error_bad_arguments() -> None:
    model, _, shape = zoo("lenet5")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        build_graph("lenet", torch.zeros(shape))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="example_input must be a tensor"):
        build_graph(model, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ignore: LeNet5 has no submodule named 'nope'"):
        build_graph(model, torch.zeros(shape), ignore=["nope"])
    with pytest.raises(ValueError, match="ignore: Linear module is not a submodule"):
        build_graph(model, torch.zeros(shape), ignore=[nn.Linear(1, 1)])


def test_check_masks_errors() -> None:
    _, graph, _ = zoo("lenet5")
    with pytest.raises(ValueError, match=r"masks\['features.0'\] keeps no channel .* keep at least one channel"):
        graph.check_masks({"features.0": torch.zeros(20, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"must have shape \(20,\), got \(3,\)"):
        graph.check_masks({"features.0": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"unknown channel group 'classifier.3' \(it is not pruned: its channels are an output"):
        graph.check_masks({"classifier.3": torch.ones(10, dtype=torch.bool)})
    with pytest.raises(ValueError, match="must be boolean"):
        graph.check_masks({"features.0": torch.full((20,), 0.5)})
    full = graph.check_masks({"features.0": [1] * 19 + [0]})
    assert int(full["features.0"].sum()) == 19 and bool(full["features.2"].all())


# -- layers the trace never reached ----------------------------------------------------------


class _Branchy(nn.Module):
    """Data-dependent control flow: the example takes one branch, ``b`` is never traced."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.a = nn.Conv2d(8, 8, 3)
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
        self.aux = nn.Linear(8, 2)  # an auxiliary head, run only in training
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.a(x) if x.mean() > 0 else self.b(x)
        h = x.mean((2, 3))
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


def test_error_layers_the_trace_never_reached_are_named_with_ignore() -> None:
    net = _Branchy()
    with torch.no_grad():
        net.stem.bias.fill_(1.0)  # x.mean() > 0 for a zero input: the example takes branch a
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"never reached 'b' \(Sequential\), 'aux' \(Linear\).*ignore=\['b', 'aux'\]"):
        build_graph(net, x)
    graph = build_graph(net, x, ignore=["b", "aux"])
    assert graph.unreached == ("aux", "b.0", "b.1")
    assert graph.names == ("stem", "a")
    assert not any(m.module.startswith(("b.", "aux")) for g in graph for m in g.members)
    with pytest.raises(ValueError, match=r"never reached 'aux' \(Linear\)"):  # ignoring one is not enough
        build_graph(net, x, ignore=["b"])


def test_parameters_used_by_another_module_count_as_reached() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = nn.Conv2d(3, 3, 1)
            self.conv = nn.Conv2d(3, 8, 3)
            self.conv2 = nn.Conv2d(8, 8, 3)
            self.proj = nn.Linear(8, 4)  # its forward never runs: its weight is used functionally

        def forward(self, x):
            x = self.frozen(x)  # no autograd path to its frozen weight, but its forward ran
            h = F.relu(self.conv2(F.relu(self.conv(x)))).mean((2, 3))
            return F.linear(h, self.proj.weight, self.proj.bias)

    net = Functional()
    net.frozen.requires_grad_(False)
    graph = build_graph(net, torch.zeros(1, 3, 8, 8))
    assert graph.names == ("conv",) and graph.unreached == ()
