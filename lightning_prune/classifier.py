"""A generic image-classification LightningModule used by the shipped configs.

Nothing else in lightning-prune depends on it: the pruning callbacks work with any
LightningModule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_prune.core.surgery import enable_pruned_loading

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def optimizers_from_factories(params: Any, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None, interval: str) -> Any:
    """What ``configure_optimizers`` returns for Hydra ``_partial_`` optimizer / scheduler factories."""
    opt = optimizer(params=params)
    if scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(optimizer=opt), "interval": interval}}


class ImageClassifier(L.LightningModule):
    """Cross-entropy classifier around ``net``.

    Args:
        net: the network; its output are the class logits.
        num_classes: number of classes (for the accuracy metrics).
        optimizer: a factory taking the parameters, e.g. ``functools.partial(torch.optim.SGD, lr=0.1)``
            (Hydra: ``_partial_: true``).
        scheduler: optional factory taking the optimizer.
        scheduler_interval: ``"epoch"`` or ``"step"``.
        label_smoothing: the training loss's label smoothing, in [0, 1) (Szegedy et al.,
            "Rethinking the Inception Architecture for Computer Vision", arXiv:1512.00567, Sec. 7);
            validation and test losses are the plain cross-entropy.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if not callable(optimizer):
            raise TypeError("optimizer must be a callable taking the parameters (Hydra: _partial_: true)")
        if scheduler is not None and not callable(scheduler):
            raise TypeError("scheduler must be None or a callable taking the optimizer (Hydra: _partial_: true)")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
        self.net = net
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.label_smoothing = float(label_smoothing)
        enable_pruned_loading(self)  # checkpoints of a shrunk network load (load_from_checkpoint too)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        metric(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "train", sync_dist=stage != "train")
        self.log(f"{stage}/acc", metric, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        return optimizers_from_factories(self.parameters(), self.optimizer_factory, self.scheduler_factory, self.scheduler_interval)
