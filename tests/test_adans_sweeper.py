"""The ``adans`` Hydra sweeper: discovery, a two-iteration sweep, joblib, resume after a kill.

The sweeps run a tiny Hydra app (written to a temporary folder) in a subprocess, as a user
would: its task function reads ``search.x`` and returns the accuracy and cost of a known
synthetic "model", and appends every evaluated point to a log file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper

APP = '''
import json, os
from pathlib import Path

import hydra
import numpy as np


def accuracy(x):
    relu = lambda v: max(v, 0.0)
    loss = 40 * relu(x[0] - 0.2) ** 2 + 100 * relu(x[1] - 0.1) ** 3 + 20 * relu(0.7 - x[2]) + 5 * relu(x[3] - 0.5)
    return max(10.0, 90.0 - loss)


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg):
    x = [float(v) for v in cfg.search.x]
    log = Path(cfg.log_file)
    with log.open("a") as fh:
        fh.write(json.dumps({"x": x, "mode": cfg.search.mode, "pid": os.getpid()}) + "\\n")
    kill_after = int(os.environ.get("ADANS_TEST_KILL_AFTER", "0"))
    if kill_after and len(log.read_text().splitlines()) >= kill_after:
        os.kill(os.getpid(), 9)  # the whole sweep dies, like a killed job on a workstation
    cost = 1000.0 * float(np.mean([1 - x[0], 1 - x[1], x[2], 1 - x[3]]))
    if cfg.search.mode == "final":
        return {"exported": True, "accuracy": accuracy(x), "cost": cost}
    return {"accuracy": accuracy(x), "cost": cost}


if __name__ == "__main__":
    main()
'''

CONFIG = '''
defaults:
  - _self_
  - override hydra/sweeper: adans

log_file: ???
search:
  mode: evaluate
  x: null
  space:
    _target_: lightning_prune.search.SearchSpace.of
    kinds: [rate, rate, rank, rate]
    names: [conv1, conv2, fc1, fc2]

hydra:
  sweeper:
    sampler: gaussian
    batch_size: 6
    iterations: 2
    threshold: 80.0
    boundary_steps: 3
    seed: 3
    progress: false
  job:
    chdir: false
'''


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("app")
    (folder / "app.py").write_text(APP)
    (folder / "config.yaml").write_text(CONFIG)
    return folder


def run_sweep(app: Path, sweep_dir: Path, log: Path, *overrides: str, kill_after: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, ADANS_TEST_KILL_AFTER=str(kill_after), HYDRA_FULL_ERROR="1")
    cmd = [sys.executable, str(app / "app.py"), "-m", f"hydra.sweep.dir={sweep_dir}", f"log_file={log}", *overrides]
    return subprocess.run(cmd, cwd=app, env=env, capture_output=True, text=True, timeout=300)


def evaluated(log: Path) -> list[tuple[float, ...]]:
    return [tuple(json.loads(line)["x"]) for line in log.read_text().splitlines() if json.loads(line)["mode"] == "evaluate"]


@pytest.fixture(scope="module")
def straight(app: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One uninterrupted two-iteration sweep with the basic launcher: (sweep dir, log, process)."""
    folder = tmp_path_factory.mktemp("straight")
    proc = run_sweep(app, folder / "sweep", folder / "log.jsonl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "sweep", folder / "log.jsonl", proc


def test_hydra_discovers_the_adans_sweeper() -> None:
    names = [p.__name__ for p in Plugins.instance().discover(Sweeper)]
    assert "AdaNSSweeper" in names
    repo = ConfigStore.instance().repo["hydra"]["sweeper"]
    assert "adans.yaml" in repo
    node = repo["adans.yaml"].node
    assert node.sampler == "gaussian" and node.batch_size == 50 and node.alpha_max == 0.95


def test_two_iteration_sweep(straight: tuple[Path, Path, subprocess.CompletedProcess]) -> None:
    sweep, log, proc = straight
    points = evaluated(log)
    state = json.loads((sweep / "adans_state.json").read_text())
    search = state["search"]
    assert search["phase"] == "done" and len(search["ada"]["scores"]) == 2 * 6
    # reference + boundary rounds (4 extremes, then 3 bisection rounds of the 3 open dims) + AdaNS points
    assert points[0] == (0.0, 0.0, 1.0, 0.0)
    assert len(points) == len(set(points)) == 1 + 4 + 3 * 3 + len({tuple(x) for x in search["ada"]["xs"]})
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "adans" and results["iterations"] == 2
    assert results["reference"] == {"accuracy": 90.0, "cost": 1000.0}
    assert results["names"] == ["conv1", "conv2", "fc1", "fc2"]
    # theta after 3 bisection rounds, on the safe side of the exact boundaries (0.7, 0.564, 0.2, 1)
    assert results["theta"] == [0.625, 0.5, 0.25, 1.0]
    assert results["best_accuracy"] > 80.0 and results["best_cost_fraction"] < 1.0
    assert results["final"]["exported"] is True and results["final"]["accuracy"] == results["best_accuracy"]
    assert (sweep / "adans_progress.png").stat().st_size > 0
    # every job wrote its result next to its outputs
    assert len(list(sweep.rglob("adans_result.json"))) == len(points) + 1
    assert "AdaNS summary" in proc.stderr + proc.stdout


def test_sweep_with_the_joblib_launcher(app: Path, straight: tuple, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    log = tmp_path / "parallel.jsonl"
    proc = run_sweep(app, tmp_path / "parallel", log, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Same seed, same results, whatever the launcher: the same points in the same batches.
    assert sorted(evaluated(log)) == sorted(evaluated(straight[1]))
    pids = {json.loads(line)["pid"] for line in log.read_text().splitlines()}
    assert len(pids) >= 2  # the jobs ran in worker processes


def test_resume_after_a_killed_sweep(app: Path, straight: tuple, tmp_path: Path) -> None:
    straight_points = evaluated(straight[1])
    sweep, log = tmp_path / "killed", tmp_path / "killed.jsonl"
    kill_at = len(straight_points) - 3  # in the middle of the last AdaNS batch
    proc = run_sweep(app, sweep, log, kill_after=kill_at)
    assert proc.returncode != 0
    assert len(evaluated(log)) == kill_at
    state = json.loads((sweep / "adans_state.json").read_text())
    assert state["search"]["phase"] == "search" and state["search"]["batch"] is not None

    proc = run_sweep(app, sweep, log)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not launched again" in proc.stderr + proc.stdout
    points = evaluated(log)
    # The job that was killed runs again; nothing that had finished does.
    assert len(points) == len(straight_points) + 1
    assert points[kill_at - 1] == points[kill_at]
    assert sorted(set(points)) == sorted(straight_points)
    a = yaml.safe_load((straight[0] / "optimization_results.yaml").read_text())
    b = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert (a["best_x"], a["best_score"]) == (b["best_x"], b["best_score"])
    # Running the finished sweep again launches nothing.
    before = len(log.read_text().splitlines())
    assert run_sweep(app, sweep, log).returncode == 0
    assert len(log.read_text().splitlines()) == before


def test_sweep_errors_are_clear(app: Path, tmp_path: Path) -> None:
    from hydra_plugins.adans_sweeper.adans_sweeper import AdaNSSweeper

    with pytest.raises(ValueError, match="sampler must be one of"):
        AdaNSSweeper(sampler="bayes")
    with pytest.raises(ValueError, match="p_cross"):
        AdaNSSweeper(sampler="genetic", sampler_options={"p_cross": 3})
    with pytest.raises(ValueError, match="max_batch_size"):
        AdaNSSweeper(max_batch_size=0)
    proc = run_sweep(app, tmp_path / "s2", tmp_path / "l2", "search.mode=a,b")
    assert proc.returncode != 0 and "not supported" in proc.stderr
    assert not (tmp_path / "l2").exists()  # rejected before any job ran


def _sweeper_and_search():
    """An AdaNSSweeper and a CompressionSearch with the settings of CONFIG (no Hydra run)."""
    from hydra_plugins.adans_sweeper.adans_sweeper import AdaNSSweeper
    from lightning_prune.search import CompressionSearch, SearchSpace, make_sampler

    sweeper = AdaNSSweeper(sampler="gaussian", batch_size=6, iterations=2, threshold=80.0, boundary_steps=3, seed=3,
                           final_overrides=["search.mode=final"], progress=False)
    space = SearchSpace.of(kinds=["rate", "rate", "rank", "rate"], names=["conv1", "conv2", "fc1", "fc2"])
    return sweeper, CompressionSearch(space, make_sampler("gaussian"), **sweeper.settings)


def test_a_corrupt_state_file_names_itself_and_the_way_out(straight: tuple, tmp_path: Path) -> None:
    good = (straight[0] / "adans_state.json").read_text()
    path = tmp_path / "adans_state.json"
    sweeper, search = _sweeper_and_search()
    sweeper.state_path = path
    path.write_text(good)
    sweeper._load(search)  # the real state loads
    assert search.done and sweeper.job_idx == json.loads(good)["job_idx"]
    broken = json.loads(good)
    del broken["search"]["ada"]["xs"]
    cases = {
        good[: len(good) // 2]: "not valid JSON",  # truncated
        "[1, 2]": "JSON list, not an object",
        json.dumps({**json.loads(good), "job_idx": "seven"}): "'job_idx' must be an int, got str",
        json.dumps(broken): "cannot be resumed",
    }
    for text, words in cases.items():
        path.write_text(text)
        sweeper, search = _sweeper_and_search()
        sweeper.state_path = path
        with pytest.raises(ValueError) as info:
            sweeper._load(search)
        message = str(info.value)
        assert str(path.resolve()) in message and words in message and f"delete {path.resolve()}" in message


def test_finished_jobs_keep_only_this_sweeps_evaluations(straight: tuple, tmp_path: Path) -> None:
    sweep, log, _ = straight
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    sweeper, _ = _sweeper_and_search()
    sweeper.sweep_dir = copy
    points = evaluated(log)
    evaluations, finals, last = sweeper._finished_jobs([f"log_file={log}"])
    assert sorted(evaluations) == sorted(points) and len(finals) == 1 and last == len(points)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_x"]
    assert finals[tuple(best)]["exported"] is True and "exported" not in evaluations[tuple(best)]
    # jobs run with other overrides (another task config) are not this sweep's results
    assert sweeper._finished_jobs([f"log_file={tmp_path / 'other.jsonl'}"])[:2] == ({}, {})
    # records of an earlier version (no job number, no overrides): all evaluations, the first job of a point wins
    for path in copy.rglob("adans_result.json"):
        record = json.loads(path.read_text())
        path.write_text(json.dumps({"x": record["x"], "result": record["result"]}))
    (copy / "0" / "adans_result.json").write_text('{"x": [0.0, 0.')  # killed while writing: skipped
    evaluations, finals, last = sweeper._finished_jobs(["anything=1"])
    assert len(evaluations) == len(points) - 1 and not finals and last == len(points)
    assert "exported" not in evaluations[tuple(best)]


def test_a_lost_state_file_is_rebuilt_from_the_job_results(app: Path, straight: tuple, tmp_path: Path) -> None:
    sweep, log, _ = straight
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    (copy / "adans_state.json").unlink()
    lines = log.read_text()
    proc = run_sweep(app, copy, log)  # the same overrides as the straight sweep (log_file=<its log>)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rebuilding the sweep state from the" in proc.stderr + proc.stdout
    assert log.read_text() == lines  # no job ran again, the final job included
    # The replay reproduces the lost state exactly (history, box, sampler and generator state, final result).
    assert json.loads((copy / "adans_state.json").read_text()) == json.loads((sweep / "adans_state.json").read_text())
    assert yaml.safe_load((copy / "optimization_results.yaml").read_text()) == yaml.safe_load(
        (sweep / "optimization_results.yaml").read_text()
    )
