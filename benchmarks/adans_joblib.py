"""Speed-up of the adans sweeper with two joblib workers over one.

Runs the same short AdaNS sweep (``hparams_search=adans_resnet20``, no boundary
characterisation, no final job) twice through Hydra's joblib launcher, with
``hydra.launcher.n_jobs`` = 1 and 2 and one torch thread per job (``search.threads=1``), and
reports the wall time of each whole sweep (start-up, data and model loading in every worker,
all evaluations). Both sweeps evaluate the same points (same seed); the script checks that
they find the same best point.

    python benchmarks/adans_joblib.py --checkpoint <resnet20 .ckpt> --threshold 65 --batch 10 --iterations 3

(needs ``pip install hydra-joblib-launcher``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--threshold", type=float, required=True)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--work", default="/tmp/adans_joblib")
    parser.add_argument("--out", default="benchmarks/adans_joblib.json")
    args = parser.parse_args()
    results = {}
    for n in [int(w) for w in args.workers.split(",")]:
        sweep = Path(args.work) / f"workers{n}"
        cmd = [
            sys.executable, "-m", "lightning_prune.search.evaluate", "-m", "hparams_search=adans_resnet20",
            f"search.checkpoint={args.checkpoint}", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={n}",
            "search.threads=1", f"search.eval_size={args.eval_size}", f"hydra.sweeper.batch_size={args.batch}",
            f"hydra.sweeper.iterations={args.iterations}", "hydra.sweeper.boundary_steps=null",
            "hydra.sweeper.init=uniform", "hydra.sweeper.final_overrides=null", "hydra.sweeper.progress=false",
            f"hydra.sweeper.threshold={args.threshold}", f"hydra.sweep.dir={sweep}",
        ]
        load = os.getloadavg()[0]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        opt = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
        results[n] = {"seconds": seconds, "evaluations": opt["evaluations"], "best_score": opt["best_score"],
                      "best_x": opt["best_x"], "load_average_before": load, "load_average_after": os.getloadavg()[0],
                      "command": " ".join(cmd[1:])}
        print(f"{n} worker(s): {seconds:.1f} s for {opt['evaluations']} evaluations "
              f"(load {load:.1f} -> {results[n]['load_average_after']:.1f})", flush=True)
    counts = sorted(results)
    if len({json.dumps(results[n]["best_x"]) for n in counts}) != 1:
        raise RuntimeError("the sweeps found different best points; they should evaluate the same points")
    base = results[counts[0]]["seconds"]
    for n in counts:
        results[n]["speedup"] = base / results[n]["seconds"]
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                          "cpus": os.cpu_count(), "runs": results}, indent=1))
    print("| joblib workers | evaluations | wall time (s) | speed-up |")
    print("|---:|---:|---:|---:|")
    for n in counts:
        r = results[n]
        print(f"| {n} | {r['evaluations']} | {r['seconds']:.1f} | {r['speedup']:.2f} |")


if __name__ == "__main__":
    main()
