"""Costs of networks: measured on concrete modules (``count_cost``)."""

from lightning_prune.cost.measure import CostReport, LayerCost, count_cost

__all__ = ["CostReport", "LayerCost", "count_cost"]
