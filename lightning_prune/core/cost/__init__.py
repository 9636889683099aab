"""Costs of networks: measured on concrete modules (``count_cost``) and modelled as a function
of the channels each group keeps (``CostModel``: full, exact and expected cost); latency,
measured per device (:mod:`lightning_prune.core.cost.latency_measure`) and modelled the same way
(``LatencyTable``)."""

from lightning_prune.core.cost.measure import CostReport, LayerCost, count_cost
from lightning_prune.core.cost.latency import LATENCY, LatencyKey, LatencyTable, LayerTiming
from lightning_prune.core.cost.model import BUDGET_COSTS, COSTS, CostModel

__all__ = [
    "BUDGET_COSTS", "COSTS", "CostModel", "CostReport", "LATENCY", "LatencyKey", "LatencyTable", "LayerCost", "LayerTiming",
    "count_cost",
]
