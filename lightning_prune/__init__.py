"""lightning-prune: make networks physically smaller under an explicit budget, from Lightning callbacks."""

from lightning_prune.cost import CostReport, count_cost

__version__ = "0.1.0"

__all__ = ["CostReport", "count_cost", "__version__"]
