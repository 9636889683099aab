"""``python -m lightning_prune.bench`` (console script ``lightning-prune-bench``): one benchmark
job per Hydra job; ``-m`` sweeps tasks x methods x budgets x seeds with any launcher."""

from __future__ import annotations

import hydra
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
        print(report(bench_dir(cfg), "results-toy" if cfg.toy else "results"))
        return None
    return float(prune(cfg)["test_accuracy"])


if __name__ == "__main__":
    main()
