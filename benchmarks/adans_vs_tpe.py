"""AdaNS-Gaussian against Optuna's TPE (hydra-optuna-sweeper) at the same number of evaluations.

Runs the candidate job ``python -m lightning_prune.search.evaluate`` under Hydra's Optuna
sweeper with the TPE sampler: one float parameter per dimension in [0, 1] (``+search.x.x<i>``),
``search.mode=score`` (the job returns the AdaNS score, and appends it to ``search.record``, computed with the original accuracy
measured by ``adans_table1.py`` on the same held-out images), ``n_trials`` = the number of
evaluations AdaNS-Gaussian launched in ``adans_table1.py`` (reference + boundary + samples).
TPE gets no boundary characterisation: it searches the whole cube, as a user of the Optuna
sweeper would; with ``--box`` it searches the box AdaNS's boundary characterisation found,
without paying for those evaluations. The best TPE point is then built for real and measured like the AdaNS winners.

    python benchmarks/adans_vs_tpe.py --table1 benchmarks/adans_table1.json --out benchmarks/adans_vs_tpe

(needs ``pip install hydra-optuna-sweeper``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lightning_prune import count_cost
from lightning_prune.search import job, plot_progress


def plot(adans_scores: list, tpe_scores: list, out: Path, sampler: str) -> None:
    # AdaNS's first evaluation is the original model (x = identity, score 1 / min_drop), which
    # is not a compression candidate: the curve starts with the boundary evaluations.
    plot_progress({f"AdaNS-{sampler} (boundary + search)": adans_scores[1:], "Optuna TPE": tpe_scores},
                  out.with_suffix(".png"), log_scale=True, title=f"AdaNS-{sampler} vs Optuna TPE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table1", required=True, help="JSON written by adans_table1.py")
    parser.add_argument("--sampler", default="gaussian", help="the AdaNS run of table1 to compare with")
    parser.add_argument("--out", default="benchmarks/adans_vs_tpe")
    parser.add_argument("--work", default=None, help="sweep folder (default: <out>_sweep)")
    parser.add_argument("--plot-only", action="store_true", help="redraw <out>.png from <out>.json")
    parser.add_argument("--box", action="store_true",
                        help="give TPE the box AdaNS found by boundary characterisation (for free) instead of the cube")
    args = parser.parse_args()
    table1 = json.loads(Path(args.table1).read_text())
    if args.plot_only:
        summary = json.loads(Path(args.out).with_suffix(".json").read_text())
        plot(table1["runs"][args.sampler]["log_scores"], summary["tpe_values"], Path(args.out), args.sampler)
        return
    t1 = table1["args"]
    adans = table1["runs"][args.sampler]
    trials = len(adans["log_scores"])
    d = len(table1["dimensions"])
    bounds = [(0.0, 1.0)] * d
    if args.box:
        theta = adans["theta"]
        rate = [n.startswith(("prune:", "sparse:")) for n in table1["dimensions"]]
        bounds = [(0.0, float(t)) if r else (float(t), 1.0) for t, r in zip(theta, rate)]
    out = Path(args.out)
    work = Path(args.work or f"{out}_sweep").resolve()
    record = Path(f"{work}.jsonl")
    record.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "lightning_prune.search.evaluate", "-m", "hydra/sweeper=optuna",
        "hydra/sweeper/sampler=tpe", f"hydra.sweeper.sampler.seed={t1['seed']}", f"hydra.sweeper.n_trials={trials}",
        "hydra.sweeper.n_jobs=1", "hydra.sweeper.direction=maximize", f"hydra.sweep.dir={work}", f"search.record={record}", f"data={t1['data']}", f"model={t1['model']}",
        "data.num_workers=0", f"search.checkpoint={t1['checkpoint']}", f"search.cost={t1['cost']}",
        f"search.eval_size={t1['eval_size']}", f"search.rank_size={t1['rank_size']}", "search.mode=score",
        f"search.reference_accuracy={table1['reference']['accuracy']}", f"search.threshold={t1['threshold']}",
        f"search.threads={t1['threads'] or torch.get_num_threads()}", "search.x={}",
    ] + [f"+search.x.x{i}=interval({lo!r},{hi!r})" for i, (lo, hi) in enumerate(bounds)]
    print(" ".join(cmd[1:]))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t

    import yaml

    values = [json.loads(line)["score"] for line in record.read_text().splitlines()]
    best = yaml.safe_load((work / "optimization_results.yaml").read_text())
    x = np.array([best["best_params"][f"+search.x.x{i}"] for i in range(d)])
    best_value = float(best["best_value"])
    if abs(best_value - max(values)) > 1e-9 * max(values):
        raise RuntimeError(f"the recorded scores (max {max(values)}) do not match Optuna's best value {best_value}")
    # The winner, measured like the AdaNS winners (same evaluator, same images).
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lightning_prune.configs import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir("search")), version_base="1.3"):
        cfg = compose("adans", overrides=[
            f"data={t1['data']}", f"model={t1['model']}", "data.num_workers=0", f"search.checkpoint={t1['checkpoint']}",
            f"search.cost={t1['cost']}", f"search.eval_size={t1['eval_size']}", f"search.rank_size={t1['rank_size']}",
            f"data.data_dir={os.environ.get('LP_DATA_DIR', './data')}"])
    ev = job.evaluator(cfg)
    result = ev.evaluate(x)
    model = ev.space.compress(x)
    measured = count_cost(model, ev.space.example_input).macs
    ev.datamodule.setup("test")
    test = job.loader_accuracy(model, ev.datamodule.test_dataloader())
    summary = {
        "date": started, "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
        "command": " ".join(cmd[1:]), "box": bounds, "trials": trials, "seconds": seconds, "tpe_best_score": best_value,
        "tpe_best_x": x.tolist(), "tpe_accuracy": result["accuracy"], "tpe_measured_macs": measured,
        "tpe_macs_fraction": measured / ev.base_cost, "tpe_test_accuracy": test, "tpe_values": values,
        "adans": {"sampler": args.sampler, "score": adans["best"]["score"], "accuracy": adans["held_out_accuracy_real_model"],
                  "macs_fraction": adans["measured_macs"] / table1["base_macs"], "test_accuracy": adans["test_accuracy"],
                  "evaluations": trials, "seconds": adans["seconds"]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    plot(adans["log_scores"], values, out, args.sampler)
    print("| method | evaluations | score | accuracy held-out (%) | accuracy test (%) | MACs (%) |")
    print("|---|---:|---:|---:|---:|---:|")
    a = summary["adans"]
    print(f"| AdaNS-{args.sampler} | {trials} | {a['score']:.3f} | {a['accuracy']:.1f} | {a['test_accuracy']:.1f} | "
          f"{100 * a['macs_fraction']:.1f} |")
    print(f"| Optuna TPE | {len(values)} | {best_value:.3f} | {result['accuracy']:.1f} | {test:.1f} | "
          f"{100 * measured / ev.base_cost:.1f} |")
    print(f"TPE sweep wall time {seconds:.0f} s; load average {load_before:.1f} -> {summary['load_average_after']:.1f}")


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
