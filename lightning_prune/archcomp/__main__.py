"""``python -m lightning_prune.archcomp``: Architecture Compression (Ashok, "Architecture
Compression", arXiv:1902.03326, 2019) with Hydra.

    python -m lightning_prune.archcomp experiment=archcomp_mnist_cpu                  # all stages
    python -m lightning_prune.archcomp -m experiment=archcomp_mnist_cpu stage=generate generate.index='range(0,200)'
    python -m lightning_prune.archcomp experiment=archcomp_mnist_cpu stage=collect
    python -m lightning_prune.archcomp experiment=archcomp_mnist_cpu stage=fit
    python -m lightning_prune.archcomp experiment=archcomp_mnist_cpu stage=compress
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from lightning_prune.archcomp.pipeline import run
from lightning_prune.configs import config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir("archcomp")), config_name="archcomp")
def main(cfg: DictConfig) -> Any:
    run(cfg)


if __name__ == "__main__":
    main()
