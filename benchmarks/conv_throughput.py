"""How fast does this CPU run a narrow convolution? Multiply-accumulates per millisecond of a
3x3 convolution (``c`` -> ``c`` channels, bias, ``channels_last`` weights and input, as the
inference export runs it) at batch ``--batch`` on ``--threads`` threads, for ``c`` from 4 to 64
at the three feature-map sizes of the CIFAR ResNets (32, 16, 8).

This is the ceiling under the latency speed-up of pruning a narrow network: if a convolution
with 8 channels runs at half the throughput of one with 16, removing half of the channels of a
16-channel layer cuts its MACs 4x but its time only 2x. Timings: the fastest of ``--repeats``
calls after one warm-up (other processes only add time). One JSON file,
``benchmarks/results/latency/conv_throughput.json``.

Usage: ``python benchmarks/conv_throughput.py [--batch 256] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

from lightning_prune.core.cost.latency_measure import device_name

CHANNELS = (4, 8, 12, 16, 24, 32, 48, 64)
SIZES = (32, 16, 8)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latency" / "conv_throughput.json"


@torch.no_grad()
def fastest_ms(module: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    module(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(x)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if min(args.batch, args.threads, args.repeats) < 1:
        parser.error("--batch, --threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for size in SIZES:
        for c in CHANNELS:
            conv = torch.nn.Conv2d(c, c, 3, padding=1).to(memory_format=torch.channels_last).eval()
            x = torch.randn(args.batch, c, size, size).contiguous(memory_format=torch.channels_last)
            ms = fastest_ms(conv, x, args.repeats)
            macs = c * c * 9 * size * size * args.batch
            rows.append({"size": size, "channels": c, "ms": ms, "mmacs_per_ms": macs / 1e6 / ms})
    command = "python benchmarks/conv_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "rows": rows, "batch": args.batch, "threads": args.threads, "repeats": args.repeats, "command": command.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": device_name("cpu"),
        "load_average": os.getloadavg()[0], "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| feature map | " + " | ".join(f"{c} ch" for c in CHANNELS) + " |")
    print("|---|" + "---:|" * len(CHANNELS))
    for size in SIZES:
        cells = [f"{r['mmacs_per_ms']:.0f}" for r in rows if r["size"] == size]
        print(f"| {size}x{size} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
