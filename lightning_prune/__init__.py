"""lightning-prune: make networks physically smaller under an explicit budget, from Lightning callbacks."""

from lightning_prune.cost import CostModel, CostReport, count_cost
from lightning_prune.export import export, load_checkpoint, load_pruned, save_pruned
from lightning_prune.folding import shrink_as_masked
from lightning_prune.gating import GateSet, attach_gates, attached_gates
from lightning_prune.graph import ChannelGraph, ChannelGroup, build_graph, random_masks
from lightning_prune.surgery import enable_pruned_loading, pruning_history, replay, shrink

__version__ = "0.1.0"

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "CostModel",
    "CostReport",
    "GateSet",
    "__version__",
    "attach_gates",
    "attached_gates",
    "build_graph",
    "count_cost",
    "enable_pruned_loading",
    "export",
    "load_checkpoint",
    "load_pruned",
    "pruning_history",
    "random_masks",
    "replay",
    "save_pruned",
    "shrink",
    "shrink_as_masked",
]
