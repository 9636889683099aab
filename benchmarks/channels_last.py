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

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bar_overhead import MODELS, finish_timing, run, start_timing, timing_parser  # noqa: E402  (the sibling benchmark's timed Lightning epoch)


def main(argv: list[str] | None = None) -> dict:
    parser = timing_parser(Path(__file__).name, __doc__.splitlines()[0], steps=20, threads=1)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["lenet5", "resnet20", "vgg16"])
    parser.add_argument("--gates", action="store_true", help="train with BAR's gates (as in its soft phase)")
    args, context = start_timing(parser, argv)
    results = {}
    for model in args.models:
        times: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
        for _ in range(args.rounds):
            for layout in times:
                times[layout] += run(model, args.gates, args.steps, args.batch, channels_last=layout == "channels_last")
        median = {layout: 1000 * statistics.median(t) for layout, t in times.items()}  # ms
        results[model] = {"median_step_ms": median, "steps_timed": {layout: len(t) for layout, t in times.items()},
                          "speedup": median["contiguous"] / median["channels_last"]}
    record = finish_timing(args, context, gates=args.gates, models=results)
    load = record["load_average_1min"]
    print(f"## Channels-last batches: training-step time (batch {args.batch}{', with BAR gates' if args.gates else ''})\n")
    print(f"`{record['command']}`, {record['date']}, {record['machine']}, {args.threads} threads, "
          f"1-min load average {load['before']:.1f} -> {load['after']:.1f}\n")
    print("| network | contiguous step (ms) | channels-last step (ms) | speedup |\n|---|---:|---:|---:|")
    for model, r in results.items():
        m = r["median_step_ms"]
        print(f"| {model} | {m['contiguous']:.1f} | {m['channels_last']:.1f} | **{r['speedup']:.2f}x** |")
    return record

if __name__ == "__main__":
    main()
