"""The benchmark suite: every method and Torch-Pruning's pruners on the same protocol
(benchmarks/PROTOCOL.md): ``python -m lightning_prune.bench`` / ``lightning-prune-bench``."""

from lightning_prune.bench.methods import METHODS
from lightning_prune.bench.report import report
from lightning_prune.bench.runner import BudgetExceeded, dense, prune, result_path

__all__ = ["METHODS", "BudgetExceeded", "dense", "prune", "report", "result_path"]
