"""The Hydra entry point through the real configs: composition, a fast training run, a
multirun with the basic launcher, and the installed wheel finding its configs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from lightning_prune.configs import config_dir
from lightning_prune.train import run
from tests.conftest import compose_train

REPO = Path(__file__).resolve().parents[1]
ALL_EXPERIMENTS = sorted(p.stem for root in ("train", "archcomp") for p in (config_dir(root) / "experiment").glob("*.yaml"))
# archcomp_* experiments belong to the root conf/archcomp/archcomp.yaml (python -m lightning_prune.archcomp)
EXPERIMENTS = [e for e in ALL_EXPERIMENTS if not e.startswith("archcomp_")]
MODELS = sorted(p.stem for p in (config_dir("shared") / "model").glob("*.yaml"))


def test_configs_are_the_repositorys_conf_folder():
    assert config_dir() == REPO / "conf"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(experiment, tmp_path, data_dir):
    cfg = compose_train([f"experiment={experiment}"], tmp_path)
    assert cfg.task_name == experiment
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model, num_classes=datamodule.num_classes)
    assert isinstance(net, torch.nn.Module)
    assert callable(instantiate(cfg.optimizer))
    assert cfg.trainer.max_epochs >= 1


@pytest.mark.parametrize("experiment", [e for e in ALL_EXPERIMENTS if e.startswith("archcomp_")])
def test_architecture_compression_experiments_compose_with_their_root(experiment):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir("archcomp")), version_base="1.3"):
        cfg = compose("archcomp", overrides=[f"experiment={experiment}"])
    assert cfg.stage in ("generate", "collect", "fit", "compress", "all")


@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_builds_a_network(model, tmp_path):
    cfg = compose_train([f"model={model}"], tmp_path)
    net = instantiate(cfg.model, num_classes=10)
    assert sum(p.numel() for p in net.parameters()) > 0


def test_fast_dev_run_through_the_real_configs(tmp_path, data_dir, capsys):
    cfg = compose_train(
        ["experiment=lenet5_mnist", "trainer.fast_dev_run=2", "data.subset=512", "data.batch_size=64",
         "data.eval_batch_size=256"], tmp_path
    )
    metrics = run(cfg)
    assert {"test/acc", "val/acc", "macs", "params"} <= set(metrics)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert metrics["macs"] == 2_293_000 and metrics["params"] == 431_080
    out = capsys.readouterr().out + capsys.readouterr().err
    assert "MACs / image   : 2,293,000" in out


def test_training_learns_mnist(tmp_path, data_dir):
    # One short epoch on 6000 images is enough for LeNet-5 to be far above chance.
    cfg = compose_train(
        ["experiment=lenet5_mnist", "trainer.max_epochs=1", "data.subset=6000", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
         "callbacks=none", "logger=csv"],
        tmp_path,
    )
    metrics = run(cfg)
    assert metrics["test/acc"] > 0.9


def test_main_job_prunes_lenet5_to_the_mac_budget_and_exports_it(tmp_path, data_dir, capsys):
    """The main job (no experiment override), shortened: BAR, hard pruning, fine-tuning."""
    from lightning_prune import count_cost, load_pruned

    cfg = compose_train(
        ["pretrain_epochs=1", "pruning.prune_epoch=1", "trainer.max_epochs=2", "scheduler.milestones=[1]", "data.subset=2048",
         "trainer.limit_val_batches=1", "trainer.limit_test_batches=2", "data.eval_batch_size=256"], tmp_path
    )
    assert cfg.task_name == "bar_lenet5_mnist" and cfg.budget.factor == 16 and cfg.budget.cost == "macs"
    metrics = run(cfg)
    assert metrics["macs"] <= 2_293_000 / 16
    out = capsys.readouterr().out
    assert "MACs / image   : 2,293,000 -> " in out and "CPU speedup" in out and "widths" in out
    # the dense network was trained first (a fit of its own), then pruned
    dense = re.search(r"dense network  : ([0-9.]+)% test accuracy after 1 epoch\(s\) of training, before pruning", out)
    assert dense is not None and float(dense.group(1)) > 50, out
    pruned = load_pruned(tmp_path / "pruned_model.pt")
    assert count_cost(pruned, torch.zeros(1, 1, 28, 28)).macs == metrics["macs"]


def _run_cli(args: list[str], cwd: Path, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = dict(os.environ, LP_LOG_DIR=str(cwd / "logs"))
    return subprocess.run([python, "-m", "lightning_prune.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


FAST = ["trainer.fast_dev_run=1", "data.subset=256", "data.eval_batch_size=256", "callbacks=none", "test=false",
        "optimized_metric=val/acc"]


def test_two_job_multirun_with_the_basic_launcher(tmp_path, data_dir):
    result = _run_cli(["-m", "optimizer.lr=0.001,0.002", *FAST], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "logs").glob("*/multiruns/*"))
    assert len(sweeps) == 1
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    lrs = sorted((sweeps[0] / j / ".hydra" / "overrides.yaml").read_text() for j in jobs)
    assert "optimizer.lr=0.001" in lrs[0] and "optimizer.lr=0.002" in lrs[1]


@pytest.mark.slow
def test_the_ddp_trainer_config_runs_on_cpus(tmp_path, data_dir):
    """`trainer=ddp` (2 processes, gloo) runs the main job on a CPU-only machine (SyncBatchNorm,
    GPU-only in torch, is off by default there)."""
    result = _run_cli(["trainer=ddp", "experiment=resnet20_cifar10", "model.width=0.25", *FAST], tmp_path)  # batch norm
    assert result.returncode == 0, result.stderr[-3000:]


def test_wheel_installs_with_its_configs(tmp_path, data_dir):
    """Build the wheel, install it (no deps) into a fresh virtualenv that sees this one's
    dependencies, and run the entry point from an unrelated folder."""
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                            str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(dist.glob("lightning_prune-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    # make this environment's dependencies visible, but not the editable lightning_prune
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    py = str(venv / "bin" / "python")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([py, "-I", "-c", "import lightning_prune.configs as c; print(c.config_dir())"],
                           cwd=work, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr[-3000:]
    assert Path(where.stdout.strip()) == site / "lightning_prune" / "conf"
    result = _run_cli(FAST, work, python=py)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MACs / image   : 2,293,000" in result.stdout + result.stderr


def test_init_from_loads_a_lightning_checkpoint_or_a_state_dict(tmp_path):
    from lightning_prune.models import LeNet5
    from lightning_prune.train import load_network_weights

    trained = LeNet5()
    torch.save({"state_dict": {f"net.{k}": v for k, v in trained.state_dict().items()}, "epoch": 3}, tmp_path / "a.ckpt")
    torch.save(trained.state_dict(), tmp_path / "b.pt")
    for name in ("a.ckpt", "b.pt"):
        net = LeNet5()
        load_network_weights(net, tmp_path / name)
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), trained.state_dict().values()))
    with pytest.raises(ValueError, match="init_from: the weights .* do not fit"):
        load_network_weights(LeNet5(width=0.5), tmp_path / "b.pt")
    with pytest.raises(ValueError, match="--teachers: the weights .* do not fit"):  # the option that named the file
        load_network_weights(LeNet5(width=0.5), tmp_path / "b.pt", "--teachers")
    torch.save({"state_dict": {"model.w": torch.zeros(1)}}, tmp_path / "c.ckpt")
    with pytest.raises(ValueError, match="no 'net.' weights"):
        load_network_weights(LeNet5(), tmp_path / "c.ckpt")


def test_the_main_job_trains_the_dense_network_first_and_checks_pretrain_epochs(tmp_path, data_dir):
    cfg = compose_train([], tmp_path)
    assert cfg.pretrain_epochs == 8 and cfg.pruning.bar.distillation and cfg.pruning.bar.distill_fine_tuning
    assert cfg.pruning.prune_epoch == 1 and cfg.pruning.bar.gate_lr == 0.1  # the gates choose in one epoch
    for bad in ("-1", "1.5", "true"):
        cfg = compose_train([f"pretrain_epochs={bad}", *FAST], tmp_path)
        with pytest.raises(ValueError, match="pretrain_epochs must be an integer >= 0"):
            run(cfg)


def test_run_starts_from_init_from(tmp_path, data_dir):
    cfg = compose_train(["experiment=lenet5_mnist", f"init_from={tmp_path / 'missing.ckpt'}", *FAST[:3]], tmp_path)
    with pytest.raises(FileNotFoundError, match="init_from: no file"):
        run(cfg)


def test_removing_the_pruning_group_trains_the_dense_network(tmp_path, data_dir, capsys):
    # the experiment keeps its own `pruning.*` keys (prune_epoch, BAR's settings), but no
    # pruning callback remains: nothing there has a _target_
    cfg = compose_train(["experiment=bar_lenet5_mnist", "~pruning", *FAST], tmp_path)
    assert not any("_target_" in node for node in cfg.pruning.values() if hasattr(node, "keys"))
    metrics = run(cfg)
    assert metrics["macs"] == 2_293_000 and not (tmp_path / "pruned_model.pt").exists()
    assert "CPU speedup" not in capsys.readouterr().out


def test_median_latency_times_every_model_and_checks_its_arguments():
    from lightning_prune.core.timing import median_latency

    small, large = torch.nn.Linear(8, 8), torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(50)])
    times = median_latency({"small": small, "large": large}, torch.zeros(1, 8), repeats=5, warmup=1)
    assert times.keys() == {"small", "large"} and 0 < times["small"] < times["large"]
    assert not small.training and not large.training  # timed in eval mode
    with pytest.raises(ValueError, match="repeats"):
        median_latency({"small": small}, torch.zeros(1, 8), repeats=0)
    with pytest.raises(TypeError, match="warmup"):
        median_latency({"small": small}, torch.zeros(1, 8), warmup=1.5)


def test_a_latency_budget_through_the_configs(tmp_path, data_dir, capsys):
    """`budget=[factor2,latency]`: the callbacks get the latency options from the budget group,
    the latency model is measured (into the cache folder given), hard pruning keeps the predicted
    latency under the budget and the report shows predicted and measured latency."""
    cfg = compose_train(
        ["pruning=random", "budget=[factor2,latency]", "budget.latency.batch_size=256", f"+budget.latency.cache_dir={tmp_path / 'lat'}",
         "+budget.latency.grid=3", "+budget.latency.repeats=5",
         "pruning.prune_epoch=1", "trainer.max_epochs=2", "scheduler.milestones=[1]", "data.subset=512",
         "trainer.limit_val_batches=1", "test=false", "data.eval_batch_size=256"], tmp_path
    )
    assert cfg.pruning.random.cost == "latency" and cfg.pruning.random.latency.batch_size == 256
    run(cfg)
    out = capsys.readouterr().out
    assert "latency budget : predicted " in out
    found = re.search(r"latency budget : predicted ([0-9.]+) ms, measured ([0-9.]+) ms, budget ([0-9.]+) ms", out)
    assert found is not None and float(found[1]) <= float(found[3]) and float(found[2]) > 0
    assert len(list((tmp_path / "lat").glob("*.json"))) == 1
