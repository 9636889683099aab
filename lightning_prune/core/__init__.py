"""The pruning core, with no Lightning import: the channel graph of a network, gates, costs,
budgets, allocation, physical removal of channels (surgery), export and saved files.

Data flows one way: network -> channel graph -> gates / budget -> keep-masks
``{group name: bool tensor}`` -> shrink -> export. The keep-masks are the one currency.
"""

from lightning_prune.core.trace import build_graph

__all__ = ["build_graph"]
