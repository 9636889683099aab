"""The Hydra task of ``python -m lightning_prune.archcomp``: the four stages of Architecture
Compression (Ashok, "Architecture Compression", arXiv:1902.03326, 2019).

``stage=generate`` trains sampled architectures (one result file each, resumable, parallel
through ``-m generate.index='range(0,N)'`` or ``-m generate.chunk='range(0,K)' generate.chunks=K``
with any Hydra launcher); ``stage=collect`` writes the dataset file; ``stage=fit`` trains the
compressor; ``stage=compress`` compresses the reference network (CONV-k) and trains the original
and the compressed network with the same recipe, reporting the Ashok 2019 Table 1 columns; the
trained compressed network (the seed with the best accuracy) is saved to ``cfg.compressed_file``
with :func:`lightning_prune.save_pruned` (``lightning_prune.load_pruned`` rebuilds it from its tokens).
``stage=all`` runs the four in turn. All files of one pipeline live under ``cfg.dir``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_prune.archcomp.compress import architecture, compress
from lightning_prune.archcomp.compressor import ArchitectureCompressor
from lightning_prune.archcomp.data import ArchitectureDataModule
from lightning_prune.archcomp.generate import (
    InMemoryDataModule,
    collect,
    generate,
    sample_unlabelled,
    train_accuracy,
    write_json,
)
from lightning_prune.archcomp.sampler import ArchitectureSampler
from lightning_prune.archcomp.tokens import build, describe, to_tokens
from lightning_prune.core.cost import count_cost
from lightning_prune.core.export import save_pruned

log = logging.getLogger("lightning_prune.archcomp")
STAGES = ("generate", "collect", "fit", "compress", "all")


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hundreds of short fits: keep Lightning's per-fit banner lines out of the log."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _datamodule(cfg: DictConfig, in_memory: bool = False) -> L.LightningDataModule:
    datamodule = instantiate(cfg.data)
    return InMemoryDataModule(datamodule) if in_memory else datamodule


def sampler_from(cfg: DictConfig, datamodule: L.LightningDataModule) -> ArchitectureSampler:
    return instantiate(cfg.sampler, input_shape=list(datamodule.input_shape), num_classes=datamodule.num_classes)


def _factories(
    cfg: DictConfig, datamodule: L.LightningDataModule, trainer_overrides: DictConfig, root: Path
) -> tuple[Callable[[nn.Module], L.LightningModule], Callable[[], L.Trainer]]:
    """``make_module(net)`` and ``make_trainer()`` for training candidate networks."""
    trainer_cfg = OmegaConf.merge(cfg.trainer, trainer_overrides)

    def make_module(net: nn.Module) -> L.LightningModule:
        return instantiate(
            cfg.module,
            net=net,
            num_classes=datamodule.num_classes,
            optimizer=instantiate(cfg.optimizer),
            scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        )

    def make_trainer() -> L.Trainer:
        return instantiate(
            trainer_cfg,
            callbacks=[],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=str(root),
        )

    return make_module, make_trainer


def indices(cfg: DictConfig) -> list[int]:
    """The architecture indices this job trains: ``generate.index``, a ``chunk``, or all."""
    gen = cfg.generate
    total = int(gen.num_architectures)
    if gen.get("index") is not None and gen.get("chunk") is not None:
        raise ValueError("generate.index and generate.chunk are exclusive; set one")
    if gen.get("index") is not None:
        if not 0 <= int(gen.index) < total:
            raise ValueError(f"generate.index must be in [0, {total}), got {gen.index}")
        return [int(gen.index)]
    if gen.get("chunk") is not None:
        chunks = int(gen.chunks)
        if not 0 <= int(gen.chunk) < chunks:
            raise ValueError(f"generate.chunk must be in [0, generate.chunks={chunks}), got {gen.chunk}")
        return list(range(int(gen.chunk), total, chunks))
    return list(range(total))


def run_generate(cfg: DictConfig) -> dict[str, int]:
    datamodule = _datamodule(cfg, cfg.generate.in_memory)
    sampler = sampler_from(cfg, datamodule)
    make_module, make_trainer = _factories(cfg, datamodule, cfg.generate.trainer, Path(cfg.results_dir))
    todo = indices(cfg)
    log.info(f"generate: {len(todo)} architecture(s) into {cfg.results_dir}, seeds {list(cfg.generate.seeds)}")
    with _quiet_lightning():
        counts = generate(
            sampler,
            todo,
            cfg.results_dir,
            datamodule,
            make_module,
            make_trainer,
            seeds=list(cfg.generate.seeds),
            metric=cfg.generate.metric,
            log=log.info,
        )
    log.info(f"generate: {counts}")
    return counts


def run_collect(cfg: DictConfig) -> dict[str, Any]:
    metadata = {
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
        "seeds": list(cfg.generate.seeds),
        "trainer": OmegaConf.to_container(cfg.generate.trainer, resolve=True),
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
    }
    unlabelled = []
    if cfg.generate.unlabelled:
        start = time.perf_counter()
        unlabelled = sample_unlabelled(sampler_from(cfg, instantiate(cfg.data)), int(cfg.generate.unlabelled))
        log.info(f"collect: sampled {len(unlabelled)} untrained architectures in {time.perf_counter() - start:.0f} s")
    dataset = collect(
        cfg.results_dir, cfg.dataset_file, metadata=metadata, expected=int(cfg.generate.num_architectures), unlabelled=unlabelled
    )
    accs = [r["accuracy"] for r in dataset["architectures"]]
    log.info(
        f"collect: {len(accs)} architectures (failed: {len(dataset['metadata']['failed'])}) -> {cfg.dataset_file}; "
        f"accuracy min/mean/max {min(accs):.4f}/{sum(accs) / len(accs):.4f}/{max(accs):.4f}"
    )
    return dataset["metadata"]


def run_fit(cfg: DictConfig) -> dict[str, float]:
    datamodule: ArchitectureDataModule = instantiate(cfg.fit.datamodule)
    compressor: ArchitectureCompressor = instantiate(cfg.compressor, **datamodule.statistics())
    trainer: L.Trainer = instantiate(cfg.fit.trainer)
    start = time.perf_counter()
    trainer.fit(compressor, datamodule=datamodule)
    seconds = time.perf_counter() - start
    Path(cfg.compressor_ckpt).parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(cfg.compressor_ckpt)
    metrics = {"seconds": seconds, "steps": trainer.global_step, "train_architectures": len(datamodule.train_records or [])}
    metrics["val_architectures"] = len(datamodule.val_records)
    if datamodule.val_records:
        (result,) = trainer.validate(compressor, datamodule=datamodule, verbose=False)
        metrics.update({k: float(v) for k, v in result.items()})
    write_json(Path(cfg.dir) / "compressor_metrics.json", metrics)
    log.info("fit: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return metrics


def run_compress(cfg: DictConfig) -> dict[str, Any]:
    c = cfg.compress
    datamodule = _datamodule(cfg, c.in_memory)
    shape = list(datamodule.input_shape)
    network_cfg = c.network
    tokens = to_tokens(instantiate(network_cfg, num_classes=datamodule.num_classes, input_shape=shape), shape)
    make_module, make_trainer = _factories(cfg, datamodule, c.trainer, Path(cfg.dir) / "final")
    seeds = list(c.seeds)

    def measure(net_factory: Callable[[], nn.Module]) -> tuple[list[float], int]:
        with _quiet_lightning():
            accs = train_accuracy(net_factory, datamodule, make_module, make_trainer, seeds, cfg.generate.metric)
        return accs, count_cost(net_factory(), torch.zeros(1, *shape)).params

    def original() -> nn.Module:
        return instantiate(network_cfg, num_classes=datamodule.num_classes, input_shape=shape)

    start = time.perf_counter()
    trained_original = None
    if c.refit_steps:  # the re-fit uses the original's measured accuracy: train it first
        trained_original = measure(original)
    compressor = ArchitectureCompressor.load_from_checkpoint(cfg.compressor_ckpt, map_location="cpu")
    L.seed_everything(cfg.seed, verbose=False)  # the re-fit batches are shuffled
    refit_data = instantiate(cfg.fit.datamodule).train_dataloader() if c.refit_steps else None
    result = compress(
        compressor,
        tokens,
        shape,
        datamodule.num_classes,
        accuracy_target=c.accuracy_target,
        params_target=c.params_target,
        lam=c.lam,
        steps=c.steps,
        lr=c.lr,
        original_accuracy=sum(trained_original[0]) / len(trained_original[0]) if trained_original else None,
        refit_data=refit_data,
        refit_steps=c.refit_steps,
        refit_every=c.refit_every,
        refit_lr=c.refit_lr,
    )
    orig_accs, orig_params = trained_original or measure(original)
    log.info(f"compress: original {len(tokens)} layers, {orig_params:,} params, accuracy {orig_accs}")
    log.info(f"compress: chosen step {result.step}; compressed architecture:\n{describe(result.tokens)}")
    trained: list[nn.Module] = []  # train_accuracy builds one network per seed, in order

    def compressed() -> nn.Module:
        trained.append(build(result.tokens, shape))
        return trained[-1]

    comp_accs, comp_params = measure(compressed)
    orig_acc, comp_acc = sum(orig_accs) / len(orig_accs), sum(comp_accs) / len(comp_accs)
    best = max(range(len(comp_accs)), key=comp_accs.__getitem__)
    Path(cfg.compressed_file).parent.mkdir(parents=True, exist_ok=True)
    save_pruned(trained[best].cpu(), cfg.compressed_file, architecture=architecture(result.tokens, shape))
    report = {
        "network": OmegaConf.to_container(network_cfg, resolve=True),
        "data": datamodule.name if hasattr(datamodule, "name") else type(datamodule).__name__,
        "seeds": seeds,
        "original": {"tokens": [list(t) for t in tokens], "params": orig_params, "accuracies": orig_accs, "accuracy": orig_acc},
        "compressed": {
            "tokens": [list(t) for t in result.tokens],
            "params": comp_params,
            "accuracies": comp_accs,
            "accuracy": comp_acc,
            "step": result.step,
            "predicted_accuracy": result.predicted_accuracy,
            "predicted_params": result.predicted_params,
            "repairs": list(result.repairs),
            "file": str(cfg.compressed_file),
            "file_seed": seeds[best],
        },
        "step0_reconstructs_original": result.trajectory[0].tokens == tuple(tokens),
        "trajectory": [
            {
                "step": s.step,
                "loss": s.loss,
                "predicted_accuracy": s.predicted_accuracy,
                "predicted_params": s.predicted_params,
                "params": s.params,
                "layers": len(s.tokens) if s.tokens else None,
                "repairs": len(s.repairs),
                "error": s.error,
            }
            for s in result.trajectory
        ],
        "delta_accuracy": comp_acc - orig_acc,
        "compression": orig_params / comp_params,
        "seconds": time.perf_counter() - start,
    }
    write_json(Path(cfg.report_file), report)
    log.info(
        "\n=== Architecture compression (Ashok 2019, Table 1 columns) ===\n"
        f"model       acc.     #params   delta acc.   compr.\n"
        f"original    {100 * orig_acc:6.2f}%  {orig_params:>9,}\n"
        f"compressed  {100 * comp_acc:6.2f}%  {comp_params:>9,}   {100 * (comp_acc - orig_acc):+6.2f}%    {orig_params / comp_params:6.2f}x\n"
        f"report: {cfg.report_file}\n"
        f"compressed network (seed {seeds[best]}): {cfg.compressed_file}  (lightning_prune.load_pruned)"
    )
    return report


def run(cfg: DictConfig) -> Any:
    """Run ``cfg.stage``."""
    if cfg.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {cfg.stage!r}")
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    if cfg.stage == "generate":
        return run_generate(cfg)
    if cfg.stage == "collect":
        return run_collect(cfg)
    if cfg.stage == "fit":
        L.seed_everything(cfg.seed, verbose=False)
        return run_fit(cfg)
    if cfg.stage == "compress":
        return run_compress(cfg)
    run_generate(cfg)
    run_collect(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    run_fit(cfg)
    return run_compress(cfg)
