"""The AdaNS candidate job: evaluate a compression vector x of a trained model.

:func:`run` is the task function behind ``python -m lightning_prune.search.evaluate`` (config
``conf/search/adans.yaml``). With ``search.mode=evaluate`` it returns
``{"accuracy": percent on the held-out images, "cost": predicted cost, "base_cost": ...}``,
which the ``adans`` sweeper turns into the score; ``search.mode=score`` returns the score
itself (a float, for sweepers that maximise a number, e.g. Optuna; it needs
``search.reference_accuracy`` and ``search.threshold``); with ``search.mode=final`` it builds the
real compressed model, measures its cost, evaluates it (held-out images, test set), optionally
fine-tunes it and saves it to ``<output dir>/compressed.pt`` with :func:`lightning_prune.save_pruned`
(the model config as its architecture, plus the pruning history and decompositions): load it
with ``lightning_prune.load_pruned(path)``.

Everything expensive (loading the data, the weights, building the channel graph, ranking
channels, caching SVD factors) happens once per process and is kept in a module-level cache:
with the basic launcher every job of a sweep reuses it, and with joblib every worker process
does; each candidate then costs one pass over the held-out images with masks and weights
set in place.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_prune.core.cost import count_cost
from lightning_prune.core.cost.latency import LATENCY
from lightning_prune.core.cost.latency_measure import time_network
from lightning_prune.core.export import export, save_pruned
from lightning_prune.search.space import SearchSpace
from lightning_prune.search.spaces import CompressionSpace, sparse_cost, top1

MODES = ("evaluate", "score", "final")
_CACHE: dict[str, Evaluator] = {}


def load_weights(model: nn.Module, path: str | os.PathLike, prefix: str = "net.") -> nn.Module:
    """Load a Lightning checkpoint (``state_dict`` with keys ``<prefix>...``) or a plain state
    dict file into ``model`` (strictly)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search.checkpoint: no file {path.resolve()}; train a model first "
                                "(python -m lightning_prune.train ...) and point search.checkpoint at its checkpoint")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
    if not isinstance(state, dict):
        raise ValueError(f"search.checkpoint: {path} holds no state dict")
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    model.load_state_dict(state)
    return model


def _build_model(model_cfg: DictConfig, num_classes: int) -> nn.Module:
    return instantiate(model_cfg, num_classes=num_classes)


def architecture(model_cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    """The ``architecture`` entry of a saved file (``lightning_prune.save_pruned``) for the
    ``model`` config: its ``_target_`` and keyword arguments, with ``num_classes``."""
    kwargs = {k: v for k, v in OmegaConf.to_container(model_cfg, resolve=True).items() if not k.startswith("_")}
    return {"_target_": model_cfg._target_, **kwargs, "num_classes": num_classes}


def search_space(model: DictConfig, data: DictConfig, kind: str = "structured", cost: str = "macs",
                 residual: str = "tied", latency: Any = None) -> SearchSpace:
    """The search space (dimensions and cost predictor) of ``kind`` for the architecture of the
    ``model`` config; no weights or data are loaded (the datamodule only says the number of
    classes and the input shape). The ``adans`` sweeper builds it from ``search.space``."""
    datamodule = instantiate(data)
    net = _build_model(model, datamodule.num_classes)
    return CompressionSpace(net, torch.zeros(1, *datamodule.input_shape), kind, cost, residual=residual,
                            latency=latency_options(latency)).search_space


def latency_options(latency: Any) -> dict[str, Any] | None:
    """``search.latency`` (a config node of :func:`lightning_prune.measure_latency` arguments, or null) as a dict."""
    return OmegaConf.to_container(latency, resolve=True) if isinstance(latency, DictConfig) else latency


class Evaluator:
    """A loaded model, its held-out images and its compression space (built once per process)."""

    def __init__(self, cfg: DictConfig) -> None:
        s = cfg.search
        calibration_size = s.get("calibration_size", 0)
        for key, value in (("eval_size", s.eval_size), ("rank_size", s.rank_size), ("batch_size", s.batch_size),
                           ("calibration_size", calibration_size)):
            non_negative = key in ("rank_size", "calibration_size")
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if non_negative else 1):
                raise ValueError(f"search.{key} must be a {'non-negative' if non_negative else 'positive'} int, "
                                 f"got {value!r}")
        self.datamodule = instantiate(cfg.data)
        self.datamodule.setup("fit")
        held_out = self.datamodule.val_set
        need = s.eval_size + s.rank_size + calibration_size
        if held_out is None or len(held_out) < need:
            raise ValueError(f"search.eval_size + search.rank_size + search.calibration_size = {need} images are needed "
                             f"from the held-out part of the training set, which has "
                             f"{0 if held_out is None else len(held_out)} (data.val_size)")
        images = [held_out[i] for i in range(need)]
        inputs = torch.stack([img for img, _ in images])
        targets = torch.tensor([int(t) for _, t in images])
        self.inputs, self.targets = inputs[: s.eval_size], targets[: s.eval_size]
        end = s.eval_size + s.rank_size
        self.calibration = inputs[end:] if calibration_size else None
        self.batch_size = s.batch_size
        self.model = _build_model(cfg.model, self.datamodule.num_classes)
        if s.checkpoint is None:
            raise ValueError("search.checkpoint must point at the trained model to compress")
        load_weights(self.model, s.checkpoint, s.checkpoint_prefix or "")
        self.model.eval()
        self.space = CompressionSpace(self.model, torch.zeros(1, *self.datamodule.input_shape), s.kind, s.cost,
                                      residual=s.get("residual", "tied"), latency=latency_options(s.get("latency")))
        if self.space.structured:
            if s.rank_size == 0:
                raise ValueError("search.rank_size must be positive for structured pruning (channels are ranked on "
                                 "those held-out images)")
            rank_x, rank_y = inputs[s.eval_size : end], targets[s.eval_size : end]
            self.space.rank_channels(
                [(rank_x[i : i + s.batch_size], rank_y[i : i + s.batch_size]) for i in range(0, len(rank_x), s.batch_size)]
            )
        self.base_cost = self.space.base_cost

    def evaluate(self, x: Any) -> dict[str, float]:
        """Accuracy (percent, held-out images) and predicted cost of candidate ``x``."""
        accuracy = self.space.accuracy(x, self.inputs, self.targets, self.batch_size, calibration=self.calibration)
        return {"accuracy": accuracy, "cost": float(self.space.predict_cost(x)), "base_cost": float(self.base_cost)}


def evaluator(cfg: DictConfig) -> Evaluator:
    """The cached :class:`Evaluator` for this config (everything but ``search.x`` / ``search.mode``)."""
    key_cfg = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "model", "search")}
    for k in ("x", "mode", "final", "reference_accuracy", "threshold", "min_drop", "cost_weight", "threads", "record"):
        key_cfg["search"].pop(k, None)
    key = json.dumps(key_cfg, sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE.clear()  # one model per process
        _CACHE[key] = Evaluator(cfg)
    return _CACHE[key]


@torch.no_grad()
def loader_accuracy(model: nn.Module, loader: Any) -> float:
    """Top-1 accuracy in percent of ``model`` (put in eval mode) over the batches of ``loader``."""
    model.eval()
    correct = total = 0
    for inputs, targets in loader:
        correct += int((model(inputs).argmax(-1) == targets).sum())
        total += len(targets)
    return 100.0 * correct / total


def final(cfg: DictConfig, ev: Evaluator, x: Any, output_dir: Path) -> dict[str, Any]:
    """Build, measure, evaluate, optionally fine-tune and save the compressed model ``x``."""
    s = cfg.search
    started = time.perf_counter()
    masked_accuracy = ev.space.accuracy(x, ev.inputs, ev.targets, ev.batch_size)
    model = ev.space.compress(x)
    example = ev.space.example_input
    if ev.space.cost == LATENCY:  # timed now, in the inference form, at the latency model's batch size
        inference = export(model, inference=True, example_input=example, allow_over_budget=True)
        measured_cost = time_network({"compressed": inference}, ev.space.latency, example)["compressed"]
    else:
        measured = sparse_cost(model, example) if ev.space.unstructured else count_cost(model, example)
        measured_cost = measured[ev.space.cost]
    out: dict[str, Any] = {
        "accuracy": top1(model, ev.inputs, ev.targets, ev.batch_size),
        "masked_accuracy": masked_accuracy,
        "cost": float(ev.space.predict_cost(x)),
        "measured_cost": float(measured_cost),
        "base_cost": float(ev.base_cost),
        "cost_fraction": float(measured_cost) / float(ev.base_cost),
    }
    if s.final.test:
        ev.datamodule.setup("test")
        out["test_accuracy"] = loader_accuracy(model, ev.datamodule.test_dataloader())
    if s.final.finetune_epochs:
        import lightning as L

        module = instantiate(s.final.module, net=model, num_classes=ev.datamodule.num_classes,
                             optimizer=instantiate(s.final.optimizer))
        trainer = L.Trainer(max_epochs=s.final.finetune_epochs, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(output_dir))
        trainer.fit(module, datamodule=ev.datamodule)
        model = module.net
        out["finetune_epochs"] = int(s.final.finetune_epochs)
        if s.final.test:
            out["finetuned_test_accuracy"] = loader_accuracy(model, ev.datamodule.test_dataloader())
    path = output_dir / "compressed.pt"
    save_pruned(model.cpu(), path, architecture=architecture(cfg.model, ev.datamodule.num_classes))
    out["path"] = str(path)
    out["seconds"] = time.perf_counter() - started
    return out


def _vector(x: Any, d: int) -> list[float]:
    """``search.x`` as a list: a list, or a mapping ``{x0: ..., x1: ..., ...}`` (one key per
    dimension, as per-parameter sweepers such as Optuna's write it)."""
    if isinstance(x, (DictConfig, dict)):
        keys = [f"x{i}" for i in range(d)]
        if sorted(x) != sorted(keys):
            raise ValueError(f"search.x as a mapping must have the keys x0..x{d - 1}, got {sorted(x)}")
        return [float(x[k]) for k in keys]
    return list(x)


def _record(cfg: DictConfig, x: Any, result: dict[str, Any]) -> dict[str, Any]:
    """Append ``{"x": ..., **result}`` to the JSON-lines file ``search.record`` (if set)."""
    path = cfg.search.get("record")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"x": [float(v) for v in x], **result}) + "\n")
    return result


def run(cfg: DictConfig) -> Any:
    """The task function: evaluate ``search.x`` (or build the final model) as ``search.mode`` says."""
    mode = cfg.search.mode
    if mode not in MODES:
        raise ValueError(f"search.mode must be one of {MODES}, got {mode!r}")
    if cfg.search.x is None:
        raise ValueError("search.x is not set: run this task under the adans sweeper "
                         "(-m hparams_search=adans_...) or pass search.x=[...]")
    if cfg.get("seed") is not None:
        torch.manual_seed(cfg.seed)
    if cfg.search.get("threads"):
        torch.set_num_threads(int(cfg.search.threads))
    ev = evaluator(cfg)
    x = ev.space.search_space.check(_vector(cfg.search.x, ev.space.search_space.d), "search.x")
    if mode == "evaluate":
        return _record(cfg, x, ev.evaluate(x))
    if mode == "score":
        from lightning_prune.search.score import Scorer

        if cfg.search.get("reference_accuracy") is None:
            raise ValueError("search.mode=score needs search.reference_accuracy: the original model's accuracy (percent) "
                             "on the same held-out images")
        result = ev.evaluate(x)
        scorer = Scorer(float(cfg.search.reference_accuracy), result["base_cost"], float(cfg.search.threshold),
                        float(cfg.search.min_drop), float(cfg.search.cost_weight))
        result["score"] = scorer(result["accuracy"], result["cost"])
        return _record(cfg, x, result)["score"]
    from hydra.core.hydra_config import HydraConfig

    output_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
    return final(cfg, ev, x, output_dir)
