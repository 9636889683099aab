"""``python -m lightning_prune.bench`` (console script ``lightning-prune-bench``): one benchmark
job per Hydra job; ``-m`` sweeps tasks x methods x budgets x seeds with any launcher."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from lightning_prune.bench.report import report
from lightning_prune.bench.runner import bench_dir, dense, prune
from lightning_prune.configs import config_dir

STAGES = ("dense", "prune", "report")


@hydra.main(version_base="1.3", config_path=str(config_dir("bench")), config_name="bench")
def main(cfg: DictConfig) -> float | None:
    if cfg.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {cfg.stage!r}")
    if cfg.stage == "dense":
        return float(dense(cfg)["test_accuracy"])
    if cfg.stage == "report":
        readme = Path(to_absolute_path(cfg.readme)) if cfg.readme else None
        print(report(bench_dir(cfg), "results-toy" if cfg.toy else "results", readme=readme))
        return None
    return float(prune(cfg)["test_accuracy"])


if __name__ == "__main__":
    main()
