"""Hydra entry point of AdaNS candidate jobs: ``python -m lightning_prune.search.evaluate``.

Run it as a multirun with the ``adans`` sweeper, e.g.::

    python -m lightning_prune.search.evaluate -m hparams_search=adans_resnet20 search.checkpoint=path/to/last.ckpt

Every job evaluates one compression vector ``search.x`` (see :mod:`lightning_prune.search.job`). Configs:
``conf/search/adans.yaml`` and the group ``hparams_search`` next to it.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from lightning_prune.configs import config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir("search")), config_name="adans")
def main(cfg: DictConfig) -> Any:
    # Imported here so that the work lives in an importable module: launchers that pickle this
    # function (joblib, submitit) then keep the per-process cache of lightning_prune.search.job.
    from lightning_prune.search.job import run

    return run(cfg)


if __name__ == "__main__":
    main()
