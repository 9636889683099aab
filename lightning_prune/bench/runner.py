"""The benchmark's stages: ``dense`` (train and cache a task's dense network) and ``prune``
(one method at one budget and seed, written to one JSON result file)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_prune.bench.methods import METHODS, REFERENCE, Run
from lightning_prune.bench.training import dense_epochs, dense_restarts, fit, latency_ratios, plain, resumable, task_precision, test_accuracy
from lightning_prune.core.cost import CostModel, count_cost
from lightning_prune.core.cost.latency import LATENCY, LatencyTable
from lightning_prune.core.cost.latency_measure import measure_latency, time_network
from lightning_prune.core.cost.model import check_budget_cost
from lightning_prune.core.export import export
from lightning_prune.core.trace import build_graph
from lightning_prune.core.cost.measure import output_widths
from lightning_prune.core.export import read_torch_file
from lightning_prune.train import load_network_weights



class BudgetExceeded(RuntimeError):
    """A method's network costs more than the budget: an error, not a result."""


def bench_dir(cfg: DictConfig) -> Path:
    return Path(cfg.bench_dir).expanduser().resolve()


def checkpoint_path(cfg: DictConfig) -> Path:
    suffix = "-toy" if cfg.toy else ""
    return bench_dir(cfg) / "checkpoints" / f"{cfg.task.name}{suffix}.pt"


def result_path(cfg: DictConfig) -> Path:
    factor = float(cfg.budget.factor)
    name = f"{row_name(cfg)}-{cfg.budget.cost}{factor:g}-seed{int(cfg.seed)}.json"
    return bench_dir(cfg) / ("results-toy" if cfg.toy else "results") / cfg.task.name / name


def partial_dir(cfg: DictConfig, path: Path) -> Path:
    """Where the run that writes ``path`` keeps its per-epoch checkpoints until it is done."""
    return bench_dir(cfg) / "partial" / path.relative_to(bench_dir(cfg)).with_suffix("")


def _resumable(cfg: DictConfig, path: Path, started: float) -> Any:
    """The run that writes ``path`` saves a checkpoint every epoch under ``partial_dir`` and, when
    killed, resumes from there (with the same configuration) the next time it is started."""
    # Unresolved: the choices and overrides, not where this process runs; without ``bench_dir``,
    # where it writes (the folder the checkpoints are in), so that checkpoints committed with the
    # repository resume in a clone of it at another path.
    config = OmegaConf.to_container(cfg, resolve=False)
    del config["bench_dir"]
    return resumable(partial_dir(cfg, path), OmegaConf.to_yaml(config), started)


def row_name(cfg: DictConfig) -> str:
    """The method's name in result files and tables: ``<method>`` or ``<method>+<variant>``."""
    variant = cfg.get("variant")
    return f"{cfg.method.name}+{variant}" if variant else str(cfg.method.name)


def command_line() -> str:
    """The command that reproduces this job (its overrides, without launcher settings)."""
    try:
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra")]
    except ValueError:  # not under Hydra (called from Python)
        overrides = sys.argv[1:]
    return " ".join(["lightning-prune-bench", *overrides])


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)
        return done.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def toy_size(cfg: DictConfig) -> None:
    """At toy size every recipe is cut to 1 dense epoch and 2 epochs after it (a few batches each)."""
    if cfg.toy:
        with open_dict(cfg):
            cfg.task.dense.epochs = 1
            for restart in dense_restarts(cfg):
                restart.epochs = 1
            cfg.task.prune.epochs = 2


def task_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The task's data module (``task.data``; a subset at toy size), set up for fit and test."""
    overrides = {"subset": 256, "batch_size": 32, "eval_batch_size": 100} if cfg.toy else {}
    datamodule = instantiate(cfg.task.data, **overrides)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    return datamodule


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)  # a killed job leaves no half-written result


def _environment(cfg: DictConfig) -> dict[str, Any]:
    return {
        "command": command_line(), "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "precision": task_precision(cfg), "toy": bool(cfg.toy),
    }


def dense(cfg: DictConfig) -> dict[str, Any]:
    """Train the task's dense network once (``task.dense`` recipe, then its warm restarts
    ``task.dense.restarts`` in order: the same training continued with each recipe's
    optimizer and schedule) and save its weights and a JSON record next to it; an existing
    checkpoint is kept. ``dense_from=<file>`` takes the
    weights of a network trained elsewhere instead (a Lightning checkpoint of ``ImageClassifier``
    or a state dict), recorded as ``imported_from``; its recipe should be the task's."""
    path = checkpoint_path(cfg)
    record = path.with_suffix(".json")
    if path.exists() and record.exists():
        print(f"dense network exists: {path}", flush=True)
        return json.loads(record.read_text())
    torch.set_num_threads(int(cfg.threads))
    toy_size(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    started = time.perf_counter()
    datamodule = task_datamodule(cfg)
    net = instantiate(cfg.task.model, num_classes=datamodule.num_classes)
    source = cfg.get("dense_from")
    if source and not Path(source).is_file():
        raise FileNotFoundError(f"dense_from: no file {source}")
    with _resumable(cfg, path, started) as checkpoints:
        if source:  # trained elsewhere (e.g. on a GPU, or by lightning-prune's train entry point)
            load_network_weights(net, source, "dense_from")
        else:
            net = fit(cfg, datamodule, net, cfg.task.dense, int(cfg.task.dense.epochs))
            for restart in dense_restarts(cfg):
                net = fit(cfg, datamodule, net, restart, int(restart.epochs))
    accuracy = test_accuracy(cfg, net, datamodule)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    payload = {"task": cfg.task.name, "test_accuracy": accuracy, "epochs": dense_epochs(cfg),
               "imported_from": str(source) if source else None,
               "wall_seconds": checkpoints.seconds(), "recipe": plain(cfg.task.dense), **_environment(cfg)}
    if checkpoints.resumed:
        payload["resumed"] = checkpoints.resumed
    _write_json(record, payload)
    checkpoints.delete()
    print(f"dense {cfg.task.name}: {accuracy:.2f}% test accuracy, saved to {path}", flush=True)
    return payload


def load_dense(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
    path = checkpoint_path(cfg)
    if not path.exists():
        raise FileNotFoundError(f"no dense network for task {cfg.task.name} at {path}: run `lightning-prune-bench stage=dense task={cfg.task.name}` first")
    net = instantiate(cfg.task.model, num_classes=num_classes)
    net.load_state_dict(read_torch_file(path, "a dense network's state_dict", prefix="dense checkpoint: "))
    return net


LATENCY_METHODS = ("bar", "dirichlet", "random")  # the methods that take a latency budget


@dataclass(frozen=True)
class _Latency:
    table: LatencyTable
    graph: Any


def _latency_table(cfg: DictConfig, dense_net: torch.nn.Module, example: torch.Tensor) -> _Latency:
    """The dense network's latency model (``budget.latency``: the options of
    :func:`lightning_prune.measure_latency`), measured on the graph the method will build (its
    residual mode), so that the method's session finds the same table in the cache."""
    options = OmegaConf.to_container(cfg.budget.latency, resolve=True) if cfg.budget.get("latency") is not None else None
    if not options or "batch_size" not in options:
        raise ValueError("budget.latency: budget.cost=latency needs budget.latency.batch_size (and threads)")
    graph = build_graph(dense_net, example, residual=cfg.method.get("residual", "tied"))
    return _Latency(measure_latency(dense_net, graph, **options), graph)


def prune(cfg: DictConfig) -> dict[str, Any]:
    """One run: the method on a copy of the dense network, scored on the test set, measured on
    the exported network; skipped when its result file exists."""
    path = result_path(cfg)
    if path.exists():
        print(f"done already: {path}", flush=True)
        return json.loads(path.read_text())
    name = cfg.method.name
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; the methods are {', '.join(METHODS)}")
    check_budget_cost(cfg.budget.cost, "budget.cost")
    if cfg.budget.cost == LATENCY and name not in LATENCY_METHODS:
        raise ValueError(f"budget.cost=latency: method {name!r} has no latency budget; the methods with one are {', '.join(LATENCY_METHODS)}")
    factor = float(cfg.budget.factor)
    if factor < 1:
        raise ValueError(f"budget.factor must be >= 1, got {factor}")
    torch.set_num_threads(int(cfg.threads))
    toy_size(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    started = time.perf_counter()
    datamodule = task_datamodule(cfg)
    dense_net = load_dense(cfg, datamodule.num_classes).eval()
    example = torch.zeros(1, *datamodule.input_shape)
    full = count_cost(dense_net, example)
    table = _latency_table(cfg, dense_net, example) if cfg.budget.cost == LATENCY else None
    full_cost = CostModel(table.graph, latency=table.table).full(LATENCY) if table else full[cfg.budget.cost]
    run = Run(cfg, datamodule, dense_net, example, full_cost / factor, latency=table.table if table else None)
    with _resumable(cfg, path, started) as checkpoints:
        net = METHODS[name](run).eval()
    if checkpoints.resumed:
        run.info["resumed"] = checkpoints.resumed
    cost = count_cost(net, example)
    reference = name in REFERENCE
    spent = run.info["latency"]["predicted_ms"] * 1e6 if table else cost[cfg.budget.cost]
    if spent > run.target and not reference:
        raise BudgetExceeded(f"{name}: the exported network costs {cfg.budget.cost} {spent:,.0f}, over the budget {run.target:,.0f}")
    if table:  # the exported network timed now, interleaved with the dense one, in their inference form
        timed = time_network({n: export(m, inference=True, example_input=example, allow_over_budget=True) for n, m in
                              (("dense", dense_net), ("pruned", net))}, table.table, example)
        run.info["latency"].update(dense_ms_now=timed["dense"] / 1e6, pruned_ms_now=timed["pruned"] / 1e6,
                                   measured_over_budget=timed["pruned"] / (timed["dense"] / factor))
    payload = {
        "task": cfg.task.name, "method": row_name(cfg), "cost": cfg.budget.cost, "factor": factor, "seed": int(cfg.seed),
        "test_accuracy": test_accuracy(cfg, net, datamodule),
        "dense_test_accuracy": test_accuracy(cfg, dense_net, datamodule),
        "macs": cost.macs, "params": cost.params, "volume": cost.volume, "budget": run.target,
        "full": {"macs": full.macs, "params": full.params, "volume": full.volume},
        "widths": output_widths(net), "epochs": run.epochs, "reference": reference,
        "latency_ratio": latency_ratios(dense_net, net, datamodule.input_shape, bool(cfg.toy)),
        "method_config": plain(cfg.method), "info": run.info,
        "wall_seconds": checkpoints.seconds(), **_environment(cfg),
    }
    _write_json(path, payload)
    checkpoints.delete()
    print(f"{cfg.task.name} {name} {cfg.budget.cost}/{factor:g} seed {int(cfg.seed)}: {payload['test_accuracy']:.2f}% "
          f"at {spent:,.0f} {cfg.budget.cost} (budget {run.target:,.0f}) -> {path}", flush=True)
    return payload
