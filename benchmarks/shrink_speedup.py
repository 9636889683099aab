"""Does removing channels make the network faster, in proportion to the MACs removed?

For ResNet-20 and CIFAR VGG-16 (32x32 inputs), random keep-masks drop 50% and 75% of the
channels of every prunable group; the network is shrunk with ``lightning_prune.shrink`` and
the dense and shrunk forward passes (eval mode, no grad) are timed at batch 1 and 256.
Reported: MAC ratio dense / shrunk (``count_cost`` on the shrunk model, which equals the
cost model's exact count) against the latency ratio dense / shrunk (medians).

Mixed rows (ResNet-20): mixed-connectivity residual blocks (``build_graph(...,
residual="mixed")``; Lemaire, Achkar and Jodoin, CVPR 2019, supplementary material,
Algorithm 1) pruned to the MACs of the tied row above them (random channel scores, greedy
``fit_budget``): the branches compute their alive channels only and are scattered into the
stream (a zero tensor and an ``index_copy_``), or removed. Same MACs, so the latency ratios
say what the scatter costs.

Timing: ``torch.set_num_threads(--threads)``; warm-up runs, then ``--repeats`` rounds in which
every variant of a model/batch is timed once, interleaved, so that load from other
processes affects all variants alike; median per variant, and the relative spread
(p75 - p25) / median to judge noise. The 1-minute load average is printed before and after.

``--compile MODE`` (with ``--inference``) also times every inference form compiled with
``torch.compile(mode=MODE)`` (TorchInductor), as extra variants ``<name> compiled``, each
compiled network's outputs checked against its eager form first.

Usage: ``python benchmarks/shrink_speedup.py [--threads 1] [--repeats 7] [--inference [--compile max-autotune]] [--out file.json]``;
prints a Markdown section to paste into ``benchmarks/RESULTS.md`` (and writes the rows as JSON).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from lightning_prune import build_graph, count_cost, export, random_masks, shrink
from lightning_prune.core.allocation import fit_budget
from lightning_prune.core.cost import CostModel
from lightning_prune.core.cost.latency_measure import device_name
from lightning_prune.models import CifarResNet, CifarVGG

MODELS = {"ResNet-20": lambda: CifarResNet(20), "VGG-16": lambda: CifarVGG()}
MIXED = ("ResNet-20",)  # models that also get a mixed-connectivity row at the same MACs
MASKED = (0.5, 0.75)  # fraction of each group's channels removed
BATCHES = (1, 256)


def _time_once(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def _cpu_name() -> str:
    return device_name("cpu").removeprefix("cpu: ")


def _quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=4)[{0.25: 0, 0.75: 2}[q]] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds at batch 256")
    parser.add_argument("--repeats-batch1", type=int, default=101, help="timed rounds at batch 1 (cheap, noisier)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="which models to time")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows and the run's context to this JSON file")
    parser.add_argument("--inference", action="store_true",
                        help="time every network (dense too) in its inference form: export(..., inference=True), channels_last")
    parser.add_argument("--compile", default=None, metavar="MODE",
                        help="with --inference: also time each network compiled by torch.compile(mode=MODE)")
    args = parser.parse_args(argv)
    if args.compile is not None and not args.inference:
        parser.error("--compile needs --inference")
    if min(args.threads, args.repeats, args.repeats_batch1) < 1 or args.warmup < 0:
        parser.error("--threads, --repeats and --repeats-batch1 must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    started = datetime.datetime.now().astimezone()
    rows = []
    for model_name, factory in ((m, MODELS[m]) for m in args.models):
        torch.manual_seed(args.seed)
        dense = factory().eval()
        example = torch.zeros(1, 3, 32, 32)
        graph = build_graph(dense, example)
        dense_cost = count_cost(dense, example)
        variants = {"dense": (dense, dense_cost)}
        for fraction in MASKED:
            masks = random_masks(graph, 1.0 - fraction, torch.Generator().manual_seed(args.seed))
            small = copy.deepcopy(dense)
            shrink(small, masks, graph=graph)
            variants[f"{int(fraction * 100)}%"] = (small.eval(), count_cost(small, example))
            if model_name in MIXED:  # mixed blocks at the MACs of the tied variant
                mixed_graph = build_graph(dense, example, residual="mixed")
                scores_gen = torch.Generator().manual_seed(args.seed)
                scores = {n: torch.rand(g.size, generator=scores_gen) + 0.05 for n, g in mixed_graph.groups.items()}
                target = variants[f"{int(fraction * 100)}%"][1].macs
                mixed_masks = fit_budget(CostModel(mixed_graph), "macs", target, scores).masks
                mixed = copy.deepcopy(dense)
                shrink(mixed, mixed_masks, graph=mixed_graph)
                variants[f"{int(fraction * 100)}% mixed"] = (mixed.eval(), count_cost(mixed, example))
        if args.inference:
            variants = {name: (export(model, inference=True, example_input=example).eval(), cost) for name, (model, cost) in variants.items()}
        if args.compile is not None:
            x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            for name, (model, cost) in list(variants.items()):
                compiled = torch.compile(copy.deepcopy(model), mode=args.compile)
                with torch.no_grad():
                    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
                variants[f"{name} compiled"] = (compiled, cost)
        for batch in BATCHES:
            x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
            if args.inference:
                x = x.contiguous(memory_format=torch.channels_last)
            times: dict[str, list[float]] = {name: [] for name in variants}
            with torch.no_grad():
                for _ in range(args.warmup):
                    for model, _ in variants.values():
                        model(x)
                for _ in range(args.repeats_batch1 if batch == 1 else args.repeats):
                    for name, (model, _) in variants.items():
                        times[name].append(_time_once(model, x))
            med = {name: statistics.median(t) for name, t in times.items()}
            spread = {name: (_quantile(t, 0.75) - _quantile(t, 0.25)) / med[name] for name, t in times.items()}
            for name in (n for n in variants if n not in ("dense", "dense compiled")):
                cost = variants[name][1]
                reference = "dense compiled" if name.endswith(" compiled") else "dense"  # compiled against compiled
                rows.append(
                    (
                        model_name,
                        batch,
                        name,
                        dense_cost.macs,
                        cost.macs,
                        dense_cost.macs / cost.macs,
                        med[reference] * 1e3,
                        med[name] * 1e3,
                        med[reference] / med[name],
                        max(spread[reference], spread[name]),
                    )
                )
            print(f"done: {model_name} batch {batch}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]

    command = "python benchmarks/shrink_speedup.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print("## Shrink speedup" + (", inference export" if args.inference else "") + "\n")
    print(f"- command: `{command.strip()}`")
    print(f"- date: {started:%Y-%m-%d %H:%M %Z}")
    print(
        f"- machine: 2-core CPU, no GPU ({_cpu_name()}, {platform.system()}), "
        f"torch {torch.__version__}, {args.threads} intra-op thread(s); interleaved rounds after {args.warmup} warm-up: "
        f"{args.repeats_batch1} at batch 1, {args.repeats} at batch 256; medians"
    )
    print(f"- 1-minute load average: {load_before:.1f} before, {load_after:.1f} after (other jobs share the CPU)")
    print(
        "- masks: random, the same fraction of channels removed from every prunable group "
        "(heads kept); MACs per image measured with `count_cost` on the shrunk network; "
        "`mixed`: mixed-connectivity residual blocks pruned to the MACs of the tied row above "
        "(random scores, `fit_budget`)"
        + ("; every network, dense too, timed in its inference form (`export(..., inference=True)`: batch norms folded, "
           "channels_last weights and input)" if args.inference else "")
        + (f"; `compiled`: that form through `torch.compile(mode={args.compile!r})`, its ratio against the compiled dense network"
           if args.compile else "") + "\n"
    )
    print("| model | batch | channels removed | MACs dense | MACs shrunk | MAC ratio | ms dense | ms shrunk | latency ratio | latency / MAC ratio | spread |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:,} | {r[4]:,} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.2f} | {r[8]:.2f} | {r[8] / r[5]:.2f} | {r[9]:.0%} |"
        )
    print("\nspread: the larger relative interquartile range, (p75 - p25) / median, of the two timings compared.")
    if args.out is not None:
        keys = ("model", "batch", "variant", "macs_dense", "macs_shrunk", "mac_ratio", "ms_dense", "ms_shrunk", "latency_ratio", "spread")
        record = {
            "command": command.strip(), "date": f"{started:%Y-%m-%d %H:%M %Z}", "machine": _cpu_name(), "torch": torch.__version__,
            "threads": args.threads, "repeats": {"batch_1": args.repeats_batch1, "batch_256": args.repeats, "warmup": args.warmup},
            "inference": args.inference, "compile": args.compile, "load_average_1min": {"before": load_before, "after": load_after},
            "rows": [dict(zip(keys, r)) for r in rows],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
