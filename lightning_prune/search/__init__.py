"""AdaNS: adaptive non-uniform sampling of compression hyperparameters (papers/002).

Plain Python + numpy/torch, no Hydra: the score (:mod:`.score`), the search space and its
box (:mod:`.space`), boundary characterisation (:mod:`.boundary`), Algorithm 1
(:mod:`.loop`), the samplers (:mod:`.samplers`), the whole search as one ask/tell object
(:mod:`.pipeline`), the Gaussian reconstruction of §VI (:mod:`.reconstruction`) and reports
(:mod:`.report`). ``hydra_plugins/adans_sweeper`` drives :class:`CompressionSearch` through
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

__all__ = [
    "AdaNS",
    "BoundaryCharacterization",
    "Box",
    "CompressionSearch",
    "Dimension",
    "GaussianReconstruction",
    "GaussianSampler",
    "GeneticSampler",
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
    "summary",
]
