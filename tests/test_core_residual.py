"""Mixed-connectivity residual blocks (Lemaire, Achkar and Jodoin, CVPR 2019, supplementary
material, Algorithm 1): the graph (branches found in the trace), masked == shrunk with branches
emptied, exact costs against count_cost and FlopCounterMode, learned depth in allocation and the
methods, save -> load_pruned, optimizer state, resume, AdaNS, configs."""

from __future__ import annotations

import copy
import itertools
import os
import subprocess
import sys
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import lightning_prune
from lightning_prune.callbacks import BudgetAwareRegularization, HardPruning, SigmoidalBudgetAnnealing
from lightning_prune.callbacks.report import plot_alive_channels
from lightning_prune.core.allocation import fit_budget, minimum_cost
from lightning_prune.core.cost import CostModel, count_cost
from lightning_prune.core.export import load_pruned, save_pruned
from lightning_prune.core.folding import shrink_as_masked
from lightning_prune.core.gates import FixedMask
from lightning_prune.core.gating import attach_gates
from lightning_prune.core.graph import ChannelGraph
from lightning_prune.core.residual import RemovedLayer, is_scattered
from lightning_prune.core.session import PruningSession
from lightning_prune.core.surgery import pruning_history, replay, shrink
from lightning_prune.core.trace import build_graph
from lightning_prune.methods import BarrierPenalty, DirichletSwitches, RandomChoice
from lightning_prune.models import CifarResNet, torchvision_model
from lightning_prune.search.spaces import CompressionSpace
from tests.bar_helpers import tensor_state, trainer
from tests.conftest import compose_train
from tests.core_zoo import ZOO, one_thread, randomize_norms  # one_thread: autouse fixture
from tests.residual_helpers import INPUT, WIDTHS, ResidualMLP, ResidualModule, UserResNet, residual_loader

COSTS = ("volume", "macs", "params")
MIXED = {
    "resnet20": (ZOO["resnet20"][0], (1, 3, 32, 32), 9),
    "resnet56": (ZOO["resnet56"][0], (1, 3, 32, 32), 27),
    "resnet18": (ZOO["resnet18"][0], (1, 3, 32, 32), 8),
    "resnet50": (lambda: torchvision_model("resnet50", 10), (1, 3, 32, 32), 16),  # Bottleneck blocks
    "mobilenet_v2": (ZOO["mobilenet_v2"][0], (1, 3, 32, 32), 10),  # inverted residuals
    "wrn16_4": (ZOO["wrn16_4"][0], (1, 3, 32, 32), 6),  # pre-activation: branches end in a convolution
    "user_resnet": (lambda: UserResNet(), (1, *INPUT), 3),  # hand-written blocks in a foreign module
    "residual_mlp": (lambda: ResidualMLP(), (1, 3, 4, 4), 2),  # linear layers, channels last
    "functional": (ZOO["functional"][0], (1, 3, 16, 16), 1),  # functional ops, a concatenation in the branch
}


@lru_cache(maxsize=None)
def _pristine(name: str) -> tuple[nn.Module, ChannelGraph]:
    torch.manual_seed(0)
    factory, shape, _ = MIXED[name]
    model = randomize_norms(factory()).eval()
    return model, build_graph(model, torch.zeros(shape), residual="mixed")


def mixed(name: str) -> tuple[nn.Module, ChannelGraph, tuple[int, ...]]:
    model, graph = _pristine(name)
    return copy.deepcopy(model), graph, MIXED[name][1]


def mixed_masks(graph: ChannelGraph, seed: int, p_empty: float = 0.35, empty_first: bool = True) -> dict[str, Tensor]:
    """Random keep-masks; a branch group keeps no channel with probability ``p_empty``, the
    first branch is emptied (``empty_first``) and the last keeps about half the channels its
    stream keeps."""
    g = torch.Generator().manual_seed(seed)
    branches = graph.branch_names
    masks = {}
    for group in graph:
        empty = group.is_branch and ((empty_first and group.name == branches[0]) or float(torch.rand(1, generator=g)) < p_empty)
        m = torch.zeros(group.size, dtype=torch.bool)
        if not empty:
            k = int(torch.randint(1, group.size + 1, (1,), generator=g))
            m[torch.randperm(group.size, generator=g)[:k]] = True
        masks[group.name] = m
    if len(branches) > 1:  # the last branch keeps about half of the channels its stream keeps
        last = graph[branches[-1]]
        alive = torch.nonzero(masks[last.stream][torch.tensor(last.into)]).flatten()
        m = torch.zeros(last.size, dtype=torch.bool)
        m[alive[torch.randperm(len(alive), generator=g)[: max(1, len(alive) // 2)]]] = True
        masks[last.name] = m
    return masks


def masked_output(model: nn.Module, graph: ChannelGraph, masks: dict[str, Tensor], x: Tensor) -> Tensor:
    gates = attach_gates(model, graph, {n: FixedMask(m) for n, m in masks.items()})
    try:
        with torch.no_grad():
            return model.eval()(x)
    finally:
        gates.detach()


def assert_close(a: Tensor, b: Tensor) -> None:
    scale = max(float(b.abs().max()), 1.0)
    assert float((a - b).abs().max()) <= 1e-5 * scale


def flop_counter_macs(model: nn.Module, x: Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops() // (2 * x.shape[0])


# -- the graph ---------------------------------------------------------------------------------


def test_resnet20_branches_are_groups_of_their_own_and_the_streams_keep_stem_and_projections() -> None:
    model = CifarResNet(20).eval()
    tied = build_graph(model, torch.zeros(1, 3, 32, 32))
    graph = build_graph(model, torch.zeros(1, 3, 32, 32), residual="mixed")
    assert tied.residual == "tied" and not tied.branch_names and len(tied) == 12
    assert len(tied["conv1"].layers) == 13  # the regular block: stem, bn1 and every stage-1 conv2/bn2 tied
    assert graph.residual == "mixed" and len(graph) == 12 + 9
    streams = ("conv1", "layer2.0.shortcut.0", "layer3.0.shortcut.0")
    for stage, stream in zip((1, 2, 3), streams):
        for block in range(3):
            branch = graph[f"layer{stage}.{block}.conv2"]
            prefix = f"layer{stage}.{block}"
            assert branch.stream == stream and branch.into == tuple(range(branch.size))
            assert [(m.module, m.role) for m in branch.members] == [(f"{prefix}.conv2", "out"), (f"{prefix}.bn2", "channel")]
            assert branch.gate_sites == (f"{prefix}.bn2",) and branch.branch_output == f"{prefix}.bn2"
            assert branch.branch_layers == tuple(f"{prefix}.{n}" for n in ("conv1", "bn1", "conv2", "bn2"))
            assert not graph[stream].is_branch and f"{prefix}.bn2" not in graph[stream].layers
            reads = stream if block > 0 else ("conv1", "conv1", "layer2.0.shortcut.0")[stage - 1]
            assert f"{prefix}.conv1" in graph[reads].layers  # the branch reads its input stream's channels
    assert graph["conv1"].layers[:2] == ("conv1", "bn1") and graph["conv1"].gate_sites == ("bn1",)
    assert graph["layer2.0.shortcut.0"].gate_sites == ("layer2.0.shortcut.1",)
    assert graph["layer1.0.conv1"] == tied["layer1.0.conv1"]  # a block's inner group is the same either way
    assert build_graph(model, torch.zeros(1, 3, 32, 32), residual="tied") == tied  # tied is the default
    with pytest.raises(ValueError, match="residual must be one of 'tied', 'mixed'"):
        build_graph(model, torch.zeros(1, 3, 32, 32), residual="regular")


@pytest.mark.parametrize("name", list(MIXED))
def test_residual_branches_are_found_in_the_trace_whatever_the_classes(name: str) -> None:
    _, graph, _ = mixed(name)
    assert len(graph.branch_names) == MIXED[name][2]
    for branch in graph.branch_names:
        group = graph[branch]
        assert group.stream in graph.groups and not graph[group.stream].is_branch
        assert group.branch_output in group.layers and set(group.layers) <= set(group.branch_layers)
        assert group.gate_sites == (group.branch_output,)


@pytest.mark.parametrize("name", ["lenet5", "vgg16", "densenet121"])
def test_networks_without_residual_additions_have_the_same_graph_in_both_modes(name: str) -> None:
    factory, shape = ZOO[name]
    model = factory().eval()
    tied = build_graph(model, torch.zeros(shape))
    assert build_graph(model, torch.zeros(shape), residual="mixed") == replace(tied, residual="mixed")


# -- masked == shrunk, exact costs ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(MIXED))
def test_masked_equals_shrunk_and_exact_costs_equal_the_measurement(name: str) -> None:
    model, graph, shape = mixed(name)
    cost = CostModel(graph)
    x = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(0))
    full = count_cost(model, torch.zeros(shape))
    assert {c: cost.full(c) for c in COSTS} == {c: full[c] for c in COSTS}
    for seed in (1, 2):
        single = len(graph.branch_names) == 1  # one branch: emptied with seed 1, kept with seed 2
        masks = mixed_masks(graph, seed, p_empty=0.0 if single else 0.35, empty_first=not single or seed == 1)
        checked = graph.check_masks(masks)
        removed = graph.removed_branches(checked)
        assert (graph.branch_names[0] in removed) == (not single or seed == 1)
        assert (graph.branch_names[-1] in removed) == (single and seed == 1)
        net = copy.deepcopy(model)
        expected = masked_output(net, graph, masks, x)
        new_graph = shrink(net, masks, graph=graph)
        with torch.no_grad():
            assert_close(net(x), expected)
        report = count_cost(net, torch.zeros(shape))
        exact = {c: cost.exact(masks, c) for c in COSTS}
        assert exact == {c: report[c] for c in COSTS}
        assert exact["macs"] == flop_counter_macs(net, torch.zeros(shape))
        assert {c: CostModel(new_graph).full(c) for c in COSTS} == exact  # the shrunk graph describes the network
        modules = dict(net.named_modules())
        for branch in removed:  # learned depth: the branch runs nothing and costs nothing
            for layer in graph[branch].branch_layers:
                assert isinstance(modules[layer], RemovedLayer) and layer not in new_graph.layers
            assert report.per_layer.keys().isdisjoint(graph[branch].branch_layers)
        kept = graph[graph.branch_names[-1]]  # about half of its stream's channels, placed into the stream
        fewer = int(graph.effective_masks(checked)[kept.name].sum()) < int(checked[kept.stream].sum())
        if kept.name not in removed:
            assert is_scattered(modules[kept.branch_output]) == fewer
        per_layer = cost.per_layer(masks, "macs")
        for layer, measured in report.per_layer.items():
            if layer in per_layer and graph.layers[layer].kind != "norm":
                assert per_layer[layer] == measured.macs, layer


def test_a_branch_channel_adding_into_a_removed_stream_channel_is_not_computed() -> None:
    model, graph, shape = mixed("resnet20")
    cost = CostModel(graph)
    stream = torch.ones(16, dtype=torch.bool)
    stream[:4] = False
    branch = torch.ones(16, dtype=torch.bool)
    branch[:4] = False
    for c in COSTS:
        assert cost.exact({"conv1": stream}, c) == cost.exact({"conv1": stream, "layer1.0.conv2": branch}, c)
    # a branch whose channels all add into removed stream channels is removed
    only = torch.zeros(16, dtype=torch.bool)
    only[:4] = True
    masks = graph.check_masks({"conv1": stream, "layer1.0.conv2": only})
    assert graph.removed_branches(masks) == ("layer1.0.conv2",)
    net = copy.deepcopy(model)
    shrink(net, masks, graph=graph)
    assert isinstance(net.layer1[0].conv1, RemovedLayer)
    assert count_cost(net, torch.zeros(shape)).macs == cost.exact(masks, "macs")


def test_expected_cost_is_exact_for_hard_probabilities_and_prices_a_whole_branch_in_its_last_channel() -> None:
    _, graph, _ = mixed("resnet20")
    cost = CostModel(graph)
    for seed in (3, 4):
        masks = graph.check_masks(mixed_masks(graph, seed))
        for c in COSTS:
            assert float(cost.expected({n: m.double() for n, m in masks.items()}, c)) == cost.exact(masks, c)
    # the marginal cost of a branch's last channel is the whole branch (its conv1 reads the stream)
    one = torch.zeros(16, dtype=torch.bool)
    one[5] = True
    masks = {n: m.double() for n, m in graph.full_masks().items()} | {"layer1.1.conv2": one.double()}
    weights = cost.channel_weights("macs", masks)["layer1.1.conv2"]
    whole = cost.exact({"layer1.1.conv2": one}, "macs") - cost.exact({"layer1.1.conv2": ~one & one}, "macs")
    assert whole > graph.layers["layer1.1.conv1"].cost("macs")  # dropping channel 5 removes conv1 too
    assert float(weights[5]) == pytest.approx(whole, rel=1e-12)
    assert float(weights[4]) == pytest.approx(graph.layers["layer1.1.conv2"].cost("macs") / 16, rel=1e-12)


def test_masks_may_empty_a_branch_but_never_a_stream_or_an_inner_group() -> None:
    _, graph, _ = mixed("resnet20")
    graph.check_masks({"layer1.0.conv2": torch.zeros(16, dtype=torch.bool)})
    for name in ("conv1", "layer1.0.conv1"):
        with pytest.raises(ValueError, match=r"keeps no channel .* \(only the branch groups of mixed residual blocks may be emptied\)"):
            graph.check_masks({name: torch.zeros(16, dtype=torch.bool)})


def test_a_second_shrink_of_a_mixed_network_gates_its_scattered_layers_and_replays() -> None:
    model, graph, shape = mixed("user_resnet")
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(1))
    net = copy.deepcopy(model)
    masks = {"features.0": torch.tensor([1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool),
             "features.2.body.3": torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool),
             "features.3.body.3": torch.zeros(8, dtype=torch.bool)}
    g1 = shrink_as_masked(net, masks, graph=graph)
    assert is_scattered(net.features[2].body[4]) and isinstance(net.features[3].body[3], RemovedLayer)
    assert net.features[2].body[4].scatter_width == 6 and net.features[3].body[3].width == 6
    second = {"features.0": torch.tensor([1, 0, 1, 1, 1, 1], dtype=torch.bool),
              "features.2.body.3": torch.tensor([1, 1, 0, 1], dtype=torch.bool)}
    expected = masked_output(net, g1, second, x)  # the gates act on a scattered layer's output
    g2 = shrink_as_masked(net, second, graph=g1)
    with torch.no_grad():
        assert_close(net(x), expected)
    # stream channels 0 1 3 4 5 7 kept, then the second of them dropped; branch channels 0 3 5 7 kept, then 5 dropped
    assert net.features[3].body[3].width == 5 and net.features[2].body[4].scatter_index.tolist() == [0, 1, 4]
    assert {c: CostModel(g2).full(c) for c in COSTS} == {c: count_cost(net, torch.zeros(shape))[c] for c in COSTS}
    history = pruning_history(net)
    assert history["version"] == 2 and history["residual"] == "mixed" and len(history["steps"]) == 2
    fresh = copy.deepcopy(model)
    replay(fresh, history)
    fresh.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), net(x))
    with pytest.raises(ValueError, match="cannot be traced again"):
        build_graph(net, torch.zeros(shape), residual="mixed")


# -- learned depth: allocation and the methods ---------------------------------------------------


def test_allocation_may_remove_branches_and_the_floor_removes_all_of_them() -> None:
    _, graph, shape = mixed("resnet20")
    tied_graph = build_graph(CifarResNet(20).eval(), torch.zeros(shape))
    cost = CostModel(graph)
    floor = minimum_cost(cost, "macs")
    assert floor < minimum_cost(CostModel(tied_graph), "macs")
    scores = {n: torch.rand(g.size, generator=torch.Generator().manual_seed(i)) + 0.1 for i, (n, g) in enumerate(graph.groups.items())}
    for n in ("layer2.1.conv2", "layer3.2.conv2"):
        scores[n] = scores[n] * 1e-3  # unimportant branches
    result = fit_budget(cost, "macs", cost.full("macs") * 0.5, scores)
    assert result.cost <= cost.full("macs") * 0.5 == pytest.approx(cost.full("macs") / 2)
    removed = graph.removed_branches(graph.check_masks(result.masks))
    assert "layer3.2.conv2" in removed
    assert all(bool(result.masks[n].any()) for n in graph.groups if not graph[n].is_branch)
    # a starting mask with an emptied branch stays emptied; an emptied stream gets a channel back
    start = {"layer1.0.conv2": torch.zeros(16, dtype=torch.bool), "conv1": torch.zeros(16, dtype=torch.bool)}
    again = fit_budget(cost, "macs", cost.full("macs"), scores, start)
    assert not bool(again.masks["layer1.0.conv2"].any()) and int(again.masks["conv1"].sum()) == 1


def _session(method, **kwargs) -> PruningSession:
    session = PruningSession(CifarResNet(8).eval(), method, register=False, **kwargs)
    session.trace(torch.zeros(1, 3, 32, 32))
    return session


def test_methods_accept_residual_and_bar_defaults_to_mixed() -> None:
    assert BarrierPenalty().residual == "mixed" and DirichletSwitches().residual == "tied" and RandomChoice().residual == "tied"
    assert _session(BarrierPenalty(), factor=2).graph.residual == "mixed"
    assert _session(BarrierPenalty(residual="tied"), factor=2).graph.residual == "tied"
    assert _session(RandomChoice(), factor=2, residual="mixed").graph.residual == "mixed"
    for method in (BarrierPenalty, DirichletSwitches, RandomChoice):
        with pytest.raises(ValueError, match="residual must be one of 'tied', 'mixed'"):
            method(residual="regular")
    with pytest.raises(ValueError, match="residual must be one of"):
        BudgetAwareRegularization(factor=2, residual="regular")


@pytest.mark.parametrize("method", [RandomChoice(seed=1, residual="mixed"), DirichletSwitches(residual="mixed")])
def test_random_and_dirichlet_widths_may_remove_a_branch_and_hardening_does(method) -> None:
    session = _session(method, budget=0.9)
    assert session.graph.branch_names == ("layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2")
    widths = {"layer2.0.conv2": 0, "layer3.0.conv2": 10}
    with pytest.raises(ValueError, match=r"widths\['conv1'\] must be in 1\.\.16"):
        session.check_widths({"conv1": 0})
    masks = session.keep_masks(widths)
    assert not bool(masks["layer2.0.conv2"].any())
    network = session.network
    session.harden(masks)  # shrink_as_masked: checks masked == shrunk
    assert isinstance(network.layer2[0].conv1, RemovedLayer) and isinstance(network.layer2[0].bn2, RemovedLayer)
    assert count_cost(network, torch.zeros(1, 3, 32, 32)).macs == session.cost_model.full("macs")
    # the budget's keep-masks: random dropping may empty branches, never a stream
    fresh = _session(RandomChoice(seed=3, residual="mixed"), factor=4)
    chosen = fresh.keep_masks()
    assert all(bool(chosen[n].any()) for n in fresh.graph.groups if not fresh.graph[n].is_branch)
    assert fresh.cost_model.exact(chosen, fresh.cost) <= fresh.budget.target


def test_bar_gates_a_branch_with_its_own_and_its_streams_gates() -> None:
    session = _session(BarrierPenalty(fill=False), factor=2, cost="macs")  # fill would spend the budget on the closed branch again
    tied = CostModel(build_graph(CifarResNet(8).eval(), torch.zeros(1, 3, 32, 32)))
    assert session.budget.floor == minimum_cost(session.cost_model, "macs") < minimum_cost(tied, "macs")
    with torch.no_grad():  # close the branch of layer1.0 and stream channel 0: the network must not see them
        session.gates["layer1.0.conv2"].log_alpha.fill_(-10.0)
        session.gates["conv1"].log_alpha[0] = -10.0
    network = session.network.eval()
    seen = {}
    handle = network.layer1[0].bn2.register_forward_hook(lambda m, a, out: seen.setdefault("bn2", out))
    with torch.no_grad():
        network(torch.randn(2, 3, 32, 32))
    handle.remove()
    assert float(seen["bn2"].abs().max()) == 0.0  # gated by the branch (after the gate hook ran)
    masks = session.keep_masks()
    assert not bool(masks["layer1.0.conv2"].any()) and not bool(masks["conv1"][0])
    session.harden(masks)
    assert isinstance(network.layer1[0].conv1, RemovedLayer)


def test_bar_fill_skips_branch_channels_of_a_dropped_stream_channel() -> None:
    session = _session(BarrierPenalty(), factor=2, cost="macs")
    stage1 = [name for name in session.gates if name.startswith("layer1.") and name.endswith("conv2")]
    assert stage1
    with torch.no_grad():  # stream channel 0 closed, and branch channel 0 of every stage-1 block, which would add into it
        session.gates["conv1"].log_alpha[0] = -10.0
        for name in stage1:
            session.gates[name].log_alpha[0] = -10.0
    masks = session.keep_masks()
    assert not bool(masks["conv1"][0]) and session.cost_model.exact(masks, "macs") <= session.budget.target
    assert session.method.refilled  # there was budget left to fill
    assert not any(bool(masks[name][0]) for name in stage1)  # filling them would cost nothing and compute nothing


# -- export, optimizer state ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet20", "user_resnet"])
def test_save_and_load_pruned_round_trip_with_weights_only(name: str, tmp_path) -> None:
    model, graph, shape = mixed(name)
    net = copy.deepcopy(model)
    shrink_as_masked(net, mixed_masks(graph, 5), graph=graph)
    architecture = {"_target_": "lightning_prune.models.CifarResNet", "depth": 20} if name == "resnet20" else None
    save_pruned(net, tmp_path / "net.pt", architecture=architecture)
    payload = torch.load(tmp_path / "net.pt", weights_only=True)
    assert payload["history"]["residual"] == "mixed"
    assert any(k.endswith("scatter_index") for k in payload["state_dict"])
    loaded = load_pruned(tmp_path / "net.pt", model=None if architecture else UserResNet())
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval()(x))
    assert [n for n, m in loaded.named_modules() if isinstance(m, RemovedLayer)] == [
        n for n, m in net.named_modules() if isinstance(m, RemovedLayer)]


def test_optimizer_state_is_sliced_and_removed_branches_leave_the_optimizer() -> None:
    model, graph, shape = mixed("resnet20")
    net = copy.deepcopy(model).train()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(4, *shape[1:])
    for opt in (sgd, adam):
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    masks = mixed_masks(graph, 7)
    checked = graph.check_masks(masks)
    removed = graph.removed_branches(checked)
    keep = graph.effective_masks(checked)[graph.branch_names[-1]]
    bn = graph[graph.branch_names[-1]].branch_output
    old_bn = net.get_submodule(bn).weight
    old_momentum = sgd.state[old_bn]["momentum_buffer"].clone()
    gone = {id(p) for name in removed for layer in graph[name].branch_layers for p in net.get_submodule(layer).parameters()}
    assert gone
    shrink(net, masks, graph=graph, optimizer=[sgd, adam])
    params = list(net.parameters())
    for opt in (sgd, adam):
        listed = [p for group in opt.param_groups for p in group["params"]]
        assert [id(p) for p in listed] == [id(p) for p in params]
        assert not any(id(p) in gone for p in opt.state)
        for p in listed:
            for value in opt.state[p].values():
                if isinstance(value, Tensor) and value.dim() > 0:
                    assert value.shape == p.shape
    assert torch.equal(sgd.state[net.get_submodule(bn).weight]["momentum_buffer"], old_momentum[keep])
    net(x).square().mean().backward()
    sgd.step()
    adam.step()


# -- Lightning: hard pruning, report, resume -------------------------------------------------------


def _callbacks():
    return [BudgetAwareRegularization(budget=0.95, cost="macs", example_input=INPUT, verbose=False),
            SigmoidalBudgetAnnealing(until_epoch=2), HardPruning(at_epoch=2, widths=WIDTHS, plot=False, verbose=False)]


def _fit(folder, ckpt: str | None = None) -> tuple[ResidualModule, list]:
    L.seed_everything(0)
    module = ResidualModule()
    callbacks = _callbacks()
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_top_k=-1, filename="{epoch}")
    trainer(max_epochs=4, enable_checkpointing=True, callbacks=[*callbacks, checkpoints]).fit(
        module, residual_loader(), ckpt_path=ckpt)
    return module, callbacks


def test_bar_hard_pruning_removes_a_block_and_resuming_a_shrunk_checkpoint_equals_the_uninterrupted_run(tmp_path) -> None:
    straight, callbacks = _fit(tmp_path)
    net = straight.trunk
    assert isinstance(net.features[3].body[3], RemovedLayer) and isinstance(net.features[3].body[0], RemovedLayer)
    hard = callbacks[2]
    assert hard.summary["removed"] == ["features.3.body.0", "features.3.body.3"]  # the block's inner group too
    assert hard.summary["widths_after"]["features.3.body.3"] == hard.summary["widths_after"]["features.3.body.0"] == 0
    assert "features.3.body.0  8 -> removed" in hard.summary["table"]
    assert count_cost(net, torch.zeros(1, *INPUT)).macs <= callbacks[0].session.budget.target
    final = tensor_state(straight)
    for ckpt in ("epoch=2.ckpt", "epoch=0.ckpt"):  # after shrinking, and mid soft phase
        again, _ = _fit(tmp_path / "again", str(tmp_path / ckpt))
        state = tensor_state(again)
        assert state.keys() == final.keys(), ckpt
        for key in final:
            assert torch.allclose(state[key].float(), final[key].float(), atol=1e-6), (ckpt, key)
    loaded = lightning_prune.load_checkpoint(ResidualModule(), tmp_path / "epoch=3.ckpt")
    x = torch.randn(2, *INPUT)
    with torch.no_grad():
        assert torch.equal(loaded.trunk.eval()(x), net.eval()(x))


def test_alive_channel_plot_marks_removed_blocks(tmp_path) -> None:
    path = plot_alive_channels({"a": 8, "b": 8}, {"a": 5, "b": 0}, tmp_path / "alive.png", removed=["b"])
    assert path.exists() and path.stat().st_size > 0


# -- AdaNS, configs --------------------------------------------------------------------------------


def test_adans_structured_space_with_mixed_blocks_predicts_the_compressed_cost() -> None:
    space = CompressionSpace(CifarResNet(8).eval(), torch.zeros(1, 3, 32, 32), "structured", "macs", residual="mixed")
    g = torch.Generator().manual_seed(0)
    importance = space.rank_channels([(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))])
    assert importance["layer2.0.conv2"].shape == (32,) and bool((importance["layer2.0.conv2"] > 0).all())
    names = [d.name for d in space.search_space.dims]
    x = [0.5 if n != "prune:layer2.0.conv2" else 1.0 for n in names]
    assert space.settings(x)["kept_channels"]["layer2.0.conv2"] == 0
    small = space.compress(x)
    assert isinstance(small.layer2[0].conv1, RemovedLayer)
    assert count_cost(small, torch.zeros(1, 3, 32, 32)).macs == space.predict_cost(x)


@pytest.mark.parametrize(("method", "default"), [("bar", "mixed"), ("random", "tied"), ("dirichlet", "mixed")])
def test_configs_choose_the_residual_mode(method: str, default: str, tmp_path) -> None:
    cfg = compose_train([f"pruning={method}"], tmp_path)
    assert cfg.pruning.residual == default
    assert instantiate(cfg.pruning[method]).method.residual == default
    other = "tied" if default == "mixed" else "mixed"
    cfg = compose_train([f"pruning={method}", f"pruning.residual={other}"], tmp_path)
    assert instantiate(cfg.pruning[method]).method.residual == other


def test_exact_cost_over_all_masks_of_a_tiny_mixed_block() -> None:
    """Every mask of a tiny residual MLP (stream 3, branch 3 channels): exact cost == measured."""

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.f = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 3))
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.head(h + self.f(h))

    model = Tiny().eval()
    graph = build_graph(model, torch.zeros(1, 4), residual="mixed")
    assert graph.branch_names == ("f.2",) and graph["f.2"].stream == "a"
    cost = CostModel(graph)
    # in expectation, the branch runs with probability 1 - prod(1 - p): the average over its masks
    p = torch.tensor([0.2, 0.7, 0.4], dtype=torch.float64)
    for c in COSTS:
        average = 0.0
        for bits in itertools.product([0, 1], repeat=3):
            b = torch.tensor(bits, dtype=torch.float64)
            average += float(torch.prod(torch.where(b > 0, p, 1 - p))) * cost.exact({"f.2": torch.tensor(bits, dtype=torch.bool)}, c)
        assert float(cost.expected({"f.2": p}, c)) == pytest.approx(average, rel=1e-12)
    x = torch.randn(3, 4)
    for bits in itertools.product([0, 1], repeat=6):
        stream, branch = torch.tensor(bits[:3], dtype=torch.bool), torch.tensor(bits[3:], dtype=torch.bool)
        if not bool(stream.any()):
            continue
        masks = {"a": stream, "f.2": branch}
        net = copy.deepcopy(model)
        expected = masked_output(net, graph, masks, x)
        shrink(net, masks, graph=graph)
        with torch.no_grad():
            assert_close(net(x), expected)
        report = count_cost(net, torch.zeros(1, 4))
        assert {c: cost.exact(masks, c) for c in COSTS} == {c: report[c] for c in COSTS}, bits


@pytest.mark.slow
def test_ddp_two_processes_through_hard_pruning_that_removes_a_block_and_resume(tmp_path) -> None:
    """2 gloo processes: soft phase with mixed blocks -> hard pruning (a block removed, the
    others scattered) -> shrink -> fine-tuning; resumed from a soft and from a shrunk
    checkpoint: every rank ends with the tensors of the uninterrupted run."""
    script = Path(__file__).parent / "scripts" / "ddp_mixed.py"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-4000:]
    ref = torch.load(tmp_path / "straight-rank0.pt", weights_only=True)
    assert not any(k.startswith("trunk.features.3.body.") for k in ref)  # the removed block has no tensors left
    assert any(k.endswith("scatter_index") for k in ref) and not any("prune_gates" in k for k in ref)
    for rank in ("rank0", "rank1"):
        mine = torch.load(tmp_path / f"straight-{rank}.pt", weights_only=True)
        assert mine.keys() == ref.keys()
        for key in ref:  # DDP keeps the ranks' parameters equal; batch-norm statistics are each rank's own
            assert "running_" in key or torch.equal(mine[key], ref[key]), (rank, key)
        for run in ("from_soft", "from_shrunk"):
            state = torch.load(tmp_path / f"{run}-{rank}.pt", weights_only=True)
            assert state.keys() == mine.keys(), (run, rank)
            for key in mine:
                assert torch.equal(state[key], mine[key]), (run, rank, key)


def test_a_pickled_mixed_network_unpickles_in_a_fresh_process(tmp_path) -> None:
    """torch.save of the whole module (or ddp_spawn's pickling) reaches a process where the
    scattered classes have not been made yet."""
    import pickle
    import subprocess
    import sys

    from lightning_prune.core.residual import uses_mixed_modules
    from lightning_prune.models import CifarResNet

    net = CifarResNet(20).eval()
    graph = build_graph(net, torch.zeros(1, 3, 32, 32), residual="mixed")
    shrink(net, mixed_masks(graph, seed=1), graph=graph)
    assert uses_mixed_modules(net)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "net.pkl"
    path.write_bytes(pickle.dumps(net))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(net(x), tmp_path / "y.pt")
    code = ("import pickle, sys, torch; net = pickle.loads(open(sys.argv[1], 'rb').read()); "
            "x = torch.load(sys.argv[2]); y = torch.load(sys.argv[3]); "
            "torch.testing.assert_close(net.eval()(x), y, atol=1e-5, rtol=1e-5)")
    done = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
