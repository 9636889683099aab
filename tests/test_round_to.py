"""Hardware-friendly widths: ``round_to`` makes every channel group keep a multiple of k
channels (or its full width; a residual branch of a mixed-connectivity block may be removed),
starting from the method's choice, still at or under the budget; checked on the cost model,
on the exported network and against the masked network."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

import lightning_prune
from lightning_prune.callbacks import HardPruning, RandomPruning
from lightning_prune.core.allocation import round_widths
from lightning_prune.core.cost import CostModel, count_cost
from lightning_prune.core.cost.measure import output_widths
from lightning_prune.core.gates import FixedMask
from lightning_prune.core.gating import attach_gates
from lightning_prune.core.graph import ChannelGraph
from lightning_prune.core.session import PruningSession
from lightning_prune.core.trace import build_graph
from lightning_prune.methods import BarrierPenalty, DirichletSwitches, RandomChoice
from lightning_prune.models import CifarResNet, LeNet5
from tests.bar_helpers import TINY, ForeignModule, tiny_loader, trainer
from tests.core_zoo import one_thread, randomize_norms  # noqa: F401  (one_thread: autouse fixture)

MODELS = {"lenet5": (LeNet5, (1, 1, 28, 28)), "resnet20": (lambda: CifarResNet(20), (1, 3, 32, 32))}
METHODS = {
    "bar": lambda residual: BarrierPenalty(residual=residual),
    "dirichlet": lambda residual: DirichletSwitches(residual=residual),
    "random": lambda residual: RandomChoice(seed=2, residual=residual),
}


def _session(model: str, method: str, residual: str = "tied", **kwargs) -> tuple[PruningSession, torch.nn.Module]:
    """A traced session on ``model`` with gates that rank the channels unevenly, and an untouched
    copy of the network (for the masked reference)."""
    make, shape = MODELS[model]
    torch.manual_seed(0)
    network = randomize_norms(make().eval())
    pristine = copy.deepcopy(network)
    if "budget" not in kwargs:
        kwargs.setdefault("factor", 4)
    session = PruningSession(network, METHODS[method](residual), register=False, cost="macs", **kwargs)
    session.trace(torch.zeros(shape))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, gate in session.gates.items():
            if method == "bar":
                gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=g) * 2 + 1)
            elif method == "dirichlet":
                gate.theta.copy_(torch.randn(gate.theta.shape, generator=g))
    return session, pristine


def _allowed(width: int, size: int, k: int, branch: bool) -> bool:
    return (width > 0 and (width % k == 0 or width == size)) or (branch and width == 0)


def _assert_rounded(graph: ChannelGraph, masks: dict[str, torch.Tensor], k: int) -> dict[str, int]:
    """Every group's computed width (a branch channel counts only with its stream channel) is
    a multiple of k, its full width, or (a branch) 0; returns the widths."""
    effective = graph.effective_masks(graph.check_masks(masks))
    widths = {n: int(m.sum()) for n, m in effective.items()}
    for name, group in graph.groups.items():
        assert _allowed(widths[name], group.size, k, group.is_branch), (name, widths[name], group.size)
    return widths


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("model", "residual"), [("lenet5", "tied"), ("resnet20", "tied"), ("resnet20", "mixed")])
def test_rounded_widths_meet_the_budget_and_shrink_as_masked(model: str, residual: str, method: str) -> None:
    k = 8
    session, pristine = _session(model, method, residual)
    graph, target = session.graph, session.budget.target
    chosen = session.method.keep_masks(session)
    masks = session.keep_masks(round_to=k)
    widths = _assert_rounded(graph, masks, k)
    assert session.cost_model.exact(masks, "macs") <= target
    before = {n: int(m.sum()) for n, m in graph.effective_masks(graph.check_masks(chosen)).items()}
    assert widths != before  # the method's own choice was not rounded already
    shape = MODELS[model][1]
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(3))
    probe = attach_gates(pristine, graph, {n: FixedMask(m) for n, m in masks.items()})
    with torch.no_grad():
        masked = pristine(x)
    probe.detach()
    session.harden(masks)
    with torch.no_grad():
        torch.testing.assert_close(session.network(x), masked, atol=1e-4, rtol=1e-4)
    small = lightning_prune.export(session.network)  # refuses a network over its budget
    assert count_cost(small, torch.zeros(shape)).macs == session.cost_model.full("macs") <= target
    # the physical layers: every producer of a group has the group's (rounded) width
    layer_widths = output_widths(small)
    for name, group in graph.groups.items():
        for member in group.members:
            if member.role == "out" and member.module in layer_widths:
                assert layer_widths[member.module] == widths[name], (name, member.module)
    if residual == "mixed":
        assert graph.removed_branches(graph.check_masks(masks)) == tuple(
            n for n in graph.branch_names if widths[n] == 0
        )


def test_round_widths_rounds_by_the_scores_then_narrows_the_cheapest_group() -> None:
    graph = build_graph(LeNet5().eval(), torch.zeros(1, 1, 28, 28))
    model = CostModel(graph)
    assert dict(zip(model.names, model.sizes)) == {"features.0": 20, "features.2": 50, "classifier.1": 500}
    scores = {n: torch.arange(s, dtype=torch.float64) for n, s in zip(model.names, model.sizes)}
    start = {"features.0": torch.arange(20) < 11, "features.2": torch.arange(50) < 13}
    rounded = round_widths(model, "macs", float("inf"), scores, start, 8)
    # 11 -> 8: the 8 highest-scoring of the kept 0..10; 13 -> 16: the 3 highest-scoring dropped come back
    assert rounded.masks["features.0"].nonzero().flatten().tolist() == list(range(3, 11))
    assert rounded.masks["features.2"].nonzero().flatten().tolist() == list(range(13)) + [47, 48, 49]
    assert bool(rounded.masks["classifier.1"].all())  # kept whole: its full width
    assert rounded.dropped == {"features.0": [0, 1, 2]} and rounded.cost == model.exact(rounded.masks, "macs")
    # one step over the target: the group whose 8 lowest-scoring kept channels lose the least
    # score per MAC saved steps down (features.2 here: its scores are tiny)
    scores["features.2"] = scores["features.2"] * 1e-6
    repaired = round_widths(model, "macs", rounded.cost - 1, scores, rounded.masks, 8)
    assert repaired.masks["features.2"].nonzero().flatten().tolist() == [8, 9, 10, 11, 12, 47, 48, 49]
    assert torch.equal(repaired.masks["features.0"], rounded.masks["features.0"])
    assert repaired.cost == model.exact(repaired.masks, "macs") < rounded.cost
    # a target below what multiples of 16 can reach
    with pytest.raises(ValueError, match=r"round_to: with every group's width a multiple of 16 .* cannot be met"):
        round_widths(model, "macs", 500_000, scores, start, 16)


def test_a_group_narrower_than_k_keeps_its_full_width_and_the_budget_can_be_out_of_reach() -> None:
    session, _ = _session("lenet5", "random", factor=1.5)
    masks = session.keep_masks(round_to=32)
    widths = _assert_rounded(session.graph, masks, 32)
    assert widths["features.0"] == 20  # fewer than 32 channels: whole
    assert session.cost_model.exact(masks, "macs") <= session.budget.target
    # at factor 4 LeNet-5 with 16-channel steps (features.0: 16 or 20) costs more than the budget
    tight, _ = _session("lenet5", "bar", factor=4)
    with pytest.raises(ValueError, match=r"round_to: .* the macs budget 573,250 cannot be met"):
        tight.keep_masks(round_to=16)


def test_explicit_widths_must_be_multiples_and_branches_keep_computed_channels() -> None:
    session, _ = _session("lenet5", "dirichlet", factor=2)
    with pytest.raises(ValueError, match=r"widths\['features.2'\] must be a multiple of round_to=8 or the group's full width 50, got 20"):
        session.keep_masks({"features.0": 8, "features.2": 20}, round_to=8)
    with pytest.raises(ValueError, match=r"widths\['features.0'\] must be a multiple of round_to=8"):
        session.check_widths([12, 16, 500], round_to=8)
    masks = session.keep_masks([20, 16, 496], round_to=8)  # 20: the full width
    assert [int(m.sum()) for m in masks.values()] == [20, 16, 496]
    # mixed residual blocks: a branch may be removed (0), and keeps only channels it computes
    mixed, _ = _session("resnet20", "random", "mixed", budget=0.9)
    widths = {"layer1.0.conv2": 0, "conv1": 8, "layer1.1.conv2": 8}
    chosen = mixed.keep_masks(widths, round_to=8)
    assert _assert_rounded(mixed.graph, chosen, 8)["layer1.1.conv2"] == 8
    assert not bool(chosen["layer1.0.conv2"].any())


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError), ("8", TypeError)])
def test_bad_round_to_is_rejected_naming_it(value, error) -> None:
    with pytest.raises(error, match="round_to must be an int"):
        HardPruning(at_epoch=1, round_to=value)
    session, _ = _session("lenet5", "random")
    with pytest.raises(error, match="round_to must be an int"):
        session.keep_masks(round_to=value)
    with pytest.raises(error, match="round_to must be an int"):
        session.check_widths([20, 50, 500], round_to=value)
    assert session.active  # nothing was chosen or hardened


def test_hard_pruning_callback_rounds_the_widths_in_training() -> None:
    L.seed_everything(0)
    module = ForeignModule()
    random = RandomPruning(factor=3, cost="macs", example_input=TINY, verbose=False)
    hard = HardPruning(at_epoch=1, round_to=4, plot=False, verbose=False)
    trainer(max_epochs=2, callbacks=[random, hard]).fit(module, tiny_loader(16, n=64))
    net = module.backbone_and_head
    assert hard.round_to == 4 and "widths multiples of 4" in hard.summary["line"]
    assert net.conv1.out_channels % 4 == 0 and net.conv2.out_channels % 4 == 0
    assert (net.conv1.out_channels, net.conv2.out_channels) != (8, 12)
    assert count_cost(net, torch.zeros(1, *TINY)).macs <= random.session.budget.target
    # widths that are not multiples are refused before training
    L.seed_everything(0)
    with pytest.raises(ValueError, match=r"widths\['conv1'\] must be a multiple of round_to=4"):
        trainer(max_epochs=2, callbacks=[
            RandomPruning(factor=1.5, cost="macs", example_input=TINY, verbose=False),
            HardPruning(at_epoch=1, widths=[6, 12], round_to=4, plot=False, verbose=False),
        ]).fit(ForeignModule(), tiny_loader(16, n=64))
