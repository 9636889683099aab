"""Training, testing and timing shared by every benchmark method: one recipe per task, so the
methods differ only in how they choose and remove channels."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import random
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_prune.classifier import ImageClassifier
from lightning_prune.core.export import export
from lightning_prune.core.session import session_of
from lightning_prune.core.timing import median_latency

TOY_BATCHES = 2  # batches per epoch (and test batches) at toy size


def dense_epochs(cfg: DictConfig) -> int:
    """Epochs of the task's dense recipe, its warm restarts (``dense.restarts``) included."""
    return int(cfg.task.dense.epochs) + sum(int(restart.epochs) for restart in dense_restarts(cfg))


def dense_restarts(cfg: DictConfig) -> list[DictConfig]:
    """The warm restarts that continue the task's dense training, in order (``dense.restarts``:
    a list of recipes, each with its ``epochs``, ``optimizer`` and ``scheduler``; none if absent)."""
    restarts = cfg.task.dense.get("restarts")
    if restarts is None:
        return []
    if not OmegaConf.is_list(restarts):
        raise TypeError(f"task.dense.restarts: expected a list of recipes, got {type(restarts).__name__}")
    for k, restart in enumerate(restarts):
        if not OmegaConf.is_dict(restart) or "epochs" not in restart or "optimizer" not in restart:
            raise ValueError(f"task.dense.restarts[{k}]: a recipe needs 'epochs' and 'optimizer' (and may have 'scheduler')")
    return list(restarts)


def scheduler_for(node: DictConfig, epochs: int, planned: int) -> Any:
    """The recipe's scheduler factory stretched from ``planned`` to ``epochs`` epochs
    (cosine: ``T_max``; multi-step: the milestones scaled)."""
    node = copy.deepcopy(node)
    if "T_max" in node:
        node.T_max = max(1, epochs)
    if "milestones" in node:
        node.milestones = [max(1, round(m * epochs / planned)) for m in node.milestones]
    return instantiate(node)


class RunCheckpoints:
    """A run's resume point: every :func:`fit` of the run (the k-th in call order) saves a
    checkpoint at the end of each epoch under ``directory/fit<k>/``, and a later process of the
    same run resumes each fit from its checkpoint; the runner deletes ``directory`` once the
    result file is written. Also the run's clock: ``seconds()`` counts the wall time of the
    earlier, killed processes up to their last checkpoint."""

    def __init__(self, directory: Path, started: float) -> None:
        self.directory, self.fits, self.started, self.earlier = directory, 0, started, 0.0
        self.resumed: list[dict[str, int]] = []  # per resumed fit: its index and the epochs it skipped

    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self.started

    def next_fit(self) -> Path:
        path = self.directory / f"fit{self.fits}"
        self.fits += 1
        return path

    def delete(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


_ACTIVE: contextvars.ContextVar[RunCheckpoints | None] = contextvars.ContextVar("run_checkpoints", default=None)


@contextlib.contextmanager
def resumable(directory: Path, config: str, started: float) -> Iterator[RunCheckpoints]:
    """Within this block every :func:`fit` saves and resumes through ``directory``, the run's
    clock started at ``started`` (``time.perf_counter()``). The checkpoints of a run with another
    ``config`` (the run's configuration as text) are discarded with a warning."""
    saved = directory / "config.yaml"
    if saved.is_file() and saved.read_text() != config:
        warnings.warn(f"{directory}: checkpoints of a run with another configuration, discarded", stacklevel=3)
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    saved.write_text(config)
    checkpoints = RunCheckpoints(directory, started)
    token = _ACTIVE.set(checkpoints)
    try:
        yield checkpoints
    finally:
        _ACTIVE.reset(token)


class _RunState(Callback):
    """Saves, in each checkpoint, the run's wall time and the random generators' states (Python,
    NumPy, torch); on resume it takes the time back as the earlier processes' and restores the
    generators before the data loader draws its first shuffle, so that a resumed run draws the
    same batches and noise as one never stopped (exactly so when the data loader's workers are
    not persistent: a persistent worker's augmentation stream starts anew in the new process)."""

    def __init__(self, checkpoints: RunCheckpoints) -> None:
        self.checkpoints = checkpoints

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        numpy = [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)]
        return {"seconds": self.checkpoints.seconds(), "python": random.getstate(), "numpy": numpy,  # weights_only-loadable
                "torch": torch.get_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.checkpoints.earlier += float(state_dict["seconds"])
        python = state_dict["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))
        kind, keys, position, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        torch.set_rng_state(state_dict["torch"])


def task_precision(cfg: DictConfig) -> str:
    """The task's Lightning precision for training (``task.precision``, ``32-true`` unless set)."""
    return str(cfg.task.get("precision", "32-true"))


def trainer(cfg: DictConfig, epochs: int, callbacks: Sequence[Callback] = (), checkpoint_dir: Path | None = None) -> L.Trainer:
    """A quiet CPU Trainer: no validation, no logger (the result file is the record), in the
    task's ``precision`` (Lightning's precision setting, ``32-true`` unless the task names
    another); with ``checkpoint_dir``, a checkpoint ``last.ckpt`` there at the end of every epoch."""
    toy = {"limit_train_batches": TOY_BATCHES} if cfg.toy else {}
    callbacks = list(callbacks)
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="last", save_top_k=1, every_n_epochs=1,
                                         save_on_train_epoch_end=True, enable_version_counter=False))
    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=checkpoint_dir is not None,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        precision=task_precision(cfg), callbacks=callbacks, **toy,
    )


def _saved_epoch(path: Path) -> tuple[Path, int] | None:
    """``path`` and the epochs it has done, or None when there is no checkpoint; a checkpoint a
    killed process left unreadable is deleted (its fit starts over) with a warning."""
    if not path.is_file():
        return None
    try:
        return path, int(torch.load(path, map_location="cpu", weights_only=True)["epoch"]) + 1
    except Exception as error:  # a truncated file: any of pickle's, zipfile's or torch's errors
        warnings.warn(f"{path}: unreadable checkpoint ({error}); this fit starts over", stacklevel=2)
        path.unlink()
        return None


def fit(cfg: DictConfig, datamodule: L.LightningDataModule, net: nn.Module, recipe: DictConfig, epochs: int,
        callbacks: Sequence[Callback] = (), planned: int | None = None) -> nn.Module:
    """Train ``net`` for ``epochs`` with ``recipe`` (``optimizer``, ``scheduler``: Hydra partials
    written for ``planned`` epochs; optional ``label_smoothing`` of the training loss) and
    ``callbacks``; return the trained network, exported (shrunk, without gates) when a pruning
    method's callback ran. ``epochs=0`` returns ``net`` as it is.
    Inside :func:`resumable`, training continues from this fit's last saved epoch when there is one
    (with the random generators' states saved with it, see :class:`_RunState`)."""
    if epochs == 0:
        return net
    net.train()  # Lightning leaves the modules' mode as it finds it: a network copied in eval mode would train so
    module = ImageClassifier(
        net, datamodule.num_classes, optimizer=instantiate(recipe.optimizer),
        scheduler=scheduler_for(recipe.scheduler, epochs, planned or epochs) if recipe.get("scheduler") else None,
        label_smoothing=recipe.get("label_smoothing", 0.0),
    )
    checkpoints = _ACTIVE.get()
    if checkpoints is None:
        trainer(cfg, epochs, callbacks).fit(module, datamodule=datamodule)
    else:
        directory = checkpoints.next_fit()
        resume = _saved_epoch(directory / "last.ckpt")
        if resume is not None:
            checkpoints.resumed.append({"fit": checkpoints.fits - 1, "epochs_skipped": resume[1]})
        fitting = trainer(cfg, epochs, [_RunState(checkpoints), *callbacks], checkpoint_dir=directory)
        fitting.fit(module, datamodule=datamodule, ckpt_path=resume[0] if resume else None)
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
