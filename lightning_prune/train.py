"""Hydra entry point: ``python -m lightning_prune.train`` (console script ``lightning-prune``).

With no arguments it runs the main job of ``conf/train/train.yaml``. The task function returns the
metric named by ``optimized_metric`` so that Hydra sweepers can optimise it.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_prune.callbacks import GatedPruning, HardPruning
from lightning_prune.configs import config_dir
from lightning_prune.core.cost import count_cost
from lightning_prune.core.cost.measure import output_widths
from lightning_prune.core.export import export, read_torch_file, save_pruned
from lightning_prune.core.timing import median_latency


def _instantiate_dict(section: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` of a ``{name: config}`` section."""
    if not section:
        return []
    return [instantiate(c) for c in section.values() if isinstance(c, DictConfig) and "_target_" in c]


def load_network_weights(net: torch.nn.Module, path: str | Path, argument: str = "init_from") -> None:
    """Load trained weights into ``net`` (the network, not the LightningModule) from ``path``:
    a Lightning checkpoint of ``ImageClassifier`` (its ``state_dict`` entries under ``net.``) or
    a plain ``state_dict`` of the network. The shapes must match (a dense network's weights).
    Errors name ``argument``, the option that gave ``path``."""
    path = Path(path)
    state = read_torch_file(path, "a checkpoint or state_dict file", prefix=f"{argument}: ")
    if not isinstance(state, dict):
        raise ValueError(f"{argument}: {path} holds a {type(state).__name__}, not a checkpoint or state_dict")
    if isinstance(state.get("state_dict"), dict):
        state = {k[len("net."):]: v for k, v in state["state_dict"].items() if k.startswith("net.")}
        if not state:
            raise ValueError(f"{argument}: the checkpoint {path} has no 'net.' weights (not an ImageClassifier checkpoint)")
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{argument}: the weights in {path} do not fit {type(net).__name__}: {error}") from error


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Datamodule, LightningModule and Trainer from a composed config."""
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model, num_classes=datamodule.num_classes)
    module = instantiate(
        cfg.module,
        net=net,
        num_classes=datamodule.num_classes,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )
    callbacks = _instantiate_dict(cfg.get("callbacks")) + _instantiate_dict(cfg.get("pruning"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=_instantiate_dict(cfg.get("logger")) or False)
    return datamodule, module, trainer


def pretrain(cfg: DictConfig, module: L.LightningModule, datamodule: L.LightningDataModule) -> str:
    """``pretrain_epochs`` > 0: train the dense network in a fit of its own (the configured
    trainer, optimizer and scheduler, no callbacks, logs beside the main fit's), so the pruning
    callbacks of the main fit start from a trained network and distil from it. Skipped when
    resuming (``ckpt_path``: the checkpoint holds the weights and the teacher). Returns what the
    report says about it ("" when nothing was trained)."""
    epochs = cfg.get("pretrain_epochs") or 0
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"pretrain_epochs must be an integer >= 0, got {epochs!r}")
    if epochs == 0 or cfg.get("ckpt_path"):
        return ""
    trainer = instantiate(cfg.trainer, max_epochs=epochs, callbacks=[], enable_checkpointing=False,
                          logger=_instantiate_dict(cfg.get("logger")) or False)
    trainer.fit(module, datamodule=datamodule)
    if cfg.get("test"):
        trainer.test(module, datamodule=datamodule, verbose=False)
        accuracy = trainer.callback_metrics.get("test/acc")
        if accuracy is not None:
            return f"{100 * float(accuracy):.2f}% test accuracy after {epochs} epoch(s) of training, before pruning"
    return f"trained for {epochs} epoch(s) before pruning"


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (and test) as the config says; return the final metrics as floats (plus ``macs``
    and ``params`` of the final network). With a pruning method configured, the pruned
    network is exported to ``<output_dir>/pruned_model.pt`` (``lightning_prune.load_pruned``)."""
    start = time.perf_counter()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build(cfg)
    metric = cfg.get("optimized_metric")
    if isinstance(metric, str) and metric.startswith("val/") and getattr(datamodule, "val_size", None) == 0:
        raise ValueError(  # found now, not after the training
            f"optimized_metric: {metric!r} needs a validation split, but the data module keeps none "
            "(data.val_size=0); set optimized_metric=test/acc (or null), or keep a validation split"
        )
    if cfg.get("init_from"):
        load_network_weights(module.net, cfg.init_from)
    for callback in trainer.callbacks:
        if isinstance(callback, HardPruning):  # a schedule that never prunes fails before any training
            callback.check_schedule(trainer)
    pretrained = pretrain(cfg, module, datamodule)
    example = torch.zeros(1, *datamodule.input_shape)
    pruned = any(isinstance(c, GatedPruning) for c in trainer.callbacks)
    dense = copy.deepcopy(module.net).cpu() if pruned else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        ckpt = "best" if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path else None
        trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    unpruned = [c for c in trainer.callbacks if isinstance(c, HardPruning) and c.pruned_at is None]
    if unpruned and not trainer.fast_dev_run:
        raise RuntimeError(
            f"the run ended in epoch {trainer.current_epoch} before hard pruning at epoch {unpruned[0].at_epoch} "
            "(stopped early?): the network is not pruned, so no pruned_model.pt was written"
        )
    if unpruned:  # a fast_dev_run smoke test: it never reaches hard pruning
        dense = None
    final = (export(module) if dense is not None else module.net).cpu()
    cost = count_cost(final, example)
    metrics.update(macs=float(cost.macs), params=float(cost.params))
    if not trainer.is_global_zero:
        return metrics
    out_dir = Path(trainer.default_root_dir).resolve()
    lines = ["", "=== lightning-prune report ===", f"model          : {type(final).__name__} on {getattr(datamodule, 'name', '')}"]
    if "test/acc" in metrics:
        lines.append(f"test accuracy  : {100 * metrics['test/acc']:.2f}%  (error {100 * (1 - metrics['test/acc']):.2f}%)")
    if pretrained:
        lines.append(f"dense network  : {pretrained}")
    if dense is not None:
        before = count_cost(dense, example)
        path = out_dir / "pruned_model.pt"
        save_pruned(final, path, architecture={"_target_": cfg.model._target_, **_kwargs(cfg.model), "num_classes": datamodule.num_classes})
        latency = median_latency({"dense": export(dense, inference=True, example_input=example),
                                  "pruned": export(final, inference=True, example_input=example)}, example)
        widths = [f"{n} {w}" for n, w in output_widths(final).items()]
        lines += [
            f"MACs / image   : {before.macs:,} -> {cost.macs:,}  ({before.macs / max(cost.macs, 1):.1f}x fewer)",
            f"parameters     : {before.params:,} -> {cost.params:,}",
            f"widths         : {', '.join(widths)}",
            f"CPU speedup    : {latency['dense'] / latency['pruned']:.2f}x  (batch 1, inference export of both, dense / pruned median latency, one run)",
        ]
        budgeted = [c.latency for c in trainer.callbacks if isinstance(c, HardPruning) and c.latency is not None]
        if budgeted:
            lines.append(
                f"latency budget : predicted {budgeted[0]['predicted_ms']:.2f} ms, measured {budgeted[0]['measured_ms']:.2f} ms, "
                f"budget {budgeted[0]['budget_ms']:.2f} ms  (per batch, inference form, at hard pruning)"
            )
        lines += [
            f"pruned model   : {path}  (lightning_prune.load_pruned)",
        ]
    else:
        lines += [f"MACs / image   : {cost.macs:,}", f"parameters     : {cost.params:,}"]
    ckpt_cb = trainer.checkpoint_callback
    lines += [
        f"wall time      : {time.perf_counter() - start:.1f} s",
        f"checkpoint     : {ckpt_cb.best_model_path if ckpt_cb is not None and ckpt_cb.best_model_path else 'none saved'}",
        f"output folder  : {out_dir}",
    ]
    print("\n".join(lines), flush=True)
    return metrics


def _kwargs(node: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}


def optimized_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value of ``cfg.optimized_metric`` in ``metrics`` (what the task function returns to
    sweepers); ``None`` when it is not set. ValueError naming the key when it was not logged."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if not isinstance(name, str):
        raise ValueError(f"optimized_metric must be the name of a logged metric (a string) or null, got {name!r}")
    if name not in metrics:
        raise ValueError(f"optimized_metric: {name!r} was not logged; logged metrics are {sorted(metrics)}")
    return metrics[name]


@hydra.main(version_base="1.3", config_path=str(config_dir("train")), config_name="train")
def main(cfg: DictConfig) -> float | None:
    return optimized_value(cfg, run(cfg))


if __name__ == "__main__":
    main()
