"""lightning-prune: make networks physically smaller under an explicit budget, from Lightning callbacks."""

from lightning_prune.core.budget import Budget, SigmoidalTransition
from lightning_prune.core.cost import CostModel, CostReport, LatencyTable, count_cost
from lightning_prune.core.cost.latency_measure import measure_latency
from lightning_prune.core.deploy import export_onnx, export_program
from lightning_prune.core.export import export, load_checkpoint, load_pruned, save_pruned
from lightning_prune.core.folding import shrink_as_masked
from lightning_prune.core.gating import GateSet, attach_gates, attached_gates
from lightning_prune.core.graph import ChannelGraph, ChannelGroup, random_masks
from lightning_prune.core.inference import fold_batchnorm
from lightning_prune.core.session import PruningSession, session_of
from lightning_prune.core.surgery import enable_pruned_loading, pruning_history, replay, shrink
from lightning_prune.core.trace import build_graph

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "ChannelGraph",
    "ChannelGroup",
    "CostModel",
    "CostReport",
    "GateSet",
    "LatencyTable",
    "PruningSession",
    "SigmoidalTransition",
    "__version__",
    "attach_gates",
    "attached_gates",
    "build_graph",
    "count_cost",
    "enable_pruned_loading",
    "export",
    "export_onnx",
    "export_program",
    "fold_batchnorm",
    "load_checkpoint",
    "load_pruned",
    "measure_latency",
    "pruning_history",
    "random_masks",
    "replay",
    "save_pruned",
    "session_of",
    "shrink",
    "shrink_as_masked",
]
