"""Budget-Aware Regularization callbacks: penalty values, the schedule, budgets met on the
shrunk network, bf16, gradient accumulation, DDP, resume, and a foreign LightningModule."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import lightning_prune
from lightning_prune.callbacks import BudgetAwareRegularization, HardPruning, SigmoidalBudgetAnnealing
from lightning_prune.core.budget import Budget, distillation_loss
from lightning_prune.callbacks.distillation import _DistillGradient
from lightning_prune.callbacks.gated import example_from_batch
from lightning_prune.classifier import ImageClassifier
from lightning_prune.data import MNISTDataModule
from lightning_prune.core.gates import HardConcreteGate
from lightning_prune.models import CifarResNet, LeNet5
from tests.bar_helpers import (
    TINY,
    ForeignModule,
    TinyCNN,
    assert_resumes_to_the_same_state,
    fit_with_checkpoints,
    tensor_state,
    tiny_loader,
    trainer,
)


@pytest.fixture
def deterministic_gates(monkeypatch):
    """Gates return z_hat in training too, so runs differing only in batching agree exactly."""
    monkeypatch.setattr(HardConcreteGate, "sample", lambda self, noise=None: self.deterministic())


def test_widths_keep_the_most_open_channels():
    bar = BudgetAwareRegularization(factor=1.25, cost="volume", example_input=TINY, verbose=False)
    bar.setup(trainer(), ForeignModule(), "fit")
    with torch.no_grad():
        bar.gates["conv1"].log_alpha.copy_(torch.tensor([0.0, 3.0, -1.0, 2.0, 1.0, -2.0, 0.5, -3.0]))
    masks = bar.session.keep_masks({"conv1": 3})
    assert masks["conv1"].nonzero().flatten().tolist() == [1, 3, 4] and bool(masks["conv2"].all())


def test_annealing_moves_per_step_along_the_sigmoid():
    annealing = SigmoidalBudgetAnnealing(until_epoch=3, from_epoch=1, hardness=10)
    assert annealing.progress(0, 10) == 0.0
    assert annealing.progress(10, 10) == 0.0
    assert annealing.progress(15, 10) == pytest.approx(0.25)  # mid-epoch: per step, not per epoch
    assert annealing.progress(20, 10) == pytest.approx(0.5)
    assert annealing.progress(40, 10) == 1.0
    budget = Budget.of(0.1, "macs", 1000, 1)  # the session's budget, as the callback anneals it
    budget.anneal(annealing.schedule, annealing.start_factor)
    assert budget.current(0.0) == pytest.approx(1010)
    assert budget.current(0.5) == pytest.approx((1010 + 100) / 2)
    assert budget.current(1.0) == pytest.approx(100)
    geometric = Budget.of(0.1, "macs", 1000, 1)
    geometric.anneal(annealing.schedule, annealing.start_factor, "geometric")  # equal ratios: the midpoint is the geometric mean
    assert geometric.current(0.5) == pytest.approx((1010 * 100) ** 0.5)
    assert geometric.current(0.0) == pytest.approx(1010) and geometric.current(1.0) == pytest.approx(100)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        SigmoidalBudgetAnnealing(until_epoch=1, interpolation="log")
    with pytest.raises(ValueError, match="start_factor must be > 1"):
        SigmoidalBudgetAnnealing(until_epoch=1, start_factor=1.0)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        geometric.anneal(annealing.schedule, annealing.start_factor, "log")
    inside = SigmoidalBudgetAnnealing(until_epoch=0.75)  # the target reached inside the first epoch
    assert inside.progress(3, 8) == pytest.approx(0.5)
    assert inside.progress(6, 8) == 1.0 and inside.progress(8, 8) == 1.0


def test_annealing_inside_an_epoch_and_by_ratios_in_a_fit():
    """until_epoch=0.5 and interpolation="geometric" reach the session: the budget is the target
    from the middle of the first epoch on, and the schedule moves it by equal ratios."""
    bar = BudgetAwareRegularization(factor=4, cost="macs", example_input=TINY, verbose=False)
    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(bar.session.progress)

    t = trainer(max_epochs=1, callbacks=[bar, SigmoidalBudgetAnnealing(until_epoch=0.5, interpolation="geometric"), Watch()])
    t.fit(ForeignModule(), tiny_loader(batch_size=16))  # 8 steps: progress 1 from the 4th on
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0])
    budget = bar.session.budget
    assert budget.interpolation == "geometric"
    start = budget.start_factor * budget.full
    assert budget.current(0.5) == pytest.approx((start * budget.target) ** 0.5)


def test_distillation_gradient_blends_user_loss_and_kd():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, requires_grad=True)
    teacher = torch.randn(5, 3)
    target = torch.tensor([0, 1, 2, 1, 0])
    t, alpha, scale = 4.0, 0.9, 0.5
    out = _DistillGradient.apply(logits, teacher, t, alpha, scale)
    (scale * F.cross_entropy(out, target)).backward()
    ref = logits.detach().clone().requires_grad_(True)
    # the gradient of L_D (budget.distillation_loss, golden values in test_budget.py), scaled
    (scale * distillation_loss(ref, teacher, target, temperature=t, alpha=alpha)).backward()
    assert torch.allclose(logits.grad, ref.grad, atol=1e-6)


def test_lenet5_mnist_meets_the_mac_budget_on_the_shrunk_network(data_dir, tmp_path, caplog):
    L.seed_everything(0)
    dm = MNISTDataModule(data_dir, batch_size=64, subset=1280, val_size=500)
    module = ImageClassifier(LeNet5(), 10, optimizer=partial(torch.optim.Adam, lr=1e-3))
    bar = BudgetAwareRegularization(factor=16, cost="macs", verbose=False)
    t = trainer(max_epochs=3, limit_val_batches=1, default_root_dir=tmp_path,
                callbacks=[bar, SigmoidalBudgetAnnealing(until_epoch=2), HardPruning(at_epoch=2)])
    with caplog.at_level("INFO"):
        t.fit(module, dm)
    assert (tmp_path / "alive_channels.png").stat().st_size > 1000  # the plot of channels before/after
    assert "features.0" in caplog.text and "2,293,000 ->" in caplog.text  # the per-layer table
    small = lightning_prune.export(module)
    cost = lightning_prune.count_cost(small, torch.zeros(1, 1, 28, 28))
    assert cost.macs <= 2_293_000 / 16
    assert small.features[0].out_channels < 20 and small.features[2].out_channels < 50  # physically smaller
    assert lightning_prune.count_cost(module.net, torch.zeros(1, 1, 28, 28)).macs == cost.macs  # trained small


def test_resnet20_synthetic_meets_the_volume_budget():
    L.seed_everything(0)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    module = ImageClassifier(CifarResNet(20), 10, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    bar = BudgetAwareRegularization(factor=4, cost="volume", example_input=(3, 32, 32), verbose=False)
    t = trainer(max_epochs=2, callbacks=[bar, SigmoidalBudgetAnnealing(until_epoch=1), HardPruning(at_epoch=1, plot=False)])
    t.fit(module, loader)
    full = lightning_prune.count_cost(CifarResNet(20), torch.zeros(1, 3, 32, 32)).volume
    small = lightning_prune.export(module)
    assert lightning_prune.count_cost(small, torch.zeros(1, 3, 32, 32)).volume <= full / 4
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def _gate_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if "log_alpha" in k}


def _run_tiny(batch_size: int, accumulate: int, precision: str = "32-true", steps: int = 4):
    L.seed_everything(0)
    module = ForeignModule(batch_norm=False)
    torch.manual_seed(1)  # the gates are drawn at setup: same start for every run
    bar = BudgetAwareRegularization(factor=4, cost="macs", example_input=TINY, gate_lr=0.05, verbose=False)
    t = trainer(max_steps=steps, accumulate_grad_batches=accumulate, precision=precision, callbacks=[bar])
    t.fit(module, tiny_loader(batch_size, n=256))
    return module, bar


def test_gradient_accumulation_equals_one_large_batch(deterministic_gates):
    big, bar_big = _run_tiny(batch_size=32, accumulate=1)
    acc, bar_acc = _run_tiny(batch_size=16, accumulate=2)
    assert bar_big.method.last["f"] > 0  # the penalty was active
    for (k, v), (_, w) in zip(_gate_state(big).items(), _gate_state(acc).items()):
        assert torch.allclose(v, w, atol=1e-5), k
    for v in _gate_state(big).values():
        assert (v - 0.005).abs().min() > 0.01  # every gate moved away from its U(0, 0.01) start


def test_bf16_mixed_precision_trains_the_gates_like_fp32(deterministic_gates):
    full, bar_full = _run_tiny(batch_size=32, accumulate=1)
    half, bar_half = _run_tiny(batch_size=32, accumulate=1, precision="bf16-mixed")
    assert bar_half.session.skipped_steps == 0
    for (k, v), (_, w) in zip(_gate_state(full).items(), _gate_state(half).items()):
        assert torch.isfinite(w).all()
        assert torch.allclose(v, w, atol=2e-2), k


DDP_SCRIPT = Path(__file__).parent / "scripts" / "ddp_bar.py"


def test_ddp_two_cpu_processes_match_one_process_with_the_global_batch(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    single = subprocess.run([sys.executable, str(DDP_SCRIPT), str(tmp_path / "single"), "1"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, str(DDP_SCRIPT), str(tmp_path / "ddp"), "2"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ref = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ref.keys() == ranks[0].keys() and any("log_alpha" in k for k in ref)
    for key in ref:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # ranks stay in sync
        assert torch.allclose(ranks[0][key], ref[key], atol=1e-5), key  # same as one process


def test_resume_mid_soft_phase_and_after_shrinking_reaches_the_same_end_state(tmp_path):
    def callbacks():
        return [BudgetAwareRegularization(factor=3, cost="volume", example_input=TINY, verbose=False),
                SigmoidalBudgetAnnealing(until_epoch=2), HardPruning(at_epoch=2, plot=False, verbose=False)]

    # checkpoints mid soft phase (epoch 0) and after hard pruning and shrinking (epoch 2)
    straight = assert_resumes_to_the_same_state(tmp_path, callbacks)
    assert straight.backbone_and_head.conv1.out_channels < 8 or straight.backbone_and_head.conv2.out_channels < 12


def test_foreign_lightning_module_is_pruned_without_edits():
    L.seed_everything(0)
    module = ForeignModule()
    t = trainer(max_epochs=3, callbacks=[
        BudgetAwareRegularization(factor=2, cost="params", example_input=TINY, verbose=False),
        SigmoidalBudgetAnnealing(until_epoch=2),
        HardPruning(at_epoch=2, plot=False),
    ])
    t.fit(module, tiny_loader(16, n=64))
    small = lightning_prune.export(module)
    full = lightning_prune.count_cost(ForeignModule().backbone_and_head, torch.zeros(1, *TINY)).params
    assert lightning_prune.count_cost(small, torch.zeros(1, *TINY)).params <= full / 2
    assert t.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(0.05 * 0.5**3)
    assert not hasattr(module, "prune_gates")  # gates gone after shrinking


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"budget": 0.5, "factor": 2}, ValueError, "not both|never both|exactly one"),
        ({"factor": 2, "cost": "flops"}, ValueError, "cost must be one of"),
        ({"factor": 2, "lambda_": -1}, ValueError, "lambda_"),
        ({"factor": 2, "margin": 1.0}, ValueError, "margin"),
        ({"factor": 2, "alpha": 2}, ValueError, "alpha"),
        ({"factor": 2, "gate_lr": 0}, ValueError, "gate_lr"),
        ({"factor": 2, "penalty": "flops"}, ValueError, "penalty"),
        ({"factor": 2, "ignore": "conv1"}, TypeError, "ignore"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        BudgetAwareRegularization(**kwargs)


def test_unreachable_budget_and_missing_partners_fail_at_setup():
    with pytest.raises(ValueError, match="one channel per prunable group"):
        BudgetAwareRegularization(budget=1e-4, cost="macs", example_input=TINY).setup(trainer(), ForeignModule(), "fit")
    with pytest.raises(ValueError, match="example_input: none of the tensors of the first training batch"):
        example_from_batch(TinyCNN(), {"labels": torch.zeros(4, dtype=torch.long), "ids": torch.zeros(4, 3)})
    t = trainer(max_epochs=1, callbacks=[SigmoidalBudgetAnnealing(until_epoch=1)])
    with pytest.raises(ValueError, match="BudgetAwareRegularization"):
        t.fit(ForeignModule(), tiny_loader())
    with pytest.raises(ValueError, match="until_epoch"):
        SigmoidalBudgetAnnealing(until_epoch=1, from_epoch=1)
    with pytest.raises(ValueError, match="until_epoch"):
        SigmoidalBudgetAnnealing(until_epoch=0.0)
    with pytest.raises(TypeError, match="until_epoch"):
        SigmoidalBudgetAnnealing(until_epoch="1")
    with pytest.raises(ValueError, match="freeze"):
        HardPruning(at_epoch=1, freeze=False)
