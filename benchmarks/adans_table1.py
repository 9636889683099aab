"""An analogue of Table I of Javaheripi, Samragh, Javidi and Koushanfar, "AdaNS: Adaptive Non-Uniform Sampling for
Automated Design of Compact DNNs" (IEEE JSTSP 2020, doi:10.1109/JSTSP.2020.2992384):
the AdaNS samplers on one structured-pruning task.

Structured pruning (MACs) of a trained ResNet-20 on CIFAR-10: Uniform (naive, the whole cube,
no boundary characterisation), Zoom, Genetic and Gaussian (boundary characterisation, then
the §IV-C initial batch), each for the same number of AdaNS samples (batch x iterations). The
candidates are scored on held-out training images with masks set in place (the same
``lightning_prune.search.job.Evaluator`` the Hydra jobs use); the reference and the boundary
points are evaluated once and shared by the samplers (same seed, same points). The winner of
each sampler is then built for real (``CompressionSpace.compress``), its MACs measured with
``count_cost`` and its accuracy measured before any fine-tuning, on the held-out images and
on the 10,000 test images.

    python benchmarks/adans_table1.py --checkpoint <resnet20 .ckpt> --threshold 65 \\
        --batch 20 --iterations 15 --out benchmarks/adans_table1

writes ``<out>.json`` (everything, including the score of every sample) and ``<out>.png``
(best score against evaluations) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lightning_prune import count_cost
from lightning_prune.configs import config_dir
from lightning_prune.search import CompressionSearch, job, plot_progress
from lightning_prune.search.spaces import top1

SAMPLERS = ("uniform", "zoom", "genetic", "gaussian")


def compose_cfg(args: argparse.Namespace) -> object:
    GlobalHydra.instance().clear()
    overrides = [
        f"data={args.data}", f"model={args.model}", f"search.checkpoint={args.checkpoint}", "search.kind=structured",
        f"search.cost={args.cost}", f"search.eval_size={args.eval_size}", f"search.rank_size={args.rank_size}",
        "data.num_workers=0", f"data.data_dir={os.environ.get('LP_DATA_DIR', './data')}",
    ]
    with initialize_config_dir(config_dir=str(config_dir("search")), version_base="1.3"):
        return compose("adans", overrides=overrides)


def plot(runs: dict, out: Path, args: dict) -> None:
    plot_progress({n: r["scores"] for n, r in runs.items()}, out.with_suffix(".png"), log_scale=True,
                  title=f"AdaNS samplers, structured pruning of {args['model']} (A_thr {args['threshold']:g} %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--cost", default="macs")
    parser.add_argument("--threshold", type=float, required=True, help="A_thr in percent")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--boundary-steps", type=int, default=5)
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--rank-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/adans_table1")
    parser.add_argument("--plot-only", action="store_true", help="redraw <out>.png from <out>.json")
    args = parser.parse_args()
    if args.plot_only:
        result = json.loads(Path(args.out).with_suffix(".json").read_text())
        plot(result["runs"], Path(args.out), result["args"])
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    cfg = compose_cfg(args)
    ev = job.evaluator(cfg)
    setup_seconds = time.perf_counter() - t0
    space = ev.space.search_space
    print(f"setup {setup_seconds:.1f} s: {space.d} dimensions, base MACs {ev.base_cost:,}")

    cache: dict[tuple, dict] = {}
    timing = {"evaluations": 0, "seconds": 0.0}

    def evaluate(points: list[np.ndarray]) -> list[dict]:
        out = []
        for x in points:
            key = tuple(np.round(x, 6))
            if key not in cache:
                t = time.perf_counter()
                cache[key] = ev.evaluate(x)
                timing["seconds"] += time.perf_counter() - t
                timing["evaluations"] += 1
            out.append(cache[key])
        return out

    runs = {}
    for name in args.samplers.split(","):
        uniform = name == "uniform"
        search = CompressionSearch(
            space, name, batch_size=args.batch, iterations=args.iterations, threshold=args.threshold,
            boundary_steps=None if uniform else args.boundary_steps, init="uniform" if uniform else "boundary",
            seed=args.seed,
        )
        before = timing["evaluations"]
        t = time.perf_counter()

        def progress(s: CompressionSearch, name: str = name) -> None:
            st = s.status()
            if st["phase"] in ("search", "done") and "best_score" in st:
                print(f"  {name:8s} it {st['iteration']:3d}  best {st['best_score']:.4f}  alpha {st['alpha']:.3f}  "
                      f"acc {st['best_accuracy']:.2f}%  MACs {100 * st['best_cost_fraction']:.1f}%", flush=True)

        best = search.run(evaluate, callback=progress)
        seconds = time.perf_counter() - t
        model = ev.space.compress(best["x"])
        measured = count_cost(model, ev.space.example_input).macs
        held = top1(model, ev.inputs, ev.targets)
        ev.datamodule.setup("test")
        test = job.loader_accuracy(model, ev.datamodule.test_dataloader())
        scorer = search.scorer
        runs[name] = {
            # the score of every point this search evaluated (reference and boundary included), in order
            "log_scores": [scorer(e["result"]["accuracy"], e["result"]["cost"]) for e in search.log],
            "best": best, "measured_macs": measured, "held_out_accuracy_real_model": held, "test_accuracy": test,
            "samples": int(len(search.ada.scores)), "new_evaluations": timing["evaluations"] - before,
            "seconds": seconds, "scores": search.ada.scores.tolist(), "alphas": search.ada.alphas,
            "theta": None if search.theta is None else search.theta.tolist(), "reference": search.reference,
        }
        print(f"{name}: score {best['score']:.4f}, held-out acc {held:.2f}% (test {test:.2f}%), "
              f"MACs {100 * measured / ev.base_cost:.1f}% ({seconds:.0f} s)", flush=True)

    ev.space.reset()
    ev.datamodule.setup("test")
    base_test = job.loader_accuracy(ev.model.eval(), ev.datamodule.test_dataloader())
    reference = next(iter(runs.values()))["reference"]
    result = {
        "date": started, "machine": f"{os.cpu_count()}-core CPU, no GPU ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads", "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0], "args": vars(args), "setup_seconds": setup_seconds,
        "seconds_per_evaluation": timing["seconds"] / max(timing["evaluations"], 1), "base_macs": ev.base_cost,
        "reference": reference, "base_test_accuracy": base_test, "dimensions": space.names, "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(runs, out, vars(args))
    print()
    print(f"original: held-out accuracy {reference['accuracy']:.2f} %, test {base_test:.2f} %, MACs {ev.base_cost:,}")
    print("| sampler | samples | score | accuracy held-out (%) | accuracy test (%) | MACs (%) | MACs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        print(f"| {name} | {r['samples']} | {r['best']['score']:.3f} | {r['held_out_accuracy_real_model']:.1f} | "
              f"{r['test_accuracy']:.1f} | {100 * r['measured_macs'] / ev.base_cost:.1f} | {r['measured_macs']:,} |")
    print(f"\nseconds per evaluation: {result['seconds_per_evaluation']:.2f}; load average {load_before:.1f} -> "
          f"{result['load_average_after']:.1f}")


if __name__ == "__main__":
    main()
