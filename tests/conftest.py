"""Shared fixtures. Real data is read from $LP_DATA_DIR (the README's test command sets it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from lightning_prune.configs import config_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    value = os.environ.get("LP_DATA_DIR")
    if not value or not (Path(value) / "MNIST" / "raw").is_dir():
        raise RuntimeError(
            "LP_DATA_DIR must point at the folder with MNIST/raw and cifar10-jpg.tar.gz "
            f"(got {value!r}); run the tests as the README says"
        )
    return Path(value)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the CIFAR-10 archive is decoded to: $LP_CACHE_DIR when set (kept between runs)."""
    value = os.environ.get("LP_CACHE_DIR")
    return Path(value) if value else tmp_path_factory.mktemp("lp-cache")


@pytest.fixture(autouse=True)
def _small_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``conf/train/train.yaml`` with ``overrides`` as ``python -m lightning_prune.train`` would,
    with the Hydra runtime set so that ``${hydra:...}`` interpolations resolve."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir("train")), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg
