"""Hydra sweeper plugin ``adans``: AdaNS (Javaheripi, Samragh, Javidi and Koushanfar, "AdaNS:
Adaptive Non-Uniform Sampling for Automated Design of Compact DNNs", IEEE JSTSP 2020,
doi:10.1109/JSTSP.2020.2992384) through any Hydra launcher.

Select it with ``hydra/sweeper=adans`` (the ``conf/search/hparams_search/adans_*.yaml`` files do).
The search itself lives in :mod:`lightning_prune.search`; this package only launches batches,
reads results back and saves the state in the sweep folder.
"""
