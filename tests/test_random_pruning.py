"""RandomPruning, the random-pruning baseline: budget met on the shrunk network, the choice
set by the seed, resume before and after pruning, a Hydra config, bad arguments."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

import lightning_prune
from lightning_prune.callbacks import HardPruning, RandomPruning
from lightning_prune.classifier import ImageClassifier
from lightning_prune.models import CifarResNet
from tests.bar_helpers import TINY, assert_resumes_to_the_same_state, trainer
from tests.conftest import compose_train


def _masks(seed: int, factor: float = 4.0) -> dict[str, torch.Tensor]:
    random = RandomPruning(factor=factor, cost="volume", seed=seed, example_input=(3, 32, 32), verbose=False)
    random.setup(trainer(), ImageClassifier(CifarResNet(20), 10, optimizer=torch.optim.Adam), "fit")
    masks = random.session.keep_masks()
    cost = random.session.cost_model.exact(masks, "volume")
    assert cost <= random.session.budget.target
    # dropping stops as soon as the budget is met: the last channel dropped was needed
    largest_channel = max(float(w.max()) for w in random.session.cost_model.channel_weights("volume").values())
    assert cost > random.session.budget.target - largest_channel
    return masks


def test_random_masks_meet_the_budget_spread_over_groups_and_follow_the_seed():
    a, b, again = _masks(0), _masks(1), _masks(0)
    assert all(torch.equal(a[n], again[n]) for n in a)
    assert any(not torch.equal(a[n], b[n]) for n in a)
    kept = torch.tensor([float(m.float().mean()) for m in a.values()])
    # uniform over channels: every group keeps about the same share, none is emptied
    assert bool((kept > 0).all()) and float(kept.std()) < 0.2
    # a smaller budget keeps fewer channels
    sixteen = _masks(0, factor=16)
    assert sum(int(m.sum()) for m in sixteen.values()) < sum(int(m.sum()) for m in a.values())


def test_resnet20_is_shrunk_to_the_volume_budget_after_dense_epochs():
    L.seed_everything(0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    module = ImageClassifier(CifarResNet(20), 10, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    random = RandomPruning(factor=8, cost="volume", example_input=(3, 32, 32), verbose=False)
    t = trainer(max_epochs=2, callbacks=[random, HardPruning(at_epoch=1, plot=False, verbose=False)])
    t.fit(module, loader)
    full = lightning_prune.count_cost(CifarResNet(20), torch.zeros(1, 3, 32, 32)).volume
    small = lightning_prune.export(module)
    assert lightning_prune.count_cost(small, torch.zeros(1, 3, 32, 32)).volume <= full / 8
    assert lightning_prune.count_cost(module.net, torch.zeros(1, 3, 32, 32)).volume <= full / 8  # trained small
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resume_before_and_after_pruning_reaches_the_same_end_state(tmp_path):
    def callbacks():
        return [RandomPruning(factor=3, cost="macs", seed=5, example_input=TINY, verbose=False),
                HardPruning(at_epoch=2, plot=False, verbose=False)]

    # checkpoints in the dense phase (epoch 0) and after pruning and shrinking (epoch 2)
    straight = assert_resumes_to_the_same_state(tmp_path, callbacks)
    assert straight.backbone_and_head.conv1.out_channels < 8 or straight.backbone_and_head.conv2.out_channels < 12


def test_hydra_config_composes_with_a_budget(tmp_path):
    cfg = compose_train(["experiment=bar_resnet20_cifar10", "pruning=random", "pruning.prune_epoch=3", "budget.factor=8"],
                        tmp_path)
    callback = instantiate(cfg.pruning.random)
    assert isinstance(callback, RandomPruning) and callback.budget == pytest.approx(1 / 8) and callback.cost == "volume"
    assert instantiate(cfg.pruning.hard_pruning).at_epoch == 3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [({"factor": 2, "seed": -1}, ValueError, "seed"), ({"factor": 2, "seed": 1.5}, TypeError, "seed"),
     ({"factor": 2, "cost": "flops"}, ValueError, "cost"), ({}, ValueError, "budget")],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        RandomPruning(**kwargs)


def test_widths_keep_that_many_random_channels_in_each_listed_group():
    random = RandomPruning(factor=1.25, cost="volume", example_input=(3, 32, 32), verbose=False)
    random.setup(trainer(), ImageClassifier(CifarResNet(20), 10, optimizer=torch.optim.Adam), "fit")
    first = random.graph.names[0]
    masks = random.session.keep_masks({first: 3})
    assert int(masks[first].sum()) == 3
    assert all(bool(m.all()) for name, m in masks.items() if name != first)
