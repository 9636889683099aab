"""How well does the latency model predict the latency of pruned networks it was not fitted to?

For ResNet-20 (tied and mixed-connectivity residual blocks) and the CIFAR VGG-16, on 32x32
inputs: ``lightning_prune.measure_latency`` measures the dense network's latency model at
``--batch`` and ``--threads`` (its own cache folder under ``--out``, so every run measures
afresh), then networks with a random ``f`` of every group's channels kept (``f`` = 0.15 ...
0.9, ``--seeds`` draws each; none is one of the four calibration networks) are shrunk,
exported in their inference form and timed interleaved with ``time_network`` (the fastest of
``--repeats``), next to the model's prediction (``CostModel(graph, latency=table).exact``).

Reported per network: predicted and measured milliseconds per batch, their ratio, and the MAC
ratio dense / pruned; summary: the median and the largest |predicted / measured - 1|. One JSON
file per model goes to ``--out`` (``benchmarks/results/latency/model_<model>.json``).

Usage: ``python benchmarks/latency_model.py [--batch 256] [--threads 1] [--models resnet20 resnet20_mixed vgg16]``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import lightning_prune
from lightning_prune import CostModel, build_graph, count_cost, export, measure_latency, random_masks, shrink_as_masked
from lightning_prune.core.cost.latency_measure import device_name, time_network
from lightning_prune.models import CifarResNet, CifarVGG

MODELS = {
    "resnet20": (lambda: CifarResNet(20), "tied"),
    "resnet20_mixed": (lambda: CifarResNet(20), "mixed"),
    "vgg16": (lambda: CifarVGG(), "tied"),
}
FRACTIONS = (0.15, 0.3, 0.4, 0.6, 0.8, 0.9)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latency"


def measure(name: str, args: argparse.Namespace, command: str) -> dict:
    factory, residual = MODELS[name]
    torch.manual_seed(args.seed)
    dense = factory().eval()
    example = torch.zeros(1, 3, 32, 32)
    graph = build_graph(dense, example, residual=residual)
    with tempfile.TemporaryDirectory() as cache:
        table = measure_latency(dense, graph, batch_size=args.batch, threads=args.threads, repeats=args.repeats, cache_dir=cache)
    model = CostModel(graph, latency=table)
    generator = torch.Generator().manual_seed(args.seed)
    networks, rows = {}, []
    for fraction in FRACTIONS:
        for seed in range(args.seeds):
            masks = random_masks(graph, fraction, generator)
            net = copy.deepcopy(dense)
            shrink_as_masked(net, masks, graph=graph)
            key = f"{fraction:g}/{seed}"
            networks[key] = export(net, inference=True, example_input=example)
            rows.append({"fraction": fraction, "draw": seed, "predicted_ms": model.exact(masks, "latency") / 1e6,
                         "macs": count_cost(net.eval(), example).macs})
    networks["dense"] = export(dense, inference=True, example_input=example)
    timed = time_network(networks, table, example, repeats=args.repeats)
    for row in rows:
        row["measured_ms"] = timed[f"{row['fraction']:g}/{row['draw']}"] / 1e6
        row["predicted_over_measured"] = row["predicted_ms"] / row["measured_ms"]
    errors = [abs(r["predicted_over_measured"] - 1) for r in rows]
    return {
        "model": name, "residual": residual, "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
        "dense": {"predicted_ms": model.full("latency") / 1e6, "measured_ms": timed["dense"] / 1e6,
                  "macs": count_cost(dense, example).macs},
        "fit": {"offset_ms": table.offset / 1e6, "per_volume_ns": table.per_volume, "per_scatter_ns": table.per_scatter,
                "layer_scale": table.layer_scale,
                "calibration_measured_ms": {k: v / 1e6 for k, v in table.measured.items()},
                "calibration_predicted_ms": {k: v / 1e6 for k, v in table.predicted.items()}},
        "rows": rows,
        "median_abs_error": statistics.median(errors), "max_abs_error": max(errors),
        "command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": device_name("cpu"), "load_average": os.getloadavg()[0], "torch": torch.__version__,
        "lightning_prune": lightning_prune.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seeds", type=int, default=2, help="random draws per kept fraction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if min(args.batch, args.threads, args.repeats, args.seeds) < 1:
        parser.error("--batch, --threads, --repeats and --seeds must be >= 1")
    command = "python benchmarks/latency_model.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    print("| model | kept | draw | MAC ratio | predicted ms | measured ms | predicted / measured |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        result = measure(name, args, command.strip())
        (args.out / f"model_{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        dense = result["dense"]
        print(f"| {name} | dense | | 1.00 | {dense['predicted_ms']:.2f} | {dense['measured_ms']:.2f} | "
              f"{dense['predicted_ms'] / dense['measured_ms']:.2f} |")
        for r in result["rows"]:
            print(f"| {name} | {r['fraction']:g} | {r['draw']} | {dense['macs'] / r['macs']:.2f} | {r['predicted_ms']:.2f} | "
                  f"{r['measured_ms']:.2f} | {r['predicted_over_measured']:.2f} |")
        print(f"| {name} | median abs. error {result['median_abs_error']:.1%}, max {result['max_abs_error']:.1%} | | | | | |", flush=True)


if __name__ == "__main__":
    main()
