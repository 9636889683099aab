"""Dirichlet importance switches as a Lightning callback: the identity at the start, frozen
weights, the KL term, the gamma estimator's averaged passes, layer-by-layer learning, global
allocation meeting the budget on the shrunk network, explicit widths, resume, configs, and an
unedited foreign LightningModule. (Gate-level maths is in test_gates.py.)"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import lightning_prune
from lightning_prune.callbacks import DirichletImportance, HardPruning
from lightning_prune.classifier import ImageClassifier
from lightning_prune.data import MNISTDataModule
from lightning_prune.models import LeNet5
from lightning_prune.train import run
from tests.bar_helpers import TINY, ForeignModule, assert_resumes_to_the_same_state, tensor_state, tiny_loader, trainer
from tests.conftest import compose_train
THETA0 = torch.log(torch.expm1(torch.tensor(1.0)))  # softplus^-1(1): a fresh switch's theta


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads make these runs 3-5x slower
    (conftest restores the previous count after each test)."""
    torch.set_num_threads(1)


def thetas(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k.endswith(".theta")}


def network_state(module: ForeignModule) -> dict[str, torch.Tensor]:
    """Parameters and batch-norm buffers of the user's network."""
    return {k: v.detach().clone() for k, v in module.backbone_and_head.state_dict().items()}


class Snapshots(L.Callback):
    """Switch parameters and network state at the end of every training epoch, and the groups
    that learn at every batch."""

    def __init__(self, switches: DirichletImportance) -> None:
        self.switches = switches
        self.epochs: list[tuple[dict, dict]] = []
        self.learning: list[tuple[str, ...]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.learning.append(self.switches.learning_groups)

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append((thetas(pl_module), network_state(pl_module)))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_switch_phase_learns_only_the_switches_and_freezes_weights_and_bn_statistics():
    L.seed_everything(0)
    module = ForeignModule()  # SGD with momentum, StepLR, batch norm
    switches = DirichletImportance(factor=2, cost="params", from_epoch=1, epochs=1, example_input=TINY, verbose=False)
    snaps = Snapshots(switches)
    t = trainer(max_epochs=3, callbacks=[switches, snaps])
    t.fit(module, tiny_loader(16, n=64, shuffle=True))
    (g0, w0), (g1, w1), (g2, w2) = snaps.epochs
    # epoch 0, before the switch phase: ordinary training, the switches are the identity and do not move
    assert all(torch.equal(v, torch.full_like(v, float(THETA0))) for v in g0.values())
    # epoch 1, the switch phase: the network (weights and batch-norm running statistics) is frozen
    assert same(w1, w0)
    assert all(not torch.equal(g1[k], g0[k]) and torch.isfinite(g1[k]).all() for k in g0)
    assert switches.method.kl_scale == 1 / 64  # kl_weight=None: 1 / number of training samples
    # epoch 2, after it: the weights train again, the switches are held (and are the identity)
    assert not torch.equal(w2["conv1.weight"], w1["conv1.weight"]) and same(g2, g1)
    assert not switches.learning and module.backbone_and_head.bn1.training
    assert [lr for lr in t.lr_scheduler_configs[0].scheduler.get_last_lr()] == pytest.approx([0.05 * 0.5**3])


def test_a_uniform_switch_is_the_identity_and_the_kl_term_matches_torch():
    torch.manual_seed(0)
    module = ForeignModule()
    switches = DirichletImportance(factor=2, alpha0=0.3, kl_weight=0.1, example_input=TINY, verbose=False)
    switches.setup(trainer(), module, "fit")
    net, x = module.backbone_and_head.eval(), torch.randn(5, *TINY)
    with switches.gates.suspended():
        plain = net(x)
    switches.learn(None)
    assert torch.equal(net(x), plain)  # K * phi / sum(phi) == 1 exactly for a uniform switch
    with torch.no_grad():
        for _, gate in switches.gates.items():
            gate.theta.normal_(0.0, 1.0)
    assert not torch.allclose(net(x), plain)

    def kl(name: str) -> torch.Tensor:
        phi = switches.gates[name].concentration().detach()
        prior = torch.full_like(phi, 0.3)
        return torch.distributions.kl_divergence(torch.distributions.Dirichlet(phi), torch.distributions.Dirichlet(prior))

    assert float(switches.method.regularizer(switches.session).detach()) == pytest.approx(0.1 * float(kl("conv1") + kl("conv2")), rel=1e-5)
    switches.learn(["conv2"])  # layer by layer: conv1 is the identity again and has no KL term
    assert float(switches.method.regularizer(switches.session).detach()) == pytest.approx(0.1 * float(kl("conv2")), rel=1e-5)
    with switches.gates.suspended():
        conv1_plain = net.conv1(x)
    assert torch.equal(net.conv1(x), conv1_plain)


class LinearModule(L.LightningModule):
    """6 -> 16 -> 3, linear, so the expected output under the switch is the output at E[K s]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Linear(16, 3))


def test_gamma_estimator_averages_s_passes_whose_mean_approaches_the_analytic_mean():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    deviation = {}
    for samples in (2, 2000):
        module = LinearModule()
        switches = DirichletImportance(factor=2, estimator="gamma", samples=samples, init=3.0, example_input=(6,),
                                       verbose=False)
        switches.setup(trainer(), module, "fit")
        switches.learn(None)
        with torch.no_grad():
            switches.gates["0"].theta.copy_(torch.linspace(-1.0, 2.0, 16))
        calls = []
        module.net[1].register_forward_hook(lambda *_: calls.append(1))
        module.eval()
        analytic = module.net(x).detach()  # eval: the posterior mean, one pass
        assert len(calls) == 1
        module.train()
        out = module.net(x)
        assert len(calls) == 1 + samples  # S forward passes with fresh samples, averaged
        out.pow(2).sum().backward()
        grad = switches.gates["0"].theta.grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        deviation[samples] = float((out.detach() - analytic).abs().max() / analytic.abs().max())
    assert deviation[2000] < 0.05 and deviation[2000] < deviation[2] / 5


def test_layer_by_layer_learns_one_group_at_a_time_with_the_others_at_identity():
    L.seed_everything(0)
    module = ForeignModule()
    start = network_state(module)
    switches = DirichletImportance(factor=2, layerwise=True, epochs=2, example_input=TINY, kl_weight=1e-3, verbose=False)
    snaps = Snapshots(switches)
    trainer(max_epochs=2, callbacks=[switches, snaps]).fit(module, tiny_loader(16, n=64))
    # 8 optimizer steps, 2 groups: conv1 learns in the first half, conv2 in the second
    assert snaps.learning == [("conv1",)] * 4 + [("conv2",)] * 4
    (g0, w0), (g1, w1) = snaps.epochs
    c1, c2 = "prune_gates.gates.conv1.theta", "prune_gates.gates.conv2.theta"
    assert not torch.equal(g0[c1], torch.full_like(g0[c1], float(THETA0)))
    assert torch.equal(g0[c2], torch.full_like(g0[c2], float(THETA0)))
    assert torch.equal(g1[c1], g0[c1])  # no more steps for conv1 (Adam's momentum does not move it)
    assert not torch.equal(g1[c2], g0[c2])
    assert same(w0, start) and same(w1, start)  # weights frozen from epoch 0


def _lenet5_run(data_dir: Path, tmp_path: Path, widths=None):
    L.seed_everything(0)
    dm = MNISTDataModule(data_dir, batch_size=64, subset=1280, val_size=256)
    module = ImageClassifier(LeNet5(), 10, optimizer=partial(torch.optim.Adam, lr=1e-3))
    switches = DirichletImportance(factor=16, cost="macs", from_epoch=1, gate_lr=0.05, verbose=False)
    seen = {}

    class BeforePruning(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                seen.update(importance=switches.importance(), masks=switches.session.keep_masks(),
                            full=switches.session.budget.full, target=switches.session.budget.target)

    t = trainer(max_epochs=3, limit_val_batches=1, default_root_dir=tmp_path,
                callbacks=[switches, BeforePruning(), HardPruning(at_epoch=2, widths=widths, plot=False)])
    t.fit(module, dm)
    return module, switches, seen


def test_lenet5_global_allocation_meets_the_mac_budget_on_the_shrunk_network(data_dir, tmp_path):
    module, switches, seen = _lenet5_run(data_dir, tmp_path)
    small = lightning_prune.export(module)
    measured = lightning_prune.count_cost(small, torch.zeros(1, 1, 28, 28)).macs
    assert seen["full"] == 2_293_000 and seen["target"] == pytest.approx(2_293_000 / 16)
    assert measured <= seen["target"]
    masks, importance = seen["masks"], seen["importance"]
    # exact: the measured cost of the shrunk network is what the allocation computed
    from lightning_prune.core.cost.model import CostModel
    from lightning_prune.core.trace import build_graph

    full_model = CostModel(build_graph(LeNet5(), (torch.zeros(1, 1, 28, 28),)))
    assert measured == full_model.exact(masks, "macs")
    widths = {"features.0": small.features[0].out_channels, "features.2": small.features[2].out_channels,
              "classifier.1": small.classifier[1].out_features}
    assert widths == {n: int(m.sum()) for n, m in masks.items()}
    assert widths["features.0"] < 20 and widths["features.2"] < 50
    for name, mask in masks.items():  # within a layer, channels are kept by posterior mean
        if not mask.all():
            assert importance[name][mask].min() >= importance[name][~mask].max(), name
    # the switches learned something different per channel (not a uniform ranking)
    assert all(float(s.max() - s.min()) > 1e-3 for s in importance.values())


def test_fill_adds_channels_back_while_under_the_budget():
    """With fc importance on 20 units, the share greedy ends 1,672 MACs under the budget; fill
    takes back 3 fc units (522 MACs each with 32 conv2 channels), the most important of the
    dropped ones first."""
    from lightning_prune.core.session import PruningSession
    from lightning_prune.methods.dirichlet import DirichletSwitches

    fc = torch.full((500,), 1e-3)
    fc[:20] = 25.0
    fc[20:23] = 1e-2  # the next most important
    spent = {}
    for fill in (False, True):
        method = DirichletSwitches(fill=fill)
        session = PruningSession(LeNet5().eval(), method, factor=16, cost="macs", register=False)
        session.trace(torch.zeros(1, 1, 28, 28))
        scores = {n: torch.ones(k) for n, k in zip(session.cost_model.names, session.cost_model.sizes)}
        method.scores = lambda _session, scores={**scores, "classifier.1": fc}: scores
        masks = method.keep_masks(session)
        spent[fill] = session.cost_model.exact(masks, "macs")
        assert [int(m.sum()) for m in masks.values()] == ([2, 32, 20] if not fill else [2, 32, 23])
        assert bool(masks["classifier.1"][:20 if not fill else 23].all())
    assert spent[False] == 141_640 and spent[True] == 143_206 and spent[True] <= 2_293_000 / 16
    with pytest.raises(TypeError, match="fill must be a bool"):
        DirichletSwitches(fill=1)


def test_share_allocation_thins_a_layer_less_the_more_importance_it_has_lost():
    from lightning_prune.core.allocation import fit_budget
    from lightning_prune.core.cost.model import CostModel
    from lightning_prune.core.trace import build_graph

    model = CostModel(build_graph(LeNet5(), (torch.zeros(1, 1, 28, 28),)))
    target = 2_293_000 / 16
    uniform = {n: torch.ones(k) for n, k in zip(model.names, model.sizes)}

    def widths(scores, relative):
        result = fit_budget(model, "macs", target, scores, relative=relative)
        assert result.cost == model.exact(result.masks, "macs") <= target
        return tuple(int(m.sum()) for m in result.masks.values())

    # plain scores per unit of MACs: conv1 channels (94,400 MACs each) go first, down to one;
    # then conv2 until 19,400 + 9,600 k2 <= 143,312, so k2 = 12; the 810-MAC fc units all stay
    assert widths(uniform, relative=False) == (1, 12, 500)
    assert widths(uniform, relative=True) == (3, 7, 500)
    # fc importance concentrated on 20 units: the other 480 hold ~0.1% of the layer's mass and
    # are dropped almost for free, which buys convolution channels
    fc = torch.full((500,), 1e-3)
    fc[:20] = 25.0
    concentrated = widths({**uniform, "classifier.1": fc}, relative=True)
    assert concentrated[2] <= 40 and concentrated[0] + concentrated[1] > 10
    with pytest.raises(ValueError, match="> 0 with relative=True"):
        fit_budget(model, "macs", target, {**uniform, "features.0": torch.zeros(20)}, relative=True)


def _taylor_session(seed: int = 0):
    """LeNet-5 under a 16x MAC budget with ``allocation="taylor"`` switches, all acting, the
    posterior made non-uniform (so the multipliers are not all 1)."""
    from lightning_prune.core.session import PruningSession
    from lightning_prune.methods.dirichlet import DirichletSwitches

    torch.manual_seed(seed)
    method = DirichletSwitches(allocation="taylor")
    session = PruningSession(LeNet5().train(), method, factor=16, cost="macs", register=False)
    session.trace(torch.zeros(1, 1, 28, 28))
    method.learn(session, None)
    with torch.no_grad():
        for _, gate in session.gates.items():
            gate.theta.add_(0.5 * torch.randn_like(gate.theta))
    return session, method


def test_taylor_saliency_is_the_size_of_the_first_order_loss_change_at_each_switch(monkeypatch):
    """Each backward pass adds |dL/dm * m| per channel, m the switch's multiplier; the
    saliency is their mean over the passes; with the multiplier scaled by (1 - eps) on one
    channel the loss changes by -eps * dL/dm * m to first order."""
    from lightning_prune.methods.dirichlet import _Switch

    session, method = _taylor_session()
    seen: list[tuple[str, torch.Tensor]] = []
    forward = _Switch.forward

    def capturing(self):
        out = forward(self)
        out.retain_grad()
        seen.append((next(n for n, g in session.gates.items() if g is self), out))
        return out

    monkeypatch.setattr(_Switch, "forward", capturing)
    expected = {n: torch.zeros(g.num_channels, dtype=torch.float64) for n, g in session.gates.items()}
    for step in range(2):
        seen.clear()
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        nn.functional.cross_entropy(session.network(x), y).backward()
        for name, out in seen:
            expected[name] += (out.grad.double() * out.detach().double()).abs()
    assert {n for n, _ in seen} == set(session.gates)
    for name, gate in session.gates.items():
        assert float(gate.saliency_passes) == 2
        torch.testing.assert_close(gate.saliency_sum, expected[name])
    saliency = method.saliency(session)
    torch.testing.assert_close(saliency["features.2"], expected["features.2"] / 2)
    assert all(bool((s > 0).any()) for s in saliency.values())

    # the first-order meaning of dL/dm * m: scale channel k's output by (1 - eps) by hand
    monkeypatch.setattr(_Switch, "forward", forward)
    gate = session.gates["features.0"]
    with torch.no_grad():
        m = gate().detach()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    seen.clear()
    monkeypatch.setattr(_Switch, "forward", capturing)
    nn.functional.cross_entropy(session.network(x), y).backward()
    monkeypatch.setattr(_Switch, "forward", forward)
    g = dict(seen)["features.0"].grad
    k, eps = int(torch.argmax((g * m).abs())), 1e-3
    scale = torch.ones_like(m)
    scale[k] = 1 - eps
    handle = session.network.features[0].register_forward_hook(lambda mod, args, out: out * scale.view(1, -1, 1, 1))
    with torch.no_grad():
        base = float(nn.functional.cross_entropy(session.network(x), y))
        handle.remove()
        handle = session.network.features[0].register_forward_hook(lambda mod, args, out: out * torch.ones_like(scale).view(1, -1, 1, 1))
        unscaled = float(nn.functional.cross_entropy(session.network(x), y))
    handle.remove()
    assert base - unscaled == pytest.approx(-eps * float(g[k] * m[k]), rel=0.05)


def test_taylor_allocation_drops_dead_channels_first_and_meets_the_budget():
    """Channels whose output is always 0 have no saliency and go first; the widths meet the
    budget exactly as counted; without a backward pass there is nothing to allocate by."""
    from lightning_prune.methods.dirichlet import DirichletSwitches

    session, method = _taylor_session()
    with pytest.raises(RuntimeError, match="no backward pass went through the switches of features.0, features.2, classifier.1"):
        method.keep_masks(session)
    dead = [1, 4, 7, 11, 15]
    with torch.no_grad():
        session.network.features[0].weight[dead] = 0.0
        session.network.features[0].bias[dead] = 0.0
    for _ in range(3):
        x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
        nn.functional.cross_entropy(session.network(x), y).backward()
    assert bool((method.saliency(session)["features.0"][dead] == 0).all())
    masks = method.keep_masks(session)
    assert not bool(masks["features.0"][dead].any())
    cost = session.cost_model.exact(masks, "macs")
    assert cost <= 2_293_000 / 16 and cost > 0.97 * 2_293_000 / 16  # fill spends the budget
    with pytest.raises(RuntimeError, match="allocation='taylor' only"):
        DirichletSwitches().saliency(session)


@pytest.mark.parametrize("estimator", ["mean", "gamma"])
def test_switches_train_while_the_frozen_batch_norms_are_in_eval_mode(estimator):
    """With frozen weights the switch phase holds the batch norms in eval mode; the switches
    follow the network's mode, not the first gated layer's (a batch norm here), so the gamma
    estimator samples and the taylor allocation records its saliency (both were silently off:
    the bench's ResNet-20 run found no saliency at hard pruning)."""
    L.seed_everything(0)
    module = ForeignModule(batch_norm=True)
    switches = DirichletImportance(factor=2, epochs=1, example_input=TINY, kl_weight=1e-3, verbose=False, allocation="taylor",
                                   estimator=estimator, samples=1)
    modes = []

    class Modes(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if switches.gates is not None:
                norms = [m for m in pl_module.modules() if isinstance(m, nn.BatchNorm2d)]
                modes.append((all(g.training for _, g in switches.gates.items()), any(m.training for m in norms)))

    trainer(max_epochs=2, callbacks=[switches, HardPruning(1, plot=False, verbose=False), Modes()]).fit(module, tiny_loader(16, n=64))
    assert modes[:4] == [(True, False)] * 4  # the switch phase: switches training, batch norms frozen
    assert switches.session.phase == "hard"


def test_taylor_allocation_weighs_each_group_by_its_total_saliency():
    """The share rule with a group's total saliency as its weight: uniform saliency with
    every group's total 1 gives the plain share widths with n = 1 (LeNet-5: 3-7-500, as
    test_share_allocation_thins_a_layer_less_the_more_importance_it_has_lost finds); a conv2
    whose channels together matter 100x more keeps more of them; a group is never emptied."""
    session, method = _taylor_session()
    sizes = {n: g.num_channels for n, g in session.gates.items()}

    def widths(conv2_total: float) -> tuple[int, ...]:
        totals = {n: 1.0 for n in sizes} | {"features.2": conv2_total}
        method.saliency = lambda _session: {n: torch.full((k,), totals[n] / k, dtype=torch.float64) for n, k in sizes.items()}
        masks = method.keep_masks(session)
        assert session.cost_model.exact(masks, "macs") <= 2_293_000 / 16
        return tuple(int(m.sum()) for m in masks.values())

    method.fill = False
    assert widths(1.0) == (3, 7, 500)
    weighted = widths(100.0)
    assert weighted[1] > 7 and min(weighted) >= 1


@pytest.mark.parametrize("residual", ["tied", "mixed"])
def test_share_allocation_weighs_a_residual_stream_as_the_layers_that_write_it(residual: str):
    """A ResNet stage's stream is written by 4 layers (the stem or projection and 3 blocks): its
    share term counts 4 times, so under a MAC budget with uniform importance the streams keep
    every channel and the blocks' inner convolutions are thinned; counted once (as a plain
    layer), the streams, whose channels are the most MACs each, went first (7/16/36 kept)."""
    from lightning_prune.core.allocation import fit_budget, producing_layers
    from lightning_prune.core.cost.model import CostModel
    from lightning_prune.core.trace import build_graph
    from lightning_prune.models import CifarResNet

    model = CostModel(build_graph(CifarResNet(depth=20).eval(), torch.zeros(1, 3, 32, 32), residual=residual))
    streams = ("conv1", "layer2.0.shortcut.0", "layer3.0.shortcut.0") if residual == "mixed" else (
        "conv1", "layer2.0.conv2", "layer3.0.conv2")
    assert {n: producing_layers(model, n) for n in model.names} == {n: 4 if n in streams else 1 for n in model.names}
    uniform = {n: torch.ones(k) for n, k in zip(model.names, model.sizes)}
    result = fit_budget(model, "macs", model.full("macs") / 2, uniform, relative=True)
    widths = {n: int(m.sum()) for n, m in result.masks.items()}
    assert [widths[n] for n in streams] == [16, 32, 64]
    inner = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert [widths[n] for n in inner] == [7, 7, 7, 20, 15, 15, 40, 30, 30]
    assert result.cost == model.exact(result.masks, "macs") <= model.full("macs") / 2


def test_explicit_width_list_keeps_the_top_channels_by_posterior_mean():
    L.seed_everything(0)
    module = ForeignModule(lr=0.0)  # the weights never change: the shrunk ones can be compared
    switches = DirichletImportance(factor=2, cost="macs", epochs=1, example_input=TINY, gate_lr=0.1, verbose=False)
    seen = {}

    class BeforePruning(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                seen.update(importance=switches.importance(), weight=pl_module.backbone_and_head.conv1.weight.detach().clone())

    t = trainer(max_epochs=2, callbacks=[switches, BeforePruning(), HardPruning(at_epoch=1, widths=[3, 5], plot=False)])
    t.fit(module, tiny_loader(16, n=64))
    net = module.backbone_and_head
    assert (net.conv1.out_channels, net.conv2.out_channels) == (3, 5)
    top3 = torch.sort(seen["importance"]["conv1"].topk(3).indices).values
    assert torch.equal(net.conv1.weight.detach(), seen["weight"][top3])

    with pytest.raises(ValueError, match="widths: 3 numbers for 2 channel groups"):
        bad = DirichletImportance(factor=2, epochs=1, example_input=TINY, verbose=False)
        trainer(max_epochs=2, callbacks=[bad, HardPruning(at_epoch=1, widths=[3, 5, 1], plot=False)]).fit(
            ForeignModule(), tiny_loader(16, n=32))


def test_foreign_module_is_pruned_without_edits_with_the_gamma_estimator():
    L.seed_everything(0)
    module = ForeignModule()
    switches = DirichletImportance(factor=2, cost="params", estimator="gamma", samples=3, example_input=TINY, verbose=False)
    t = trainer(max_epochs=3, callbacks=[switches, HardPruning(at_epoch=2, plot=False)])
    t.fit(module, tiny_loader(16, n=64))
    assert switches.session.skipped_steps == 0  # every gamma-estimator gradient was finite
    small = lightning_prune.export(module)
    full = lightning_prune.count_cost(ForeignModule().backbone_and_head, torch.zeros(1, *TINY)).params
    assert lightning_prune.count_cost(small, torch.zeros(1, *TINY)).params <= full / 2
    assert t.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(0.05 * 0.5**3)
    assert not hasattr(module, "prune_gates")  # switches gone after shrinking
    calls = []
    module.backbone_and_head.register_forward_hook(lambda *_: calls.append(1))
    module.train()
    module.backbone_and_head(torch.zeros(2, *TINY))
    assert len(calls) == 1  # the S-sample averaging hook is gone too


def test_resume_mid_switch_phase_and_after_shrinking_reaches_the_same_end_state(tmp_path):
    def callbacks():
        return [DirichletImportance(factor=3, cost="macs", estimator="gamma", samples=2, layerwise=True,
                                    example_input=TINY, verbose=False),
                HardPruning(at_epoch=2, plot=False, verbose=False)]

    # checkpoints layer by layer half way (epoch 0) and after hard pruning (epoch 2)
    assert_resumes_to_the_same_state(tmp_path, callbacks)


def ddp_run(out: str, devices: int) -> None:
    """Run in a subprocess by the DDP test: layer by layer (so a group's switches are unused
    while the other learns), weights frozen, 1 process with batch 32 or 2 DDP processes with
    16 each; every rank saves its final state to <out>/rank<r>.pt."""
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = ForeignModule(batch_norm=False)
    switches = DirichletImportance(factor=4, cost="macs", layerwise=True, epochs=1, kl_weight=1e-3, example_input=TINY,
                                   verbose=False, allocation="taylor")
    t = trainer(devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=1, callbacks=[switches],
                use_distributed_sampler=False)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # registered before fit, so it runs after any exit handler the callbacks register (LIFO)
    atexit.register(lambda: (out_dir / f"rank{t.global_rank}.exit").write_text(str(dist.is_initialized())))
    loader = tiny_loader(32 // devices, n=256)
    if devices > 1:  # rank r takes samples r, r+2, ...: each step's two halves make the single run's batch
        sampler = torch.utils.data.DistributedSampler(loader.dataset, devices, t.global_rank, shuffle=False)
        loader = DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler)
    t.fit(module, loader)
    torch.save({k: v.detach().cpu() for k, v in tensor_state(module).items()}, out_dir / f"rank{t.global_rank}.pt")


@pytest.mark.slow  # three processes: mostly the time to start torch, lightning and gloo
def test_ddp_two_cpu_processes_match_one_process_and_keep_the_weights_frozen(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    script = tmp_path / "ddp_dirichlet.py"  # a file: Lightning's DDP launcher re-runs sys.argv
    script.write_text("import sys\nfrom tests.test_dirichlet import ddp_run\nddp_run(sys.argv[1], int(sys.argv[2]))\n")
    for name, devices in (("single", 1), ("ddp", 2)):
        done = subprocess.run([sys.executable, str(script), str(tmp_path / name), str(devices)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    # the gloo group is destroyed while the interpreter is alive (left to finalization, it can abort the process)
    assert [(tmp_path / "ddp" / f"rank{r}.exit").read_text() for r in (0, 1)] == ["False", "False"]
    ref = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    L.seed_everything(0)
    start = ForeignModule(batch_norm=False).state_dict()
    assert ref.keys() == ranks[0].keys()
    saliency = [k for k in ref if ".saliency_" in k]
    assert len(saliency) == 4  # a sum and a pass count per group
    for key in ref:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # ranks stay in sync (the saliency: summed over them)
        if key.endswith(".saliency_passes"):
            assert float(ranks[0][key]) == 2 * float(ref[key]) == 8, key  # 4 steps per group, on each of 2 ranks
            continue
        if key.endswith(".saliency_sum"):  # each rank squares its own half batch's derivative
            assert bool((ranks[0][key] > 0).any()) and bool((ref[key] > 0).any()), key
            continue
        assert torch.allclose(ranks[0][key], ref[key], atol=1e-5), key  # same as one process
        if key.endswith(".theta"):
            assert not torch.equal(ref[key], torch.full_like(ref[key], float(THETA0))), key  # both groups learned
        else:
            assert torch.equal(ref[key], start[key]), key  # weights frozen


def test_experiment_config_prunes_lenet5_to_the_mac_budget(tmp_path, data_dir, capsys):
    cfg = compose_train(
        ["experiment=dirichlet_lenet5_mnist", "pruning.dense_epochs=1", "pruning.prune_epoch=2", "trainer.max_epochs=3",
         "scheduler.milestones=[2]", "data.subset=1024", "trainer.limit_val_batches=1", "trainer.limit_test_batches=2",
         "data.eval_batch_size=256"], tmp_path)
    assert cfg.pruning.dirichlet.factor == 16 and cfg.pruning.dirichlet.cost == "macs"
    metrics = run(cfg)
    assert metrics["macs"] <= 2_293_000 / 16
    assert "MACs / image   : 2,293,000 -> " in capsys.readouterr().out


class Unsized(IterableDataset):
    def __iter__(self):
        yield from tiny_loader(16, n=32).dataset


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"budget": 0.5, "factor": 2}, ValueError, "not both|never both|exactly one"),
        ({"factor": 2, "estimator": "sample"}, ValueError, "estimator must be one of"),
        ({"factor": 2, "samples": 5}, ValueError, "samples must be 1 with estimator='mean'"),
        ({"factor": 2, "estimator": "gamma", "samples": 0}, ValueError, "samples"),
        ({"factor": 2, "alpha0": 0}, ValueError, "alpha0"),
        ({"factor": 2, "kl_weight": -1.0}, ValueError, "kl_weight"),
        ({"factor": 2, "epochs": 0}, ValueError, "epochs"),
        ({"factor": 2, "from_epoch": -1}, ValueError, "from_epoch"),
        ({"factor": 2, "layerwise": 1}, TypeError, "layerwise"),
        ({"factor": 2, "init": 0.0}, ValueError, "init"),
        ({"factor": 2, "allocation": "greedy"}, ValueError, "allocation must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DirichletImportance(**kwargs)


def test_inconsistent_phases_and_unknown_dataset_size_fail_clearly():
    def fit(switches, *callbacks, data=None):
        trainer(max_epochs=4, callbacks=[switches, *callbacks]).fit(ForeignModule(), data if data is not None else tiny_loader(16, n=32))

    with pytest.raises(ValueError, match="HardPruning prunes at epoch 3"):
        fit(DirichletImportance(factor=2, epochs=2, example_input=TINY), HardPruning(at_epoch=3))
    with pytest.raises(ValueError, match="from_epoch"):
        fit(DirichletImportance(factor=2, from_epoch=1, example_input=TINY), HardPruning(at_epoch=1))
    with pytest.raises(ValueError, match="layerwise"):
        fit(DirichletImportance(factor=2, layerwise=True, example_input=TINY))
    with pytest.raises(ValueError, match="kl_weight"):
        fit(DirichletImportance(factor=2, example_input=TINY), data=DataLoader(Unsized(), batch_size=16))
    with pytest.raises(TypeError, match="widths"):
        HardPruning(at_epoch=1, widths="5-8-15")
