"""The pruning methods as strategies for :class:`~lightning_prune.core.session.PruningSession`
(plain PyTorch; the Lightning callbacks in :mod:`lightning_prune.callbacks` wrap them)."""

from lightning_prune.core.method import Method
from lightning_prune.methods.bar import BarrierPenalty
from lightning_prune.methods.dirichlet import DirichletSwitches
from lightning_prune.methods.random import RandomChoice

__all__ = ["BarrierPenalty", "DirichletSwitches", "Method", "RandomChoice"]
