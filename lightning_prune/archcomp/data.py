"""The architecture dataset as a LightningDataModule for training the compressor."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_prune._checks import check_int
from lightning_prune.archcomp.generate import ArchitectureRecord, load_dataset
from lightning_prune.archcomp.tokens import pad_sequences


class ArchitectureDataset(Dataset):
    """Records as fixed-size samples: zero-padded tokens (max_len, 5), mask, accuracy, params
    (records without accuracies, i.e. unlabelled ones, get ``accuracy_weight`` 0)."""

    def __init__(self, records: Sequence[ArchitectureRecord], max_len: int) -> None:
        too_long = [r.index for r in records if len(r.tokens) > max_len]
        if too_long:
            raise ValueError(f"max_len={max_len} is shorter than architectures {too_long[:10]}; raise max_len")
        self.records = list(records)
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        record = self.records[i]
        return make_sample(record.tokens, self.max_len, record.accuracy if record.ok else None, record.params)


def make_sample(tokens: Sequence[Sequence[int]], max_len: int, accuracy: float | None, params: int) -> dict[str, Tensor]:
    """One padded sample; ``accuracy=None`` marks an unknown accuracy (``accuracy_weight`` 0)."""
    padded, mask = pad_sequences([tokens], max_len)
    return {
        "tokens": padded[0],
        "mask": mask[0],
        "accuracy": torch.tensor(0.0 if accuracy is None else float(accuracy)),
        "accuracy_weight": torch.tensor(0.0 if accuracy is None else 1.0),
        "params": torch.tensor(float(params)),
    }


class ArchitectureDataModule(L.LightningDataModule):
    """Train / held-out split of a dataset file written by :func:`generate.collect`.

    The split is a seeded permutation (``val_fraction`` of the trained architectures are held
    out). With ``use_unlabelled`` the file's untrained architectures join the training split
    (they supervise the decoder and the parameter regressor, not the accuracy regressor); the
    held-out split is trained architectures only. :meth:`statistics` gives the normalisation
    the compressor needs, computed on the training split: ``param_mean``, ``param_std`` (of
    log parameters) and ``param_floor``, and ``max_len``.
    """

    def __init__(
        self,
        dataset_file: str | os.PathLike,
        max_len: int = 32,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        use_unlabelled: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        check_int("max_len", max_len)
        check_int("batch_size", batch_size)
        self.dataset_file = dataset_file
        self.max_len = max_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.use_unlabelled = use_unlabelled
        self.train_records: list[ArchitectureRecord] | None = None
        self.val_records: list[ArchitectureRecord] = []
        self.metadata: dict[str, Any] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_records is not None:
            return
        records, self.metadata, unlabelled = load_dataset(self.dataset_file)
        perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = int(round(self.val_fraction * len(records)))
        self.val_records = [records[i] for i in perm[:n_val]]
        self.train_records = [records[i] for i in perm[n_val:]] + (unlabelled if self.use_unlabelled else [])
        if len(self.train_records) < 2:
            raise ValueError(f"dataset_file {self.dataset_file}: {len(self.train_records)} training architectures are too few")

    def statistics(self) -> dict[str, Any]:
        """Normalisation constants from the training split (keyword arguments of the compressor)."""
        self.setup()
        records = self.train_records or []
        logs = [math.log(max(1, r.params)) for r in records]
        mean = sum(logs) / len(logs)
        std = math.sqrt(sum((v - mean) ** 2 for v in logs) / len(logs)) or 1.0
        return {
            "max_len": self.max_len,
            "param_mean": mean,
            "param_std": std,
            "param_floor": (min(logs) - mean) / std - 1.0,
        }

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            ArchitectureDataset(self.train_records or [], self.max_len),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(self.train_records or []) > self.batch_size,  # no batch of one for BatchNorm
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        if not self.val_records:
            return []  # type: ignore[return-value]
        return DataLoader(ArchitectureDataset(self.val_records, self.max_len), batch_size=256, num_workers=self.num_workers)
