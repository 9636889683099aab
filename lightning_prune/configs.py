"""Where the shipped Hydra configs live.

In a source checkout (editable install) they are the top-level ``conf/`` folder; a built wheel
carries the same files as ``lightning_prune/conf`` (see ``[tool.hatch.build]`` in
pyproject.toml). Each entry point has its own config root, holding its root config and only the
groups it uses; groups that two entry points use live in ``shared/``, which every root adds to
its search path (``hydra.searchpath: [file://${lightning_prune.config_dir:shared}]``)::

    conf/
      train/     train.yaml    python -m lightning_prune.train (console script lightning-prune):
                               callbacks, logger, pruning (+ pruning/hard_pruning), budget,
                               experiment, hparams_search (basic sweeper grids)
      search/    adans.yaml    python -m lightning_prune.search.evaluate (AdaNS): hparams_search
      archcomp/  archcomp.yaml python -m lightning_prune.archcomp: sampler, compressor
                               (+ compressor/optimizer, compressor/scheduler), experiment
      bench/     bench.yaml    python -m lightning_prune.bench (lightning-prune-bench): task, method
      shared/                  data, model, optimizer, scheduler, trainer, paths, hydra

Importing this module registers the OmegaConf resolver ``lightning_prune.config_dir`` that the
root configs use for that search path (``${lightning_prune.config_dir:shared}`` is the absolute
path of ``shared/``).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

# entry point config root -> its root config name
ROOTS = {"train": "train", "search": "adans", "archcomp": "archcomp", "bench": "bench"}
SHARED = "shared"
RESOLVER = "lightning_prune.config_dir"


def config_dir(root: str | None = None) -> Path:
    """Absolute path of the config folder (holding every root), or of one of its folders:
    ``root`` is an entry point's config root (``"train"``, ``"search"``, ``"archcomp"``, ``"bench"``; see
    ``ROOTS``) or ``"shared"``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train" / "train.yaml").is_file():
            break
    else:
        raise FileNotFoundError(
            f"lightning-prune's configs were not found in {here / 'conf'} (wheel) nor {here.parent / 'conf'} "
            "(source checkout); reinstall the package"
        )
    if root is None:
        return candidate
    if root not in (*ROOTS, SHARED):
        raise ValueError(f"root must be one of {(*ROOTS, SHARED)} or None, got {root!r}")
    return candidate / root


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, lambda name: str(config_dir(name)))
