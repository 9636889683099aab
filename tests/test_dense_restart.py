"""benchmarks/dense_restart.py's recipes and run names: a continued network trains with the task's
first warm restart, a network from scratch with its first dense recipe, both from the learning
rate given and with the label smoothing given."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lightning_prune.configs import config_dir

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dense_restart.py"


def _script():
    spec = importlib.util.spec_from_file_location("dense_restart_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cfg():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir("bench")), version_base="1.3"):
        return compose("bench", overrides=["task=resnet20_cifar10"])


def _args(**kwargs) -> argparse.Namespace:
    return argparse.Namespace(**{"scratch": False, "epochs": 40, "lr": 0.05, "label_smoothing": 0.0, **kwargs})


def test_a_continued_network_trains_with_the_first_restart_and_its_label_smoothing() -> None:
    cfg = _cfg()
    recipe = _script().run_recipe(cfg, _args(label_smoothing=0.1))
    restart = cfg.task.dense.restarts[0]
    assert recipe.label_smoothing == 0.1 and recipe.optimizer.lr == 0.05
    assert recipe.scheduler == restart.scheduler and recipe.optimizer.momentum == restart.optimizer.momentum
    assert "label_smoothing" not in restart and restart.optimizer.lr == 0.02  # the task's recipe is unchanged
    assert "label_smoothing" not in _script().run_recipe(cfg, _args())


def test_a_network_from_scratch_trains_with_the_first_dense_recipe() -> None:
    cfg = _cfg()
    recipe = _script().run_recipe(cfg, _args(scratch=True, epochs=200, lr=0.1))
    assert set(recipe) == {"optimizer", "scheduler"}  # no length, no restarts: the run gives the epochs
    assert recipe.optimizer.lr == 0.1 and recipe.scheduler == cfg.task.dense.scheduler


def test_run_names() -> None:
    name = _script().run_name
    assert name(_args(scratch=True, epochs=200, lr=0.1), "bf16-mixed") == "scratch-200-0.1-bf16-mixed"
    assert name(_args(label_smoothing=0.1), "bf16-mixed") == "40-0.05-ls0.1-bf16-mixed"
    assert name(_args(), "32-true") == "40-0.05"  # the names the float32 runs were given
