"""Costs of networks: measured on concrete modules (``count_cost``) and modelled as a function
of the channels each group keeps (``CostModel``: full, exact and expected cost)."""

from lightning_prune.core.cost.measure import CostReport, LayerCost, count_cost
from lightning_prune.core.cost.model import COSTS, CostModel

__all__ = ["COSTS", "CostModel", "CostReport", "LayerCost", "count_cost"]
