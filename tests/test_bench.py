"""The benchmark runner at toy size: every method on both tasks writes a valid result file,
finished runs are skipped, a network over its budget is an error, and the report turns a folder
of result files into the same tables every time."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from lightning_prune.bench import METHODS, BudgetExceeded, dense, prune, report, result_path
from lightning_prune.bench.report import BEGIN, END, residual_table
from lightning_prune.bench import methods as bench_methods
from lightning_prune.bench import runner as bench_runner
from lightning_prune.bench import training as bench_training
from lightning_prune.bench.runner import partial_dir
from lightning_prune.configs import config_dir

TASKS = ("lenet5_mnist", "resnet20_cifar10")


def bench_cfg(folder: Path, *overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir("bench")), version_base="1.3"):
        return compose("bench", overrides=["toy=true", f"bench_dir={folder}", *overrides])


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A benchmarks folder with the toy dense networks of both tasks."""
    out = tmp_path_factory.mktemp("bench")
    for task in TASKS:
        record = dense(bench_cfg(out, "stage=dense", f"task={task}"))  # toy: 1 epoch
        assert record["epochs"] == 1 and (out / "checkpoints" / f"{task}-toy.pt").is_file()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_writes_a_valid_result_file(folder: Path, task: str, method: str) -> None:
    extra = ["method.iterative_steps=40"] if method.startswith("tp_") else []
    cfg = bench_cfg(folder, f"task={task}", f"method={method}", "budget.factor=4", *extra)
    result = prune(cfg)
    path = result_path(cfg)
    assert json.loads(path.read_text()) == result
    assert result["task"] == task and result["method"] == method and result["factor"] == 4.0 and result["seed"] == 0
    assert 0.0 <= result["test_accuracy"] <= 100.0 and result["epochs"] == 2
    full = result["full"]["macs"]
    if method == "lightning_l1":  # masks only: a reference row, as large as the dense network
        assert result["reference"] and result["macs"] == full
    else:  # counted on the exported, physically smaller network
        assert not result["reference"] and result["macs"] <= result["budget"] == pytest.approx(full / 4)
    for key in ("params", "volume", "widths", "latency_ratio", "command", "git_commit", "date", "torch", "threads", "wall_seconds"):
        assert key in result
    assert set(result["latency_ratio"]) == {"batch1", "batch256"}
    assert result["command"].startswith("lightning-prune-bench")


def test_adans_fills_the_budget_and_scores_with_recalibrated_batch_norm(folder: Path) -> None:
    cfg = bench_cfg(folder, "task=resnet20_cifar10", "method=adans", "budget.factor=2", "variant=fill-bn",
                    "method.fill_budget=true", "method.calibration_size=32")
    result = prune(cfg)
    assert 0.97 * result["budget"] <= result["macs"] <= result["budget"]  # every candidate spends the budget
    assert result["method_config"]["calibration_size"] == 32 and result["method_config"]["fill_budget"]


def test_adans_finalists_are_fine_tuned_before_one_is_chosen(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    epochs = []
    original = bench_methods.fit
    monkeypatch.setattr(bench_methods, "fit", lambda cfg, dm, net, recipe, n, *a, **k: epochs.append(n) or original(cfg, dm, net, recipe, n, *a, **k))
    toy_size = bench_runner.toy_size

    def three_epochs(cfg: DictConfig) -> None:  # toy size, with 3 epochs after the dense network
        toy_size(cfg)
        cfg.task.prune.epochs = 3

    monkeypatch.setattr(bench_runner, "toy_size", three_epochs)
    cfg = bench_cfg(folder, "task=lenet5_mnist", "method=adans", "budget.factor=4", "variant=finalists",
                    "method.finalists=2", "method.finalist_epochs=1")
    result = prune(cfg)
    assert epochs == [1, 1, 1]  # two trials, then the winner's last epoch
    finalists = result["info"]["finalists"]
    assert len(finalists) == 2 and finalists[0]["x"] != finalists[1]["x"]
    chosen = result["info"]["finalist_chosen"]
    assert finalists[chosen]["tuned_accuracy"] == max(f["tuned_accuracy"] for f in finalists)
    assert result["macs"] <= result["budget"]
    with pytest.raises(ValueError, match=r"method.finalists \* method.finalist_epochs \(3 \* 1\) must be"):
        prune(bench_cfg(folder, "task=lenet5_mnist", "method=adans", "budget.factor=4", "variant=three", "method.finalists=3"))


def test_a_finished_run_is_skipped_and_over_budget_is_an_error(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = bench_cfg(folder, "task=lenet5_mnist", "method=random", "budget.factor=2", "seed=7")
    first = prune(cfg)
    stamp = result_path(cfg).stat().st_mtime_ns
    monkeypatch.setitem(METHODS, "random", lambda run: pytest.fail("a finished run ran again"))
    assert prune(cfg) == first and result_path(cfg).stat().st_mtime_ns == stamp
    monkeypatch.setitem(METHODS, "random", lambda run: run.dense)  # the dense network: over any budget
    over = bench_cfg(folder, "task=lenet5_mnist", "method=random", "budget.factor=2", "seed=8")
    with pytest.raises(BudgetExceeded, match="over the budget"):
        prune(over)
    assert not result_path(over).exists()
    with pytest.raises(FileNotFoundError, match="stage=dense task=lenet5_mnist"):
        prune(bench_cfg(folder / "empty", "task=lenet5_mnist", "method=random"))
    variant = bench_cfg(folder, "task=lenet5_mnist", "method=random", "budget.factor=2", "seed=7", "variant=again")
    assert result_path(variant).name == "random+again-macs2-seed7.json" and not result_path(variant).exists()
    with pytest.raises(ValueError, match="budget.cost must be one of"):
        prune(bench_cfg(folder, "task=lenet5_mnist", "method=random", "budget.cost=flops"))
    with pytest.raises(ValueError, match=r"method.anneal_fraction must be in \(0, 1\], got 1.5"):
        prune(bench_cfg(folder, "task=lenet5_mnist", "method=bar", "variant=late", "method.anneal_fraction=1.5"))


class _Killed(Exception):
    pass


def _kill_at_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int, calls: int = 1) -> list[int]:
    """Every Trainer the runner makes raises at the start of ``epoch`` (as a killed process
    stops), in its first ``calls`` fits; returns the list of epochs trained, appended as they start."""
    from lightning.pytorch.callbacks import Callback

    started: list[int] = []
    made = []

    class Kill(Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == epoch and len(made) <= calls:
                raise _Killed(f"killed at epoch {epoch}")
            started.append(trainer.current_epoch)

    original = bench_training.trainer

    def trainer(cfg, epochs, callbacks=(), checkpoint_dir=None):
        made.append(1)
        return original(cfg, epochs, [*callbacks, Kill()], checkpoint_dir)

    monkeypatch.setattr(bench_training, "trainer", trainer)
    return started


@pytest.mark.parametrize("method", ["bar", "width"])
def test_a_killed_run_resumes_from_its_last_epoch(folder: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """A run killed during its second epoch starts again from its checkpoint of the first, and
    ends where the run never stopped ends (LeNet-5's loader has no persistent workers)."""
    uninterrupted = prune(bench_cfg(folder, "task=lenet5_mnist", f"method={method}", "budget.factor=2", "seed=3", "variant=whole"))
    assert "resumed" not in uninterrupted["info"]
    cfg = bench_cfg(folder, "task=lenet5_mnist", f"method={method}", "budget.factor=2", "seed=3", "variant=killed")
    partial = partial_dir(cfg, result_path(cfg))
    with monkeypatch.context() as patch:
        trained = _kill_at_epoch(patch, epoch=1)
        with pytest.raises(_Killed):
            prune(cfg)
    assert trained == [0] and (partial / "fit0" / "last.ckpt").is_file() and not result_path(cfg).exists()
    with monkeypatch.context() as patch:
        trained = _kill_at_epoch(patch, epoch=-1)  # counts the epochs, kills none
        resumed = prune(cfg)
    epochs = uninterrupted["info"].get("epochs_from_scratch", uninterrupted["epochs"])
    assert trained == list(range(1, epochs))  # from the epoch the killed process did not finish
    assert resumed["info"]["resumed"] == [{"fit": 0, "epochs_skipped": 1}]
    assert not partial.exists()  # deleted once the result file is written
    for key in ("test_accuracy", "macs", "params", "volume", "widths"):
        assert resumed[key] == uninterrupted[key], key
    if method == "bar":
        assert resumed["info"]["soft_phase"] == uninterrupted["info"]["soft_phase"]
    assert resumed["wall_seconds"] > 0


def test_a_killed_run_resumes_with_its_folder_at_another_path(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarks folder is where a run writes, not what it is: checkpoints committed with the
    repository resume in a clone at another path (here the same folder spelt differently)."""
    cfg = bench_cfg(folder, "task=lenet5_mnist", "method=random", "budget.factor=2", "seed=5")
    with monkeypatch.context() as patch:
        _kill_at_epoch(patch, epoch=1)
        with pytest.raises(_Killed):
            prune(cfg)
    elsewhere = bench_cfg(folder / ".." / folder.name, "task=lenet5_mnist", "method=random", "budget.factor=2", "seed=5")
    assert elsewhere.bench_dir != cfg.bench_dir
    with monkeypatch.context() as patch:
        trained = _kill_at_epoch(patch, epoch=-1)
        resumed = prune(elsewhere)
    assert trained[0] == 1 and resumed["info"]["resumed"] == [{"fit": 0, "epochs_skipped": 1}]


def test_checkpoints_of_another_configuration_or_unreadable_are_not_resumed(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = bench_cfg(folder, "task=lenet5_mnist", "method=random", "budget.factor=2", "seed=4")
    partial = partial_dir(cfg, result_path(cfg))
    with monkeypatch.context() as patch:
        _kill_at_epoch(patch, epoch=1)
        with pytest.raises(_Killed):
            prune(cfg)
    assert (partial / "fit0" / "last.ckpt").is_file()
    (partial / "config.yaml").write_text("another: run\n")
    with monkeypatch.context() as patch:
        trained = _kill_at_epoch(patch, epoch=1)
        with pytest.warns(UserWarning, match="another configuration"), pytest.raises(_Killed):
            prune(cfg)
    assert trained == [0]  # started over
    (partial / "fit0" / "last.ckpt").write_bytes(b"truncated")
    with monkeypatch.context() as patch:
        trained = _kill_at_epoch(patch, epoch=-1)
        with pytest.warns(UserWarning, match="unreadable checkpoint"):
            result = prune(cfg)
    assert trained == [0, 1] and "resumed" not in result["info"] and not partial.exists()


@pytest.mark.parametrize("method", ["bar", "random"])
def test_a_latency_budget_run(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """budget.cost=latency: the dense network's latency model is measured once (the method's
    session finds it), the pruned network's predicted latency is under the budget, and the
    result file has the predicted and the measured latency."""
    monkeypatch.setenv("LP_LATENCY_CACHE", str(tmp_path))
    # batch 64 and factor 1.25: at small batches a LeNet-5's fixed per-call overhead is most of its
    # latency (at batch 8, one channel per layer kept 33-60% of the dense latency on one machine,
    # and the overhead's share differs between machines), and a budget under that minimum is
    # rightly refused; at batch 64 the minimum was 12%, so 80% is feasible with a wide margin
    cfg = bench_cfg(folder, "task=lenet5_mnist", f"method={method}", "budget.cost=latency", "budget.factor=1.25",
                    "budget.latency.batch_size=64", "+budget.latency.grid=3", "+budget.latency.repeats=2")
    result = prune(cfg)
    assert result["cost"] == "latency" and result_path(cfg).name == f"{method}-latency1.25-seed0.json"
    latency = result["info"]["latency"]
    assert latency["predicted_ms"] * 1e6 <= result["budget"] and latency["budget_ms"] * 1e6 == pytest.approx(result["budget"])
    assert latency["measured_ms"] > 0 and latency["pruned_ms_now"] > 0 and latency["dense_ms_now"] > 0
    assert len(list(tmp_path.glob("*.json"))) == 1  # one latency model: the session read the runner's
    with pytest.raises(ValueError, match="budget.cost=latency: method 'tp_l1' has no latency budget"):
        prune(bench_cfg(folder, "task=lenet5_mnist", "method=tp_l1", "budget.cost=latency"))


def test_the_report_is_the_same_every_time(folder: Path) -> None:
    for method in ("random", "width"):
        for seed in (0, 1):
            prune(bench_cfg(folder, "task=lenet5_mnist", f"method={method}", "budget.factor=3", f"seed={seed}"))
    other = folder / "results-toy" / "latency" / "resnet20.json"  # another benchmark script's file: not a run
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_text(json.dumps({"network": "ResNet-20", "rows": []}))
    readme = folder / "README.md"
    readme.write_text(f"# a project\n\n{BEGIN}\nold table\n{END}\n\nmore text\n")
    first = report(folder, "results-toy", readme=readme)
    text, summary = (folder / "RESULTS.md").read_text(), readme.read_text()
    assert report(folder, "results-toy", readme=readme) == first and (folder / "RESULTS.md").read_text() == text
    assert readme.read_text() == summary and "old table" not in summary and summary.endswith("more text\n")
    lines = summary.splitlines()  # the folder also holds other tests' runs (other factors and seeds)
    header = next(line for line in lines if line.startswith("| method |")).split(" | ")
    row = next(line for line in lines if line.startswith("| random |")).split(" | ")
    assert row[header.index("macs 1/3")].endswith("(n=2)")
    command = re.search(r"`lightning-prune-bench -m task=lenet5_mnist method=random budget.cost=macs budget.factor=(\S+) seed=(\S+)`", row[-1])
    assert "3" in command[1].split(",") and {"0", "1"} <= set(command[2].split(","))
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="has no section between"):
        report(folder, "results-toy", readme=readme)
    assert text.count("<!-- bench:begin") == 1 and "| random | 2 |" in text and "| width | 2 |" in text
    assert "±" in text and (folder / "bench_lenet5_mnist.png").stat().st_size > 0


def test_a_dense_network_trained_elsewhere_is_imported(folder: Path, tmp_path: Path) -> None:
    source = folder / "checkpoints" / "lenet5_mnist-toy.pt"
    record = dense(bench_cfg(tmp_path, "stage=dense", "task=lenet5_mnist", f"dense_from={source}"))
    original = json.loads(source.with_suffix(".json").read_text())
    assert record["imported_from"] == str(source) and record["test_accuracy"] == original["test_accuracy"]
    imported = torch.load(tmp_path / "checkpoints" / "lenet5_mnist-toy.pt", weights_only=True)
    assert all(torch.equal(v, torch.load(source, weights_only=True)[k]) for k, v in imported.items())
    with pytest.raises(FileNotFoundError, match="dense_from: no file"):
        dense(bench_cfg(tmp_path / "other", "stage=dense", "task=lenet5_mnist", f"dense_from={tmp_path}/missing.pt"))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="dense_from: the weights .* do not fit"):
        dense(bench_cfg(tmp_path / "foreign", "stage=dense", "task=lenet5_mnist", f"dense_from={tmp_path}/foreign.pt"))


def test_dense_warm_restarts_continue_the_training_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    cfg = bench_cfg(tmp_path, "stage=dense", "task=lenet5_mnist")
    adam = dict(cfg.task.dense.optimizer)
    with open_dict(cfg):
        cfg.task.dense.restarts = [{"epochs": 5, "optimizer": {**adam, "lr": 0.02}},
                                   {"epochs": 7, "optimizer": {**adam, "lr": 0.005}}]
    assert bench_training.dense_epochs(cfg) == cfg.task.dense.epochs + 12
    calls = []
    original = bench_runner.fit
    monkeypatch.setattr(bench_runner, "fit", lambda c, dm, net, recipe, n, *a, **k: calls.append((recipe.optimizer.lr, n)) or original(c, dm, net, recipe, n, *a, **k))
    record = dense(cfg)
    assert calls == [(cfg.task.dense.optimizer.lr, 1), (0.02, 1), (0.005, 1)]  # toy size: 1 epoch each, in order
    assert record["epochs"] == 3 and [r["optimizer"]["lr"] for r in record["recipe"]["restarts"]] == [0.02, 0.005]
    with open_dict(cfg):
        cfg.task.dense.restarts = [{"optimizer": adam}]
    with pytest.raises(ValueError, match=r"task.dense.restarts\[0\]: a recipe needs 'epochs'"):
        bench_training.dense_epochs(cfg)
    with open_dict(cfg):
        cfg.task.dense.restarts = {"epochs": 5, "optimizer": adam}
    with pytest.raises(TypeError, match="task.dense.restarts: expected a list"):
        bench_training.dense_epochs(cfg)


def test_a_recipes_label_smoothing_reaches_the_training_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    from lightning_prune.classifier import ImageClassifier

    cfg = bench_cfg(tmp_path, "stage=dense", "task=lenet5_mnist")
    with open_dict(cfg):
        cfg.task.dense.label_smoothing = 0.2
    seen = []

    class Recording(ImageClassifier):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            seen.append(self.label_smoothing)
            return super().training_step(batch, batch_idx)

    monkeypatch.setattr(bench_training, "ImageClassifier", Recording)
    assert dense(cfg)["recipe"]["label_smoothing"] == 0.2
    assert seen and set(seen) == {0.2}


@pytest.mark.parametrize("precision", [None, "bf16-mixed"])
def test_a_tasks_precision_reaches_the_training_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path,
                                                     precision: str | None) -> None:
    from lightning_prune.classifier import ImageClassifier

    cfg = bench_cfg(tmp_path, "stage=dense", "task=lenet5_mnist")
    if precision is not None:
        with open_dict(cfg):
            cfg.task.precision = precision
    seen = []

    class Recording(ImageClassifier):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return super().training_step(batch, batch_idx)

    monkeypatch.setattr(bench_training, "ImageClassifier", Recording)
    record = dense(cfg)
    assert record["precision"] == (precision or "32-true")
    assert seen and set(seen) == {torch.bfloat16 if precision else None}


def test_the_resnet_tasks_train_in_bfloat16() -> None:
    for task in ("resnet20_cifar10", "resnet56_cifar10"):
        assert bench_cfg(Path("unused"), f"task={task}").task.precision == "bf16-mixed", task


def test_the_mixed_against_tied_table_pairs_runs_and_names_removed_blocks() -> None:
    def row(method: str, factor: float, acc: float, macs: int, widths: dict[str, int]) -> dict:
        return {"task": "resnet20_cifar10", "method": method, "cost": "volume", "factor": factor, "test_accuracy": acc,
                "volume": 100, "macs": macs, "widths": widths}

    full = {"conv1": 4, "layer1.0.conv1": 2, "layer1.0.conv2": 4, "layer2.0.conv1": 3, "layer2.0.conv2": 4, "fc": 10}
    mixed = {k: v for k, v in full.items() if not k.startswith("layer1.")}
    rows = [row("bar", 8, 78.0, 300, mixed), row("bar+tied", 8, 60.0, 200, full),
            row("bar", 4, 80.0, 500, full),  # no tied partner: no row
            row("random", 8, 50.0, 100, full)]
    text = residual_table(rows)
    table = [line for line in text.splitlines() if line.startswith("| resnet20_cifar10")]
    assert table == ["| resnet20_cifar10 | volume 1/8 | 1 / 1 | 78.00 | 60.00 | 100, 300 | 100, 200 | 1.50 | 2 layers (layer1.0) | -53%, -45% |"]
    assert residual_table(rows[2:]) == ""
    # a tied run with other settings than the mixed one (e.g. from before BAR's defaults changed) is no pair
    rows[0]["method_config"] = {"residual": "mixed", "soft_fraction": 0.1}
    rows[1]["method_config"] = {"residual": "tied", "soft_fraction": 0.5}
    assert residual_table(rows) == ""
    rows[1]["method_config"]["soft_fraction"] = 0.1
    assert [line for line in residual_table(rows).splitlines() if line.startswith("| resnet20_cifar10")] == table
