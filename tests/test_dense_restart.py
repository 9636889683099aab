"""benchmarks/dense_restart.py's recipes and run names: a continued network trains with the task's
first warm restart, a network from scratch with its first dense recipe, both from the learning
rate given and with the label smoothing given; a run's identity and name; the distillation from
an ensemble of teachers."""

from __future__ import annotations

import argparse
import json
import importlib.util
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch import nn

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
    return argparse.Namespace(**{"scratch": False, "epochs": 40, "lr": 0.05, "label_smoothing": 0.0, "teachers": None, **kwargs})


def test_a_run_trains_with_the_task_dense_recipe_from_its_lr_and_label_smoothing() -> None:
    """Continued or from scratch: the task's dense optimizer and schedule, no length, no
    restarts (the run gives the epochs), from ``--lr``; the task's recipe itself is unchanged."""
    cfg = _cfg()
    for scratch in (False, True):
        recipe = _script().run_recipe(cfg, _args(scratch=scratch, epochs=200, lr=0.05, label_smoothing=0.1))
        assert set(recipe) == {"optimizer", "scheduler", "label_smoothing"} and recipe.label_smoothing == 0.1
        assert recipe.optimizer.lr == 0.05 and recipe.scheduler == cfg.task.dense.scheduler
        assert recipe.optimizer.momentum == cfg.task.dense.optimizer.momentum and recipe.optimizer.nesterov
    assert "label_smoothing" not in cfg.task.dense and cfg.task.dense.optimizer.lr == 0.1
    assert "label_smoothing" not in _script().run_recipe(cfg, _args())


def test_run_names() -> None:
    name = _script().run_name
    assert name(_args(scratch=True, epochs=200, lr=0.1), "bf16-mixed") == "scratch-200-0.1-bf16-mixed"
    assert name(_args(label_smoothing=0.1), "bf16-mixed") == "40-0.05-ls0.1-bf16-mixed"
    assert name(_args(), "32-true") == "40-0.05"  # the names the float32 runs were given


def test_a_run_without_the_optional_flags_keeps_its_identity() -> None:
    """The checkpoints of a run started before --teachers existed are still resumed."""
    script, cfg = _script(), _cfg()
    args = _args(scratch=True, epochs=200, lr=0.1, threads=1, start=None, teachers=None, temperature=4.0, alpha=0.9, name=None)
    identity = OmegaConf.create(script.run_identity(args, script.run_recipe(cfg, args), "bf16-mixed"))
    assert identity.args == {"epochs": "200", "lr": "0.1", "scratch": "True", "start": "None", "name": "None"}
    assert identity.precision == "bf16-mixed"
    distilled = _args(teachers=[Path("a.pt"), Path("b.pt")], temperature=4.0, alpha=0.9, threads=2, start=None, name=None)
    identity = OmegaConf.create(script.run_identity(distilled, script.run_recipe(cfg, distilled), "32-true"))
    assert identity.args.teachers == "[PosixPath('a.pt'), PosixPath('b.pt')]" and identity.args.alpha == "0.9"
    assert "threads" not in identity.args and "precision" not in identity
    assert script.run_name(distilled, "bf16-mixed") == "40-0.05-kd2-bf16-mixed"


def test_the_ensemble_teacher_is_the_mean_of_the_teachers_probabilities() -> None:
    torch.manual_seed(0)
    teachers = [nn.Linear(4, 4) for _ in range(3)]
    distillation = _script().EnsembleDistillation(teachers, temperature=2.0, alpha=0.75)
    z = torch.randn(5, 4, requires_grad=True)  # the student's logits: an identity network's output
    mean = torch.stack([(t(z) / 2.0).softmax(-1) for t in teachers]).mean(0).detach()
    assert torch.allclose((distillation.teacher_logits(z) / 2.0).softmax(-1), mean, atol=1e-6)
    assert all(not p.requires_grad for t in teachers for p in t.parameters()) and not any(t.training for t in teachers)
    student = nn.Identity()
    student.register_forward_hook(distillation._distil)
    g = torch.randn(5, 4)
    (student(z) * g).sum().backward()  # training: (1 - alpha) g + alpha * T (p_student - p) / batch
    expected = 0.25 * g + 0.75 * 2.0 * ((z.detach() / 2.0).softmax(-1) - mean) / 5
    assert torch.allclose(z.grad, expected, atol=1e-6)
    student.eval()
    assert student(z) is z  # scoring: the logits as they are


def test_dense_ensemble_scores_each_network_and_their_mean_probability(tmp_path: Path, data_dir: Path) -> None:
    from hydra.utils import instantiate

    from lightning_prune.bench.runner import task_datamodule
    from lightning_prune.bench.training import test_accuracy

    spec = importlib.util.spec_from_file_location("dense_ensemble_bench", SCRIPT.with_name("dense_ensemble.py"))
    ensemble = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ensemble)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir("bench")), version_base="1.3"):
        cfg = compose("bench", overrides=["task=lenet5_mnist"])
    torch.manual_seed(0)
    nets, paths = [], []
    for k in range(2):
        nets.append(instantiate(cfg.task.model, num_classes=10).eval())
        paths.append(tmp_path / f"net{k}.pt")
        torch.save(nets[-1].state_dict(), paths[-1])
    threads = torch.get_num_threads()
    GlobalHydra.instance().clear()
    record = ensemble.main([*map(str, paths), "--task", "lenet5_mnist", "--out", str(tmp_path / "e.json")])
    torch.set_num_threads(threads)
    assert json.loads((tmp_path / "e.json").read_text()) == record and record["test_images"] == 10000
    datamodule = task_datamodule(cfg)
    datamodule.setup("test")
    for net, path in zip(nets, paths):
        assert record["networks"][str(path)] == pytest.approx(test_accuracy(cfg, net, datamodule))
    with torch.no_grad():
        hits = sum(int(((nets[0](x).softmax(-1) + nets[1](x).softmax(-1)).argmax(-1) == y).sum())
                   for x, y in datamodule.test_dataloader())
    assert record["ensemble"] == pytest.approx(hits / 100)
    with pytest.raises(SystemExit):
        ensemble.main([str(tmp_path / "missing.pt")])


@pytest.mark.parametrize("argv, message", [
    (["--teachers", "missing.pt"], "--teachers: no file missing.pt"),
    (["--alpha", "1.5"], "--alpha in [0, 1]"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--scratch", "--start", "a.pt"], "--scratch trains a fresh network"),
])
def test_bad_arguments_are_refused_before_anything_runs(monkeypatch: pytest.MonkeyPatch, capsys, argv: list[str], message: str) -> None:
    monkeypatch.setattr("sys.argv", ["dense_restart.py", *argv])
    with pytest.raises(SystemExit):
        _script().main()
    assert message in capsys.readouterr().err
