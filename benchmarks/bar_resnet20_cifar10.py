"""BAR on ResNet-20 / CIFAR-10 against the width-multiplier and random-pruning baselines of
Lemaire, Achkar and Jodoin, "Structured Pruning of Neural Networks with Budget-Aware
Regularization" (CVPR 2019, arXiv:1811.09332; the baselines' scheme is in its supplementary
material, Sec. 3.2, the comparison in Table 1), at volume factors 2, 4, 8, 16, every run with the
same epochs.

Every run is the user command ``python -m lightning_prune.train experiment=bar_resnet20_cifar10
...`` (a 10,000-image training subset, 17 epochs: 10 with gates / dense, hard pruning at epoch
10, 7 more on the shrunk network, the learning rate 10x lower for the last 2; no validation
passes, ``trainer.limit_val_batches=0``, since nothing here selects on them):

- ``bar``: BudgetAwareRegularization + SigmoidalBudgetAnnealing + HardPruning (``pruning=bar``
  defaults); ``bar_gate_lr_0.005``: the same with the gates' learning rate 4x lower;
- ``random``: ``pruning=random`` (RandomPruning: the dense network trains 10 epochs, then channels
  chosen at random are dropped until the budget is met, and the shrunk network trains on);
- ``width``: ``~pruning model.width=w``, the largest width multiplier (on a 1/256 grid) whose
  network is within the budget, trained for the 17 epochs;
- not in the default list, with ``--init-from <trained ResNet-20 .ckpt>``: ``bar_from_trained``
  (BAR from the trained network, distilling from it) and ``random_from_trained`` (the random
  baseline from the same weights), same 17 epochs.

The activation volume (output elements of every convolution and linear layer, per image) is
counted with ``count_cost`` on the final network (the exported ``pruned_model.pt``, or the
width-scaled ResNet-20), against the budget full / factor.

    python benchmarks/bar_resnet20_cifar10.py run --out /work/runs_r20 [--threads 1]   # in 2 processes
    python benchmarks/bar_resnet20_cifar10.py table --out /work/runs_r20

``run`` claims each run by creating ``<out>/<method>_f<factor>/claimed`` and skips runs that
another process claimed, so several processes can work through the same list; after an
interruption, delete the folders without ``result.json`` and start again. ``table`` prints
the Markdown table of RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from lightning_prune import count_cost, load_pruned
from lightning_prune.core.cost.measure import output_widths
from lightning_prune.models import CifarResNet

# method -> overrides on top of the common ones ("width" adds its width multiplier)
VARIANTS = {
    "bar": [],
    "bar_gate_lr_0.005": ["pruning.bar.gate_lr=0.005"],
    "random": ["pruning=random", "pruning.prune_epoch=10"],
    "width": ["~pruning"],
    # from a trained network (--init-from), not in the default list
    "bar_from_trained": ["init_from={init_from}", "pruning.bar.distillation=true"],
    "random_from_trained": ["init_from={init_from}", "pruning=random", "pruning.prune_epoch=10"],
}
DEFAULT_VARIANTS = ("bar", "bar_gate_lr_0.005", "random", "width")
FACTORS = (2, 4, 8, 16)
EXAMPLE = torch.zeros(1, 3, 32, 32)


FULL_VOLUME = count_cost(CifarResNet(20), EXAMPLE).volume


def width_for(factor: int) -> float:
    """The largest width multiplier, on a 1/256 grid, whose ResNet-20 is within full / factor."""
    target = FULL_VOLUME / factor
    best = None
    for k in range(1, 257):
        w = k / 256
        if count_cost(CifarResNet(20, width=w), EXAMPLE).volume <= target:
            best = w
    if best is None:
        raise ValueError(f"no width multiplier meets volume factor {factor}")
    return best


def overrides(method: str, factor: int, run_dir: Path, init_from: str | None = None, width: float | None = None) -> list[str]:
    common = ["experiment=bar_resnet20_cifar10", f"budget.factor={factor}", "data.num_workers=0",
              "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]
    extra = [o.format(init_from=init_from) for o in VARIANTS[method]]
    if width is not None:
        extra.append(f"model.width={width}")
    return common + extra


def read_test_accuracy(run_dir: Path) -> float:
    for path in run_dir.rglob("metrics.csv"):
        with path.open() as f:
            values = [row["test/acc"] for row in csv.DictReader(f) if row.get("test/acc")]
        if values:
            return float(values[-1])
    raise FileNotFoundError(f"no test/acc in {run_dir}/**/metrics.csv")


def run_one(method: str, factor: int, out: Path, threads: int, init_from: str | None) -> None:
    run_dir = (out / f"{method}_f{factor}").resolve()
    result_path = run_dir / "result.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:  # claimed by this process (several processes can share one --out)
        os.close(os.open(run_dir / "claimed", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    width = width_for(factor) if method == "width" else None
    args = overrides(method, factor, run_dir, init_from, width)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    load_before = os.getloadavg()[0]
    with (run_dir / "stdout.log").open("w") as log:
        subprocess.run([sys.executable, "-m", "lightning_prune.train", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                       check=True)
    seconds = time.perf_counter() - t0
    net = CifarResNet(20, width=width) if width is not None else load_pruned(run_dir / "pruned_model.pt")
    cost = count_cost(net, EXAMPLE)
    result = {
        "method": method, "factor": factor, "overrides": args, "started": started, "seconds": seconds,
        "load_average_before": load_before, "load_average_after": os.getloadavg()[0], "threads": threads,
        "test_accuracy": read_test_accuracy(run_dir), "volume": cost.volume, "full_volume": FULL_VOLUME,
        "macs": cost.macs, "params": cost.params, "widths": output_widths(net),
    }
    result_path.write_text(json.dumps(result, indent=1))
    print(f"{method} factor {factor}: test accuracy {100 * result['test_accuracy']:.2f}%, volume {cost.volume:,} "
          f"(budget {result['full_volume'] / factor:,.0f}), {seconds:.0f} s", flush=True)


def table(out: Path) -> str:
    results = {(r["method"], r["factor"]): r for r in (json.loads(p.read_text()) for p in out.glob("*/result.json"))}
    if not results:
        raise FileNotFoundError(f"no */result.json under {out}")
    full = next(iter(results.values()))["full_volume"]
    methods = [m for m in VARIANTS if any(k[0] == m for k in results)]
    lines = ["| volume factor | budget (volume) | " + " | ".join(f"{m}: test acc % (volume, MACs)" for m in methods) + " |",
             "|---:|---:|" + "---|" * len(methods)]
    for factor in FACTORS:
        cells = []
        for m in methods:
            r = results.get((m, factor))
            cells.append("-" if r is None else f"**{100 * r['test_accuracy']:.2f}** ({r['volume']:,}, {r['macs']:,})")
        lines.append(f"| {factor} | {full / factor:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "table"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--init-from", default=None, help="trained ResNet-20 checkpoint for the *_from_trained methods")
    parser.add_argument("--factors", default=",".join(map(str, FACTORS)))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.command == "table":
        print(table(args.out))
        return
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(VARIANTS):
        raise ValueError(f"--methods: unknown {sorted(unknown)}; choose from {VARIANTS}")
    if any(m.endswith("_from_trained") for m in methods) and not args.init_from:
        raise ValueError("--init-from: the *_from_trained methods need a trained ResNet-20 checkpoint")
    factors = [int(f) for f in args.factors.split(",")]
    for method, factor in [(m, f) for f in factors for m in methods]:
        run_one(method, factor, args.out, args.threads, args.init_from)


if __name__ == "__main__":
    main()
