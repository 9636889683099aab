"""Cost model (lightning_prune.core.cost.model): exact integers against measurement on shrunk models,
expectations against enumeration, per-channel weights against finite differences."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightning_prune.core.cost import CostModel, count_cost
from lightning_prune.core.gates import HardConcreteGate
from lightning_prune.core.trace import build_graph
from lightning_prune.core.surgery import shrink
from tests.core_zoo import ZOO, one_thread, random_group_masks, zoo  # one_thread: autouse fixture

COSTS = ("volume", "macs", "params")


@pytest.mark.parametrize("name", list(ZOO))
def test_exact_cost_equals_measurement_on_the_shrunk_model(name: str) -> None:
    model, graph, shape = zoo(name)
    x = torch.zeros(shape)
    cost = CostModel(graph)
    measured = count_cost(model, x)
    assert {c: cost.full(c) for c in COSTS} == {c: measured[c] for c in COSTS}
    for seed in (1, 2):
        masks = random_group_masks(graph, seed)
        shrunk = zoo(name)[0]
        new_graph = shrink(shrunk, masks, graph=graph)
        report = count_cost(shrunk, x)  # FlopCounterMode count / 2, hooks, parameter tensors
        assert {c: cost.exact(masks, c) for c in COSTS} == {c: report[c] for c in COSTS}
        assert report.macs < measured.macs
        per_layer = cost.per_layer(masks, "macs")
        for layer, lc in report.per_layer.items():
            if layer in per_layer and graph.layers[layer].kind != "norm":
                assert per_layer[layer] == lc.macs, layer
        kept = cost.kept_channels(masks)
        modules = dict(shrunk.named_modules())
        for layer, (cin, cout) in kept.items():
            m = modules[layer]
            sizes = (m.num_features,) * 2 if hasattr(m, "num_features") else (
                (m.in_channels, m.out_channels) if hasattr(m, "in_channels") else (m.in_features, m.out_features))
            assert (cin, cout) == sizes, layer
        # the graph returned by shrink describes the shrunk model: its full cost is the measurement,
        # and it is what tracing the shrunk model gives
        assert {c: CostModel(new_graph).full(c) for c in COSTS} == {c: report[c] for c in COSTS}
        if seed == 1:
            traced = build_graph(shrunk, x)
            assert (new_graph.groups, new_graph.layers) == (traced.groups, traced.layers)


def _tiny() -> tuple[nn.Module, CostModel]:
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 3, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 2),
    )  # fmt: skip
    return net, CostModel(build_graph(net, torch.zeros(1, 2, 6, 6)))


def test_expected_cost_equals_the_average_over_all_masks() -> None:
    _, cost = _tiny()
    assert cost.names == ("0", "3") and cost.sizes == (3, 3)
    probs = {"0": torch.tensor([0.9, 0.2, 0.5]), "3": torch.tensor([0.3, 0.6, 0.75])}
    p = torch.cat([probs["0"], probs["3"]]).double()
    for c in COSTS:
        average = 0.0
        for bits in itertools.product([0, 1], repeat=6):
            b = torch.tensor(bits, dtype=torch.float64)
            weight = float(torch.prod(torch.where(b > 0, p, 1 - p)))
            masks = {"0": torch.tensor(bits[:3], dtype=torch.bool), "3": torch.tensor(bits[3:], dtype=torch.bool)}
            average += weight * cost.exact(masks, c)
        assert cost.expected(probs, c).item() == pytest.approx(average, rel=1e-12)


def test_expected_equals_exact_for_hard_probabilities() -> None:
    _, graph, _ = zoo("resnet20")
    cost = CostModel(graph)
    masks = random_group_masks(graph, 3)
    probs = {n: m.float() for n, m in masks.items()}
    for c in COSTS:
        assert cost.expected(probs, c).item() == cost.exact(masks, c)


def test_golden_volume_channel_weights() -> None:
    w = CostModel(zoo("lenet5")[1]).channel_weights("volume")
    assert w["features.0"].tolist() == [24.0 * 24] * 20
    assert w["features.2"].tolist() == [8.0 * 8] * 50
    assert w["classifier.1"].tolist() == [1.0] * 500
    w = CostModel(zoo("resnet20")[1]).channel_weights("volume")
    assert w["conv1"].tolist() == [32.0 * 32 * 4] * 16  # stem + the conv2 of three blocks
    assert w["layer2.0.conv2"].tolist() == [16.0 * 16 * 4] * 32  # three conv2 + the shortcut conv
    assert w["layer3.0.conv1"].tolist() == [8.0 * 8] * 64


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "mobilenet_v2", "functional"])
def test_channel_weights_are_the_marginal_cost_of_one_channel(name: str) -> None:
    _, graph, _ = zoo(name)
    cost = CostModel(graph)
    g = torch.Generator().manual_seed(0)
    for c in COSTS:
        weights = cost.channel_weights(c)
        for group in list(graph)[:4]:
            i = int(torch.randint(group.size, (1,), generator=g))
            mask = torch.ones(group.size, dtype=torch.bool)
            mask[i] = False
            assert cost.full(c) - cost.exact({group.name: mask}, c) == weights[group.name][i].item(), (c, group.name)


def test_channel_weights_at_probabilities_match_finite_differences() -> None:
    _, graph, _ = zoo("functional")
    cost = CostModel(graph)
    g = torch.Generator().manual_seed(1)
    probs = {group.name: torch.rand(group.size, generator=g, dtype=torch.float64) for group in graph}
    weights = cost.channel_weights("macs", probs)
    for name in ("stem", "right"):
        bumped = {k: v.clone() for k, v in probs.items()}
        bumped[name][2] += 1.0  # the cost is linear in each single probability
        diff = cost.expected(bumped, "macs") - cost.expected(probs, "macs")
        assert diff.item() == pytest.approx(weights[name][2].item(), rel=1e-12)


def test_expected_cost_is_differentiable_for_gates() -> None:
    _, graph, _ = zoo("lenet5")
    cost = CostModel(graph)
    gates = {group.name: HardConcreteGate(group.size) for group in graph}
    value = cost.expected({n: gate.open_probability() for n, gate in gates.items()}, "macs")
    value.backward()
    assert value.dtype == torch.float64 and 0 < value.item() < cost.full("macs")
    for gate in gates.values():
        assert gate.log_alpha.grad is not None and bool((gate.log_alpha.grad > 0).all())


def test_keep_counts_and_empty_groups() -> None:
    _, graph, _ = zoo("lenet5")
    cost = CostModel(graph)
    mask = torch.arange(50) < 7
    assert cost.exact({"features.2": 7}, "params") == cost.exact({"features.2": mask}, "params")
    # conv 20->50 5x5 (+bias) and linear 800->500 (+bias) with 7 of the 50 channels kept
    removed = 43 * (20 * 25 + 1) + 43 * 16 * 500
    assert cost.full("params") - cost.exact({"features.2": 7}, "params") == removed
    assert cost.full("params") == 431080 and cost.full("macs") == 2293000  # LeNet-5 golden sizes
    assert cost.exact({"features.0": 0}, "volume") == cost.full("volume") - 20 * 24 * 24


def test_errors() -> None:
    _, graph, _ = zoo("lenet5")
    cost = CostModel(graph)
    with pytest.raises(ValueError, match="cost must be one of 'volume', 'macs', 'params', 'latency', got 'flops'"):
        cost.full("flops")
    with pytest.raises(ValueError, match="unknown channel group 'conv'"):
        cost.exact({"conv": 3}, "macs")
    with pytest.raises(ValueError, match=r"a keep-count must be in \[0, 20\], got 21"):
        cost.exact({"features.0": 21}, "macs")
    with pytest.raises(ValueError, match=r"probs\['features.0'\] must have shape \(20,\)"):
        cost.expected({"features.0": torch.ones(3)}, "macs")
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        cost.expected({"features.0": torch.ones(20, dtype=torch.long)}, "macs")
    with pytest.raises(TypeError, match="graph must be a ChannelGraph"):
        CostModel(nn.Linear(2, 2))  # type: ignore[arg-type]
