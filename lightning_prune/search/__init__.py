"""AdaNS: adaptive non-uniform sampling of compression hyperparameters (Javaheripi, Samragh,
Javidi and Koushanfar, "AdaNS: Adaptive Non-Uniform Sampling for Automated Design of Compact
DNNs", IEEE JSTSP 2020, doi:10.1109/JSTSP.2020.2992384).

Plain Python + numpy/torch, no Hydra: the score (:mod:`.score`), the search space and its
box (:mod:`.space`), boundary characterisation (:mod:`.boundary`), Algorithm 1
(:mod:`.loop`), the samplers (:mod:`.samplers`), the whole search as one ask/tell object
(:mod:`.pipeline`), the Gaussian reconstruction of Sec. VI (:mod:`.reconstruction`) and reports
(:mod:`.report`), the compression spaces of Appendix A (:mod:`.spaces`) and the candidate
job (:mod:`.job`, entry point :mod:`.evaluate`). ``hydra_plugins/adans_sweeper`` drives :class:`CompressionSearch` through
any Hydra launcher.
"""

from lightning_prune.search.boundary import BoundaryCharacterization, characterize
from lightning_prune.search.loop import AdaNS, proximity
from lightning_prune.search.pipeline import CompressionSearch
from lightning_prune.search.reconstruction import GaussianReconstruction, reconstruction_error
from lightning_prune.search.report import plot_progress, summary
from lightning_prune.search.samplers import (
    SAMPLERS,
    GaussianSampler,
    GeneticSampler,
    Sampler,
    UniformSampler,
    ZoomSampler,
    make_sampler,
)
from lightning_prune.search.score import Scorer, accuracy_penalty, score
from lightning_prune.search.space import Box, Dimension, SearchSpace, integer_setting
from lightning_prune.search.spaces import KINDS, CompressionSpace, sparse_cost

__all__ = [
    "AdaNS",
    "BoundaryCharacterization",
    "Box",
    "CompressionSearch",
    "CompressionSpace",
    "Dimension",
    "GaussianReconstruction",
    "GaussianSampler",
    "GeneticSampler",
    "KINDS",
    "SAMPLERS",
    "Sampler",
    "Scorer",
    "SearchSpace",
    "UniformSampler",
    "ZoomSampler",
    "accuracy_penalty",
    "characterize",
    "integer_setting",
    "make_sampler",
    "plot_progress",
    "proximity",
    "reconstruction_error",
    "score",
    "sparse_cost",
    "summary",
]
