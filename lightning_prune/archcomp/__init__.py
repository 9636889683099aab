"""Architecture Compression (Ashok, "Architecture Compression", arXiv:1902.03326, 2019):
compress a network by gradient descent in a learned continuous embedding of its architecture.

- :mod:`tokens`: ``o(A)`` (:func:`to_tokens`) and ``o⁻¹`` (:func:`build`, :func:`plan`) between
  feed-forward CNNs and ``[t, k, o, s, p]`` token sequences.
- :mod:`sampler`: random architectures (Appendix 9).
- :mod:`generate`: training them (several seeds) into a dataset, resumably and in parallel.
- :mod:`compressor`: the encoder/decoder/regressor LightningModule; :mod:`data` its datamodule.
- :mod:`compress`: gradient steps on the embedding, decode, rebuild.
- ``python -m lightning_prune.archcomp``: the Hydra entry point (configs ``conf/archcomp/archcomp.yaml``).
"""

from lightning_prune.archcomp.compress import CompressionResult, CompressionStep, compress
from lightning_prune.archcomp.compressor import ArchitectureCompressor
from lightning_prune.archcomp.data import ArchitectureDataModule, ArchitectureDataset
from lightning_prune.archcomp.generate import (
    ArchitectureRecord,
    InMemoryDataModule,
    collect,
    generate,
    load_dataset,
    sample_unlabelled,
    train_accuracy,
)
from lightning_prune.archcomp.models import ConvK
from lightning_prune.archcomp.sampler import ArchitectureSampler, SampledArchitecture
from lightning_prune.archcomp.tokens import (
    InvalidArchitecture,
    LayerType,
    Plan,
    Token,
    build,
    describe,
    param_count,
    plan,
    to_tokens,
)

__all__ = [
    "ArchitectureCompressor",
    "ArchitectureDataModule",
    "ArchitectureDataset",
    "ArchitectureRecord",
    "ArchitectureSampler",
    "CompressionResult",
    "CompressionStep",
    "ConvK",
    "InMemoryDataModule",
    "InvalidArchitecture",
    "LayerType",
    "Plan",
    "SampledArchitecture",
    "Token",
    "build",
    "collect",
    "compress",
    "describe",
    "generate",
    "load_dataset",
    "param_count",
    "plan",
    "sample_unlabelled",
    "to_tokens",
    "train_accuracy",
]
