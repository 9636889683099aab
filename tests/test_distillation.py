"""Distillation from the network at fit start, for every channel-selection callback: through
the fine-tuning of the shrunk network, resumed after shrinking, and the hook gone at fit end."""

from __future__ import annotations

import pytest
import torch

import lightning_prune
from lightning_prune.callbacks import (
    BudgetAwareRegularization,
    DirichletImportance,
    HardPruning,
    RandomPruning,
    SigmoidalBudgetAnnealing,
)
from tests.bar_helpers import TINY, assert_resumes_to_the_same_state, fit_with_checkpoints, tensor_state


def _bar(**distill):
    return [BudgetAwareRegularization(factor=3, cost="volume", example_input=TINY, verbose=False, **distill),
            SigmoidalBudgetAnnealing(until_epoch=2)]


def _dirichlet(**distill):
    return [DirichletImportance(factor=3, cost="volume", example_input=TINY, verbose=False, epochs=2, **distill)]


def _random(**distill):
    return [RandomPruning(factor=3, cost="volume", example_input=TINY, verbose=False, seed=1, **distill)]


@pytest.mark.parametrize(("selection", "soft"), [(_bar, True), (_dirichlet, False), (_random, False)], ids=["bar", "dirichlet", "random"])
def test_distillation_through_fine_tuning_resumes_after_shrinking_to_the_same_end_state(tmp_path, selection, soft):
    """With ``distill_fine_tuning`` the shrunk network keeps learning from the full teacher: the
    end state differs from the run without it, and resuming from a checkpoint taken after hard
    pruning (the network shrunk, the teacher full) ends in the same tensors."""
    at = 0 if selection is _random else 2

    def callbacks(through: bool):
        return lambda: [*selection(distillation=soft, distill_fine_tuning=through), HardPruning(at_epoch=at, plot=False, verbose=False)]

    without = tensor_state(fit_with_checkpoints(tmp_path / "without", callbacks(False)()))
    checkpoints = ("epoch=0.ckpt", "epoch=2.ckpt") if at else ("epoch=0.ckpt", "epoch=1.ckpt")
    straight = assert_resumes_to_the_same_state(tmp_path, callbacks(True), checkpoints=checkpoints)
    final = tensor_state(straight)
    assert final.keys() == without.keys()  # the same channels were chosen: distillation after them changes only weights
    assert any(not torch.allclose(final[k].float(), without[k].float()) for k in final)  # the fine-tuning epochs were distilled
    assert not straight.backbone_and_head._forward_hooks  # the teacher's hook ends with fit
    assert not lightning_prune.export(straight)._forward_hooks


def test_distillation_only_in_the_soft_phase_drops_the_teacher_after_hard_pruning(tmp_path):
    callback = _bar(distillation=True)[0]
    fit_with_checkpoints(tmp_path, [callback, SigmoidalBudgetAnnealing(until_epoch=2), HardPruning(at_epoch=2, plot=False, verbose=False)])
    assert callback.teacher is None and not callback.distilling
    assert "teacher" not in callback.state_dict()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"distillation": 1}, "distillation"),
    ({"distill_fine_tuning": "yes"}, "distill_fine_tuning"),
    ({"temperature": 0.0}, "temperature"),
    ({"alpha": 1.5}, "alpha"),
])
def test_distillation_arguments_are_checked(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        RandomPruning(factor=2, **kwargs)


def test_dirichlet_refuses_distilling_an_average_of_samples():
    with pytest.raises(ValueError, match="distillation: the switch phase averages 3 forward passes"):
        DirichletImportance(factor=2, estimator="gamma", samples=3, distillation=True)
    DirichletImportance(factor=2, estimator="gamma", samples=3, distill_fine_tuning=True)  # fine-tuning only is fine
