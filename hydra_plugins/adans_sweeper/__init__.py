"""Hydra sweeper plugin ``adans``: AdaNS (papers/002) through any Hydra launcher.

Select it with ``hydra/sweeper=adans`` (the ``conf/hparams_search/adans_*.yaml`` files do).
The search itself lives in :mod:`lightning_prune.search`; this package only launches batches,
reads results back and saves the state in the sweep folder.
"""
