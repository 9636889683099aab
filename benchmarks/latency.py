"""Latency of pruned networks in three runtimes: does a 2x / 4x MAC reduction make inference faster?

For ResNet-20 (``CifarResNet(20)``), the CIFAR VGG-16 (``CifarVGG()``) and MobileNetV2
(torchvision's, ``num_classes=10``; ``lightning_prune.models`` has none) on 32x32 inputs, the
dense network and two pruned ones: channels dropped at random until the network has at most
1/2 and 1/4 of the dense MACs (``PruningSession`` with ``RandomChoice``, ``cost="macs"``,
``factor`` 2 and 4, then ``harden``: physically shrunk). Each of the three networks runs in

- ``eager``: PyTorch eager mode, the plain export (``lightning_prune.export(net)``);
- ``inference``: the inference export (``export(net, inference=True)``: batch norms folded
  into the layers before them, convolution weights ``channels_last``); the input stays NCHW;
- ``onnxruntime``: the file written by ``lightning_prune.export_onnx`` (inference form,
  checked against PyTorch), run in ONNX Runtime's CPU provider with ``--threads`` intra-op
  threads and one inter-op thread,

at batch 1 and 256, eval mode, no grad. Timing: ``torch.set_num_threads(--threads)``; warm-up
runs, then rounds in which each of the nine (runtime, network) callables runs once,
interleaved, so that load from other processes affects all alike; medians per callable.

Reported as ratios of medians from the same process only, never absolute times across runs:

- ``speedup`` = dense / pruned latency within one runtime, next to the ``mac_ratio`` = dense /
  pruned MACs (``count_cost``), and ``speedup / mac_ratio`` (1: latency falls as fast as MACs);
- ``inference_over_eager`` and ``onnxruntime_over_eager`` = eager / other latency of the same
  network (above 1: the export is faster).

``spread``: the larger relative interquartile range, (p75 - p25) / median, of the two timings
in a ratio, to judge noise. One JSON file per network goes to ``--out``
(``benchmarks/results/latency/<network>.json``; ``--toy`` runs write ``<network>-toy.json``);
an existing file is kept and only reported unless ``--force``. The medians are in the file too
(``median_ms``), for this run's context only.

Usage: ``python benchmarks/latency.py [--threads 1] [--models resnet20 vgg16 mobilenet_v2]
[--force]``; ``--toy``: batch 1 and 4, two rounds (a smoke test; the ratios mean nothing).
Prints a Markdown section.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import lightning_prune
from lightning_prune import PruningSession, count_cost, export, export_onnx
from lightning_prune.methods import RandomChoice
from lightning_prune.models import CifarResNet, CifarVGG, torchvision_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shrink_speedup import _cpu_name, _quantile  # noqa: E402  (the sibling benchmark script's machine name and quartiles)

NETWORKS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "resnet20": ("ResNet-20", lambda: CifarResNet(20)),
    "vgg16": ("VGG-16", lambda: CifarVGG()),
    "mobilenet_v2": ("MobileNetV2", lambda: torchvision_model("mobilenet_v2", num_classes=10)),
}
FACTORS = (2, 4)  # MAC reduction of the pruned networks
RUNTIMES = ("eager", "inference", "onnxruntime")
BATCHES = (1, 256)
TOY_BATCHES = (1, 4)
INPUT = (3, 32, 32)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latency"


def _spread(values: list[float]) -> float:
    return (_quantile(values, 0.75) - _quantile(values, 0.25)) / statistics.median(values)


def pruned(dense: nn.Module, factor: int, seed: int, round_to: int | None = None) -> nn.Module:
    """A copy of ``dense`` with channels dropped at random until its MACs are at most
    1/``factor`` of the dense MACs (every width a multiple of ``round_to``, if given), physically shrunk."""
    net = copy.deepcopy(dense)
    session = PruningSession(net, RandomChoice(seed=seed), factor=factor, cost="macs", register=False)
    session.trace(torch.zeros(1, *INPUT))
    session.harden(session.keep_masks(round_to=round_to))
    return net.eval()


def _ort_runner(path: Path, threads: int) -> Callable[[torch.Tensor], object]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})


def _runners(net: nn.Module, folder: Path, tag: str, threads: int, example: torch.Tensor) -> dict[str, Callable]:
    """``{runtime: callable(x)}`` for one network."""
    eager = export(net).eval()
    inference = export(net, inference=True, example_input=example).eval()
    path = export_onnx(net, folder / f"{tag}.onnx", example)
    return {"eager": eager, "inference": inference, "onnxruntime": _ort_runner(path, threads)}


def measure(slug: str, args: argparse.Namespace, command: str) -> dict:
    """Time one network (dense and pruned, three runtimes) and return its JSON record."""
    title, factory = NETWORKS[slug]
    torch.manual_seed(args.seed)
    dense = factory().eval()
    example = torch.randn(2, *INPUT, generator=torch.Generator().manual_seed(args.seed))
    networks = {"dense": dense, **{f"{f}x": pruned(dense, f, args.seed, args.round_to) for f in FACTORS}}
    macs = {name: count_cost(net, torch.zeros(1, *INPUT)).macs for name, net in networks.items()}
    params = {name: count_cost(net, torch.zeros(1, *INPUT)).params for name, net in networks.items()}
    batches = TOY_BATCHES if args.toy else BATCHES
    load_before = os.getloadavg()[0]
    started = datetime.datetime.now().astimezone()
    median_ms: dict[str, dict[str, dict[str, float]]] = {}
    spreads: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        runners = {name: _runners(net, Path(folder), name, args.threads, example) for name, net in networks.items()}
        calls = [(runtime, name) for runtime in RUNTIMES for name in networks]
        for batch in batches:
            x = torch.randn(batch, *INPUT, generator=torch.Generator().manual_seed(args.seed + batch))
            times: dict[tuple[str, str], list[float]] = {call: [] for call in calls}
            rounds = args.repeats_batch1 if batch == 1 else args.repeats
            with torch.inference_mode():
                for _ in range(args.warmup):
                    for runtime, name in calls:
                        runners[name][runtime](x)
                for _ in range(rounds):
                    for runtime, name in calls:
                        run = runners[name][runtime]
                        start = time.perf_counter()
                        run(x)
                        times[(runtime, name)].append(time.perf_counter() - start)
            median_ms[str(batch)] = {r: {n: statistics.median(times[(r, n)]) * 1e3 for n in networks} for r in RUNTIMES}
            spreads[str(batch)] = {r: {n: _spread(times[(r, n)]) for n in networks} for r in RUNTIMES}
            print(f"done: {title} batch {batch}", file=sys.stderr, flush=True)
    rows, export_rows = [], []
    for batch in map(str, batches):
        med, spread = median_ms[batch], spreads[batch]
        for runtime in RUNTIMES:
            for name in networks:
                if name == "dense":
                    continue
                mac_ratio = macs["dense"] / macs[name]
                speedup = med[runtime]["dense"] / med[runtime][name]
                rows.append({
                    "batch": int(batch), "runtime": runtime, "pruned": name, "mac_ratio": mac_ratio,
                    "speedup": speedup, "speedup_per_mac_ratio": speedup / mac_ratio,
                    "spread": max(spread[runtime]["dense"], spread[runtime][name]),
                })
        for name in networks:
            export_rows.append({
                "batch": int(batch), "variant": name,
                "inference_over_eager": med["eager"][name] / med["inference"][name],
                "onnxruntime_over_eager": med["eager"][name] / med["onnxruntime"][name],
                "spread": max(spread[r][name] for r in RUNTIMES),
            })
    import onnxruntime

    return {
        "network": title,
        "slug": slug,
        "command": command,
        "date": f"{started:%Y-%m-%d %H:%M %Z}",
        "machine": {
            "cpu": _cpu_name(), "cores": os.cpu_count(), "system": platform.system(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "lightning_prune": lightning_prune.__version__,
        },
        "threads": args.threads,
        "toy": args.toy,
        "batches": list(batches),
        "rounds": {"batch_1": args.repeats_batch1, "other_batches": args.repeats, "warmup": args.warmup},
        "seed": args.seed,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "pruning": "RandomChoice(seed) keep-masks at the MAC budget dense / factor, shrunk (PruningSession.harden)"
        + (f", every width a multiple of {args.round_to} (keep_masks(round_to=))" if args.round_to else ""),
        "round_to": args.round_to,
        "macs": macs,
        "params": params,
        "rows": rows,
        "export_rows": export_rows,
        "median_ms": median_ms,
    }


def check_record(record: dict) -> None:
    """Every ratio in ``record`` is a positive finite number (ValueError otherwise)."""
    for row in record["rows"]:
        for key in ("mac_ratio", "speedup", "speedup_per_mac_ratio"):
            if not (isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0):
                raise ValueError(f"{record['network']}: {key} = {row[key]!r} in {row}")
    for row in record["export_rows"]:
        for key in ("inference_over_eager", "onnxruntime_over_eager"):
            if not (isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0):
                raise ValueError(f"{record['network']}: {key} = {row[key]!r} in {row}")


def report(records: list[dict]) -> str:
    """The Markdown section for ``records``."""
    lines = ["## Latency of pruned networks (eager, inference export, ONNX Runtime)", ""]
    for record in records:
        load = record["load_average_1min"]
        lines.append(
            f"- {record['network']}{', widths multiples of ' + str(record['round_to']) if record.get('round_to') else ''}: `{record['command']}`, {record['date']}, {record['machine']['cpu']}, "
            f"torch {record['machine']['torch']}, onnxruntime {record['machine']['onnxruntime']}, "
            f"{record['threads']} thread(s), load {load['before']:.1f} -> {load['after']:.1f}"
            + (" (toy run: the ratios mean nothing)" if record["toy"] else "")
        )
    lines += [
        "",
        "Speed-up of the pruned network over the dense one in the same runtime (ratio of medians):",
        "",
        "| network | batch | runtime | pruned | MAC ratio | speed-up | speed-up / MAC ratio | spread |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for record in records:
        for r in record["rows"]:
            lines.append(
                f"| {record['network']} | {r['batch']} | {r['runtime']} | {r['pruned']} | {r['mac_ratio']:.2f} | "
                f"{r['speedup']:.2f} | {r['speedup_per_mac_ratio']:.2f} | {r['spread']:.0%} |"
            )
    lines += [
        "",
        "Speed-up of the exports over eager PyTorch, same network (eager / export latency):",
        "",
        "| network | batch | variant | inference export / eager | ONNX Runtime / eager | spread |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for record in records:
        for r in record["export_rows"]:
            lines.append(
                f"| {record['network']} | {r['batch']} | {r['variant']} | {r['inference_over_eager']:.2f} | "
                f"{r['onnxruntime_over_eager']:.2f} | {r['spread']:.0%} |"
            )
    lines += ["", "spread: the largest relative interquartile range, (p75 - p25) / median, of the timings in a row."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of PyTorch and ONNX Runtime")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds at batch 256")
    parser.add_argument("--repeats-batch1", type=int, default=101, help="timed rounds at batch 1 (cheap, noisier)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", choices=list(NETWORKS), default=list(NETWORKS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the JSON files")
    parser.add_argument("--force", action="store_true", help="measure again networks whose JSON file exists")
    parser.add_argument("--toy", action="store_true", help="batch 1 and 4, two rounds, one warm-up: a smoke test")
    parser.add_argument("--round-to", type=int, default=None,
                        help="pruned widths multiples of this (files <network>-round<k>.json)")
    args = parser.parse_args(argv)
    if args.toy:
        args.repeats, args.repeats_batch1, args.warmup = 2, 2, 1
    if args.round_to is not None and args.round_to < 1:
        parser.error("--round-to must be >= 1")
    if min(args.threads, args.repeats, args.repeats_batch1) < 1 or args.warmup < 0:
        parser.error("--threads, --repeats and --repeats-batch1 must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    command = "python benchmarks/latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for slug in args.models:
        path = args.out / f"{slug}{f'-round{args.round_to}' if args.round_to else ''}{'-toy' if args.toy else ''}.json"
        if path.exists() and not args.force:
            print(f"kept: {path} (--force to measure again)", file=sys.stderr)
            records.append(json.loads(path.read_text()))
            continue
        record = measure(slug, args, command.strip())
        check_record(record)
        path.write_text(json.dumps(record, indent=1) + "\n")
        records.append(record)
    print(report(records))
    return records


if __name__ == "__main__":
    main()
