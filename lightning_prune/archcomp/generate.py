"""The compressor's training set: sampled architectures, each trained briefly with several seeds.

Ashok, "Architecture Compression", arXiv:1902.03326, 2019, Sec. 3.2 and Sec. 5: the expected
accuracy ``E[a | A, D]`` of an architecture is estimated by training it with ``m`` random
initialisations and averaging (eq. 4); the paper uses 1500 architectures, 5 epochs, m = 5.

One result file per architecture (``arch_00042.json``) is written atomically into a results
folder, so that any number of processes (Hydra multirun jobs with any launcher) can fill the
folder in parallel and a run that stops can resume: finished architectures are skipped.
:func:`collect` then writes the single dataset file the compressor is trained on.

Training itself is delegated to two factories (``make_module(net) -> LightningModule`` and
``make_trainer() -> Trainer``), so any LightningModule and Trainer configuration can be used;
the shipped Hydra configs use :class:`lightning_prune.classifier.ImageClassifier`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_prune._checks import check_int
from lightning_prune.archcomp.sampler import ArchitectureSampler
from lightning_prune.archcomp.tokens import Token, build

DATASET_FORMAT = "lightning-prune/archcomp-dataset/1"


@dataclass(frozen=True)
class ArchitectureRecord:
    """One trained architecture: ``accuracy`` is the mean of ``accuracies`` (one per seed, in [0, 1])."""

    index: int
    tokens: list[list[int]]
    params: int
    macs: int
    activations: int
    seeds: list[int]
    accuracies: list[float]
    seconds: float
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def ok(self) -> bool:
        return self.error is None and len(self.accuracies) == len(self.seeds) > 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.ok:
            data["accuracy"] = self.accuracy
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchitectureRecord:
        data = {k: v for k, v in data.items() if k != "accuracy"}
        return cls(**data)


class InMemoryDataModule(L.LightningDataModule):
    """The train and validation sets of ``source`` decoded once into tensors.

    Training hundreds of small networks for an epoch or two is dominated by decoding images
    (PIL, transforms) again for every network and seed; this does it once. The source's
    training transform is applied once, so random augmentation is frozen: use it for the short
    trainings of the architecture dataset, not for final trainings that rely on augmentation.
    """

    def __init__(self, source: L.LightningDataModule) -> None:
        super().__init__()
        if not isinstance(source, L.LightningDataModule):
            raise TypeError(f"source must be a LightningDataModule, got {type(source).__name__}")
        self.source = source
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        for attr in ("name", "num_classes", "input_shape"):
            if hasattr(source, attr):
                setattr(self, attr, getattr(source, attr))

    @staticmethod
    def _tensors(dataset: Dataset) -> TensorDataset:
        xs, ys = zip(*(dataset[i] for i in range(len(dataset))))  # type: ignore[arg-type]
        return TensorDataset(torch.stack(list(xs)), torch.as_tensor(ys))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.source.prepare_data()
            self.source.setup("fit")
            self.train_set = self._tensors(self.source.train_dataloader().dataset)
            self.val_set = self._tensors(self.source.val_dataloader().dataset)

    def _loader(self, dataset: TensorDataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("InMemoryDataModule.setup() must run before its dataloaders are requested")
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.source.train_dataloader().batch_size, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.source.val_dataloader().batch_size, False)


def result_path(results_dir: str | os.PathLike, index: int) -> Path:
    return Path(results_dir) / f"arch_{index:05d}.json"


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a reader (or a parallel job) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def train_accuracy(
    net_factory: Callable[[], nn.Module],
    datamodule: L.LightningDataModule,
    make_module: Callable[[nn.Module], L.LightningModule],
    make_trainer: Callable[[], L.Trainer],
    seeds: Sequence[int],
    metric: str = "val/acc",
) -> list[float]:
    """Train a fresh ``net_factory()`` once per seed; return the ``metric`` logged at the end of each fit
    (KeyError if the module does not log it)."""
    if not seeds:
        raise ValueError("seeds must not be empty")
    accuracies = []
    for seed in seeds:
        L.seed_everything(seed, workers=True, verbose=False)
        module = make_module(net_factory())
        trainer = make_trainer()
        trainer.fit(module, datamodule=datamodule)
        if metric not in trainer.callback_metrics:  # a configuration error: KeyError, so generate() does not record it per architecture
            raise KeyError(f"metric: {metric!r} was not logged; logged metrics are {sorted(trainer.callback_metrics)}")
        accuracies.append(float(trainer.callback_metrics[metric]))
    return accuracies


def generate(
    sampler: ArchitectureSampler,
    indices: Iterable[int],
    results_dir: str | os.PathLike,
    datamodule: L.LightningDataModule,
    make_module: Callable[[nn.Module], L.LightningModule],
    make_trainer: Callable[[], L.Trainer],
    seeds: Sequence[int] = (0, 1),
    metric: str = "val/acc",
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Sample, train and record the architectures ``indices``; skip those already recorded.

    A training that raises is recorded with its ``error`` (and excluded by :func:`collect`),
    so that a resumed run does not retry it forever. Returns counts ``{"trained", "skipped", "failed"}``.
    """
    counts = {"trained": 0, "skipped": 0, "failed": 0}
    for index in indices:
        path = result_path(results_dir, index)
        if path.is_file():
            counts["skipped"] += 1
            continue
        arch = sampler.sample(index)
        start = time.perf_counter()
        error = None
        accuracies: list[float] = []
        try:
            accuracies = train_accuracy(
                lambda: build(arch.tokens, sampler.input_shape), datamodule, make_module, make_trainer, seeds, metric
            )
        except (RuntimeError, ValueError) as err:  # e.g. a BatchNorm1d seeing a batch of one
            error = f"{type(err).__name__}: {err}"
        record = ArchitectureRecord(
            index=index,
            tokens=[list(tok) for tok in arch.tokens],
            params=arch.params,
            macs=arch.macs,
            activations=arch.activations,
            seeds=list(seeds),
            accuracies=accuracies,
            seconds=time.perf_counter() - start,
            error=error,
            extra={"rejected_draws": arch.rejected},
        )
        write_json(path, record.to_dict())
        counts["failed" if error else "trained"] += 1
        summary = f"acc {record.accuracy:.4f}" if record.ok else f"FAILED ({error})"
        log(f"architecture {index}: {len(arch.tokens)} layers, {arch.params:,} params, {arch.macs:,} MACs, {summary}, {record.seconds:.1f} s")
    return counts


UNLABELLED_OFFSET = 1_000_000  # sampler indices of untrained architectures, apart from the trained ones


def sample_unlabelled(sampler: ArchitectureSampler, count: int) -> list[ArchitectureRecord]:
    """``count`` sampled architectures that are not trained (no accuracy): their tokens and exact
    parameter count are enough supervision for the decoder and the parameter regressor.
    They use sampler indices from :data:`UNLABELLED_OFFSET` on, so they never repeat a trained one."""
    check_int("count", count, 0)
    records = []
    for index in range(UNLABELLED_OFFSET, UNLABELLED_OFFSET + count):
        arch = sampler.sample(index)
        records.append(ArchitectureRecord(index, [list(t) for t in arch.tokens], arch.params, arch.macs, arch.activations, [], [], 0.0))
    return records


def collect(
    results_dir: str | os.PathLike,
    dataset_file: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
    expected: int | None = None,
    unlabelled: Sequence[ArchitectureRecord] = (),
) -> dict[str, Any]:
    """Gather the ``arch_*.json`` of ``results_dir`` into one dataset file (JSON) and return it.

    With ``expected``, the dataset is architectures ``0 .. expected - 1`` and a missing one
    raises ``ValueError`` naming it (indices beyond are ignored); without, every file counts.
    Failed trainings are left out and listed in ``metadata["failed"]``. ``unlabelled``
    (from :func:`sample_unlabelled`) are stored apart, under ``"unlabelled"``.
    """
    folder = Path(results_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"results_dir {folder} does not exist; run the generate stage first")
    records = [ArchitectureRecord.from_dict(json.loads(p.read_text())) for p in sorted(folder.glob("arch_*.json"))]
    if expected is not None:
        records = [r for r in records if r.index < expected]
        done = {r.index for r in records}
        missing = [i for i in range(expected) if i not in done]
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
            raise ValueError(f"expected: {len(missing)} of the {expected} architectures are not trained yet: {shown}")
    good = [r for r in records if r.ok]
    failed = [r.index for r in records if not r.ok]
    if not good:
        raise ValueError(f"results_dir {folder} holds no successfully trained architecture")
    dataset = {
        "format": DATASET_FORMAT,
        "metadata": {**(metadata or {}), "count": len(good), "failed": failed, "unlabelled": len(unlabelled)},
        "architectures": [r.to_dict() for r in good],
        "unlabelled": [r.to_dict() for r in unlabelled],
    }
    write_json(Path(dataset_file), dataset)
    return dataset


def load_dataset(dataset_file: str | os.PathLike) -> tuple[list[ArchitectureRecord], dict[str, Any], list[ArchitectureRecord]]:
    """The trained records, the metadata and the unlabelled records of a file written by :func:`collect`."""
    path = Path(dataset_file)
    if not path.is_file():
        raise FileNotFoundError(f"dataset_file {path} does not exist; run the generate and collect stages first")
    data = json.loads(path.read_text())
    if data.get("format") != DATASET_FORMAT:
        raise ValueError(f"dataset_file {path} is not an archcomp dataset (format {data.get('format')!r})")
    unlabelled = [ArchitectureRecord.from_dict(r) for r in data.get("unlabelled", [])]
    return [ArchitectureRecord.from_dict(r) for r in data["architectures"]], data["metadata"], unlabelled


def tokens_of(record: ArchitectureRecord) -> list[Token]:
    return [Token(*row) for row in record.tokens]
