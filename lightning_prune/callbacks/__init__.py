"""Lightning callbacks that prune any LightningModule under a budget."""

from lightning_prune.callbacks.annealing import SigmoidalBudgetAnnealing
from lightning_prune.callbacks.bar import BudgetAwareRegularization
from lightning_prune.callbacks.dirichlet import DirichletImportance
from lightning_prune.callbacks.gated import GatedPruning
from lightning_prune.callbacks.hard_pruning import HardPruning
from lightning_prune.callbacks.random_pruning import RandomPruning

__all__ = ["BudgetAwareRegularization", "DirichletImportance", "GatedPruning", "HardPruning", "RandomPruning", "SigmoidalBudgetAnnealing"]
