"""Small LightningModules and data for the pruning-callback tests."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyCNN(nn.Module):
    """conv 8 (-> BN) -> pool -> conv 12 -> global pool -> linear 4, for 1x8x8 inputs
    (``widths``: the two convolutions' output channels, 8 and 12 unless given)."""

    def __init__(self, batch_norm: bool = True, widths: tuple[int, int] = (8, 12)) -> None:
        super().__init__()
        first, second = widths
        self.conv1 = nn.Conv2d(1, first, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(first) if batch_norm else nn.Identity()
        self.conv2 = nn.Conv2d(first, second, 3, padding=1)
        self.head = nn.Linear(second, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


class ForeignModule(L.LightningModule):
    """Written unlike ImageClassifier: its own attribute names, a dict from training_step,
    its own SGD + StepLR, no forward() and no example_input_array."""

    def __init__(self, lr: float = 0.05, batch_norm: bool = True, widths: tuple[int, int] = (8, 12)) -> None:
        super().__init__()
        self.backbone_and_head = TinyCNN(batch_norm, widths)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        images, labels = batch
        scores = self.backbone_and_head(images)
        return {"loss": F.cross_entropy(scores, labels), "n": len(labels)}

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.backbone_and_head.parameters(), lr=self.lr, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


def tiny_data(n: int = 128, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 0, 4:].mean(dim=(1, 2)) > 0).long()
    return TensorDataset(x, y)


def tiny_loader(batch_size: int = 32, n: int = 128, shuffle: bool = False) -> DataLoader:
    return DataLoader(tiny_data(n), batch_size=batch_size, shuffle=shuffle)


TINY = (1, 8, 8)  # the input shape of TinyCNN (one image)


def trainer(**kwargs) -> L.Trainer:
    """A quiet CPU Trainer (no logger, checkpoints, progress bar or sanity steps unless given)."""
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kwargs})


def tensor_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` without the ``_extra_state`` entries (pruning histories)."""
    return {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}


def fit_with_checkpoints(folder, callbacks: list, ckpt: str | None = None, epochs: int = 4) -> ForeignModule:
    """Train ``ForeignModule`` from seed 0 on shuffled tiny data with ``callbacks``, saving a
    checkpoint ``epoch=<n>.ckpt`` per epoch in ``folder``; resumed from ``ckpt`` if given."""
    L.seed_everything(0)
    module = ForeignModule()
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_top_k=-1, filename="{epoch}")
    t = trainer(max_epochs=epochs, enable_checkpointing=True, callbacks=[*callbacks, checkpoints])
    t.fit(module, tiny_loader(16, n=64, shuffle=True), ckpt_path=ckpt)
    return module


def assert_resumes_to_the_same_state(folder, make_callbacks, checkpoints=("epoch=0.ckpt", "epoch=2.ckpt")) -> ForeignModule:
    """Resuming from each of ``checkpoints`` of an uninterrupted run (fresh callbacks from
    ``make_callbacks()`` every run) must end with the same tensors; returns the uninterrupted module."""
    straight = fit_with_checkpoints(folder, make_callbacks())
    final = tensor_state(straight)
    for ckpt in checkpoints:
        state = tensor_state(fit_with_checkpoints(folder / "again", make_callbacks(), str(folder / ckpt)))
        assert state.keys() == final.keys(), ckpt
        for k in final:
            assert torch.allclose(state[k].float(), final[k].float(), atol=1e-6), (ckpt, k)
    return straight
