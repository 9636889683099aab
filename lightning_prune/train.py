"""Hydra entry point: ``python -m lightning_prune.train`` (console script ``lightning-prune``).

With no arguments it runs the main job of ``conf/train.yaml``. The task function returns the
metric named by ``optimized_metric`` so that Hydra sweepers can optimise it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_prune.configs import config_dir
from lightning_prune.cost import count_cost


def _instantiate_dict(section: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` of a ``{name: config}`` section."""
    if not section:
        return []
    return [instantiate(c) for c in section.values() if isinstance(c, DictConfig) and "_target_" in c]


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Datamodule, LightningModule and Trainer from a composed config."""
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model, num_classes=datamodule.num_classes)
    module = instantiate(
        cfg.module,
        net=net,
        num_classes=datamodule.num_classes,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )
    trainer = instantiate(
        cfg.trainer, callbacks=_instantiate_dict(cfg.get("callbacks")), logger=_instantiate_dict(cfg.get("logger")) or False
    )
    return datamodule, module, trainer


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (and test) as the config says; return the final metrics as floats."""
    start = time.perf_counter()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        ckpt = "best" if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path else None
        trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    cost = count_cost(module, torch.zeros(1, *datamodule.input_shape))
    metrics.update(macs=float(cost.macs), params=float(cost.params))
    if trainer.is_global_zero:
        ckpt_cb = trainer.checkpoint_callback
        lines = [
            "",
            "=== lightning-prune report ===",
            f"model          : {type(module.net).__name__ if hasattr(module, 'net') else type(module).__name__}"
            f" on {getattr(datamodule, 'name', type(datamodule).__name__)}",
        ]
        if "test/acc" in metrics:
            lines.append(f"test accuracy  : {100 * metrics['test/acc']:.2f}%  (error {100 * (1 - metrics['test/acc']):.2f}%)")
        lines += [
            f"MACs / image   : {cost.macs:,}",
            f"parameters     : {cost.params:,}",
            f"wall time      : {time.perf_counter() - start:.1f} s",
            f"checkpoint     : {ckpt_cb.best_model_path if ckpt_cb is not None and ckpt_cb.best_model_path else 'none saved'}",
            f"output folder  : {Path(trainer.default_root_dir).resolve()}",
        ]
        print("\n".join(lines), flush=True)
    return metrics


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run(cfg)
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise ValueError(f"optimized_metric: {name!r} was not logged; logged metrics are {sorted(metrics)}")
    return metrics[name]


if __name__ == "__main__":
    main()
