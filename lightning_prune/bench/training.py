"""Training, testing and timing shared by every benchmark method: one recipe per task, so the
methods differ only in how they choose and remove channels."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_prune.classifier import ImageClassifier
from lightning_prune.core.export import export
from lightning_prune.core.session import session_of
from lightning_prune.core.timing import median_latency

TOY_BATCHES = 2  # batches per epoch (and test batches) at toy size


def dense_epochs(cfg: DictConfig) -> int:
    """Epochs of the task's dense recipe, its warm restart (``dense.restart``) included."""
    restart = cfg.task.dense.get("restart")
    return int(cfg.task.dense.epochs) + (int(restart.epochs) if restart else 0)


def scheduler_for(node: DictConfig, epochs: int, planned: int) -> Any:
    """The recipe's scheduler factory stretched from ``planned`` to ``epochs`` epochs
    (cosine: ``T_max``; multi-step: the milestones scaled)."""
    node = copy.deepcopy(node)
    if "T_max" in node:
        node.T_max = max(1, epochs)
    if "milestones" in node:
        node.milestones = [max(1, round(m * epochs / planned)) for m in node.milestones]
    return instantiate(node)


def trainer(cfg: DictConfig, epochs: int, callbacks: Sequence[Callback] = ()) -> L.Trainer:
    """A quiet CPU Trainer: no validation, no checkpoints, no logger (the result file is the record)."""
    toy = {"limit_train_batches": TOY_BATCHES} if cfg.toy else {}
    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=list(callbacks), **toy,
    )


def fit(cfg: DictConfig, datamodule: L.LightningDataModule, net: nn.Module, recipe: DictConfig, epochs: int,
        callbacks: Sequence[Callback] = (), planned: int | None = None) -> nn.Module:
    """Train ``net`` for ``epochs`` with ``recipe`` (``optimizer``, ``scheduler``: Hydra partials
    written for ``planned`` epochs) and ``callbacks``; return the trained network, exported
    (shrunk, without gates) when a pruning method's callback ran. ``epochs=0`` returns ``net`` as it is."""
    if epochs == 0:
        return net
    net.train()  # Lightning leaves the modules' mode as it finds it: a network copied in eval mode would train so
    module = ImageClassifier(
        net, datamodule.num_classes, optimizer=instantiate(recipe.optimizer),
        scheduler=scheduler_for(recipe.scheduler, epochs, planned or epochs) if recipe.get("scheduler") else None,
    )
    trainer(cfg, epochs, callbacks).fit(module, datamodule=datamodule)
    return export(module, allow_over_budget=True) if session_of(module) is not None else module.net


@torch.no_grad()
def test_accuracy(cfg: DictConfig, net: nn.Module, datamodule: L.LightningDataModule) -> float:
    """Top-1 accuracy in percent on the test set (its first batches at toy size)."""
    net.eval()
    correct = total = 0
    for i, (inputs, targets) in enumerate(datamodule.test_dataloader()):
        if cfg.toy and i >= TOY_BATCHES:
            break
        correct += int((net(inputs).argmax(-1) == targets).sum())
        total += len(targets)
    return 100.0 * correct / total


def latency_ratios(dense: nn.Module, pruned: nn.Module, input_shape: Sequence[int], toy: bool) -> dict[str, float]:
    """Dense over pruned median latency at batch 1 and 256, timed interleaved in this process."""
    out = {}
    for batch, repeats in ((1, 30), (256, 5)):
        if toy:
            repeats = 1
        example = torch.randn(batch if not toy else min(batch, 8), *input_shape)
        times = median_latency({"dense": dense, "pruned": pruned}, example, repeats=repeats, warmup=1)
        out[f"batch{batch}"] = times["dense"] / times["pruned"]
    return out


def plain(node: DictConfig) -> Any:
    return OmegaConf.to_container(node, resolve=True)
