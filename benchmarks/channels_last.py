"""Training-step time with channels-last image batches over contiguous (NCHW) ones, measured in one run.

The datamodules' ``channels_last=True`` lays every image batch out channels-last (NHWC) after the
transfer to the device; the convolutions then run channels-last through the network. This script
trains each network for one epoch of random images through Lightning, once with contiguous and
once with channels-last batches, alternating (contiguous, channels-last, contiguous, ...) so that
load from other processes affects both alike, and reports the ratio of the median step times
(forward, backward, optimizer step; with ``--gates`` also BAR's gates, penalty and gate step).

Usage: ``python benchmarks/channels_last.py [--models lenet5 resnet20 vgg16] [--rounds 3] [--steps 20]
[--batch 128] [--threads 1] [--gates] [--out file.json]``; prints a Markdown table (and, with ``--out``,
writes the medians and the run's context as JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bar_overhead import MODELS, WARMUP_STEPS, run  # noqa: E402  (the sibling benchmark's timed Lightning epoch)
from shrink_speedup import _cpu_name  # noqa: E402  (the sibling benchmark script's machine name)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["lenet5", "resnet20", "vgg16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gates", action="store_true", help="train with BAR's gates (as in its soft phase)")
    parser.add_argument("--out", type=Path, default=None, help="also write the medians and the run's context to this JSON file")
    args = parser.parse_args(argv)
    if min(args.rounds, args.batch, args.threads) < 1 or args.steps <= WARMUP_STEPS:
        parser.error(f"--rounds, --batch and --threads must be >= 1, --steps above {WARMUP_STEPS} (the untimed warm-up steps of each run)")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    started = datetime.datetime.now().astimezone()
    results = {}
    for model in args.models:
        times: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
        for _ in range(args.rounds):
            for layout in times:
                times[layout] += run(model, args.gates, args.steps, args.batch, channels_last=layout == "channels_last")
        median = {layout: 1000 * statistics.median(t) for layout, t in times.items()}  # ms
        results[model] = {"median_step_ms": median, "steps_timed": {layout: len(t) for layout, t in times.items()},
                          "speedup": median["contiguous"] / median["channels_last"]}
    load_after = os.getloadavg()[0]
    command = f"python benchmarks/channels_last.py {' '.join(sys.argv[1:] if argv is None else argv)}".strip()
    print(f"## Channels-last batches: training-step time (batch {args.batch}{', with BAR gates' if args.gates else ''})\n")
    print(f"`{command}`, {started:%Y-%m-%d %H:%M %Z}, {_cpu_name()}, {args.threads} threads, "
          f"1-min load average {load:.1f} -> {load_after:.1f}\n")
    print("| network | contiguous step (ms) | channels-last step (ms) | speedup |\n|---|---:|---:|---:|")
    for model, r in results.items():
        m = r["median_step_ms"]
        print(f"| {model} | {m['contiguous']:.1f} | {m['channels_last']:.1f} | **{r['speedup']:.2f}x** |")
    record = {
        "command": command, "date": f"{started:%Y-%m-%d %H:%M %Z}", "machine": _cpu_name(), "torch": torch.__version__,
        "batch": args.batch, "threads": args.threads, "rounds": args.rounds, "steps": args.steps, "gates": args.gates,
        "load_average_1min": {"before": load, "after": load_after}, "models": results,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
