"""The README's Python examples run as written, on a small LightningModule of a user's own
(random 3x32x32 images, a few batches per epoch), and do what the README says of them."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_prune

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    if len(blocks) != 3:
        raise AssertionError(f"README.md: expected 3 Python examples, found {len(blocks)}; update this test with them")
    return blocks


class UserNet(L.LightningModule):
    """A user's module: its own layer names, Adam, no example input."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(),
        )
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class RandomImages(L.LightningDataModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)),
                          batch_size=32)


class QuietTrainer(L.Trainer):
    """``L.Trainer`` as the README calls it, kept quiet and short per epoch for the test."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=1)


def test_the_callbacks_example_shrinks_a_users_module_under_its_volume_budget(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(L, "Trainer", QuietTrainer)
    torch.manual_seed(0)
    module = UserNet()
    x = torch.randn(2, 3, 32, 32)
    dense_volume = lightning_prune.count_cost(module, x).volume
    namespace = {"my_unchanged_lightning_module": module, "datamodule": RandomImages()}
    exec(python_blocks()[0], namespace)

    small = namespace["small"]
    assert small is not module  # a copy: the module the user trained is left as it is
    widths = [m.out_channels for m in small.features if isinstance(m, nn.Conv2d)]
    assert sum(widths) < 16 + 24 + 32, widths
    assert lightning_prune.count_cost(small, x).volume <= dense_volume / 8
    assert torch.load(tmp_path / "small.pt", weights_only=True)
    small.eval()
    module.eval()
    with torch.no_grad():  # the gated module (gates fixed after hard pruning) and the exported network agree
        assert torch.allclose(small(x), module(x), atol=1e-5)
        assert torch.allclose(lightning_prune.load_pruned(tmp_path / "small.pt", model=UserNet()).eval()(x), small(x), atol=1e-6)


@pytest.fixture(scope="module")
def pruned_module(tmp_path_factory: pytest.TempPathFactory) -> L.LightningModule:
    """``UserNet`` after the README's callbacks (a short schedule)."""
    from lightning_prune.callbacks import BudgetAwareRegularization, HardPruning, SigmoidalBudgetAnnealing

    torch.manual_seed(0)
    module = UserNet()
    callbacks = [BudgetAwareRegularization(budget=1 / 4, cost="volume"), SigmoidalBudgetAnnealing(until_epoch=2, hardness=10),
                 HardPruning(at_epoch=2, freeze=True, shrink=True)]
    QuietTrainer(max_epochs=4, default_root_dir=tmp_path_factory.mktemp("readme"), callbacks=callbacks).fit(module, RandomImages())
    return module.eval()


def test_the_deploy_example_gives_the_same_outputs_in_every_form(pruned_module, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    namespace = {"lightning_prune": lightning_prune, "torch": torch, "module": pruned_module}
    exec(python_blocks()[1], namespace)

    x = torch.randn(3, 3, 32, 32)
    reference = lightning_prune.export(pruned_module).eval()
    with torch.no_grad():
        expected = reference(x)
        assert torch.allclose(namespace["fast"](x), expected, atol=1e-4)
        assert torch.allclose(lightning_prune.load_pruned("small.pt", model=UserNet()).eval()(x), expected, atol=1e-4)
        assert torch.allclose(namespace["program"].module()(x), expected, atol=1e-4)
    folded = [m for m in namespace["fast"].modules() if isinstance(m, nn.BatchNorm2d)]
    assert not folded, "export(inference=True) should fold the batch norms that follow convolutions"
    assert (tmp_path / "small.onnx").stat().st_size > 0
    assert isinstance(namespace["program"], torch.export.ExportedProgram)


def test_the_latency_budget_example_builds_the_callback():
    from lightning_prune.callbacks import BudgetAwareRegularization

    namespace = {"BudgetAwareRegularization": BudgetAwareRegularization}
    exec("callback = " + python_blocks()[2].strip(), namespace)
    assert isinstance(namespace["callback"], BudgetAwareRegularization)
