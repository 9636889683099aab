"""Training-step time with BAR's gates over without, measured in one run.

Both variants train the same network on the same random batches through Lightning; a
callback times every training batch (forward, backward, BAR's penalty and gate step,
optimizer step). The runs alternate (plain, BAR, plain, BAR, ...) so that load from other
processes affects both alike; the ratio of the medians over all timed steps is reported.

Usage: ``python benchmarks/bar_overhead.py [--model lenet5|resnet20|vgg16] [--rounds 3] [--steps 40] [--out file.json]``;
prints a Markdown section (and, with ``--out``, writes the medians and the run's context as JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Dataset, TensorDataset

from lightning_prune.callbacks import BudgetAwareRegularization, SigmoidalBudgetAnnealing
from lightning_prune.classifier import ImageClassifier
from lightning_prune.data.datamodules import VisionDataModule
from lightning_prune.models import CifarResNet, LeNet5
from lightning_prune.models.vgg import vgg16

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shrink_speedup import _cpu_name  # noqa: E402  (the sibling benchmark script's machine name)

WARMUP_STEPS = 3  # the first steps of every run are not timed

MODELS = {
    "lenet5": (lambda: LeNet5(), (1, 28, 28), "macs"),
    "resnet20": (lambda: CifarResNet(20), (3, 32, 32), "volume"),
    "vgg16": (lambda: vgg16(), (3, 32, 32), "volume"),
}


class RandomImages(VisionDataModule):
    """``size`` random images of ``shape`` with random labels of 10 classes, served like the real
    datamodules (shuffled batches, ``channels_last`` applied after the transfer to the device)."""

    name, num_classes = "random images", 10

    def __init__(self, shape: tuple[int, int, int], size: int, **kwargs) -> None:
        super().__init__(val_size=0, augment=False, **kwargs)
        self.input_shape, self.size = shape, size

    def build(self, train: bool, transform) -> Dataset:
        generator = torch.Generator().manual_seed(0)
        return TensorDataset(torch.randn(self.size, *self.input_shape, generator=generator),
                             torch.randint(0, self.num_classes, (self.size,), generator=generator))


class StepTimer(Callback):
    def __init__(self, skip: int) -> None:
        self.skip, self.times, self._start = skip, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.skip:
            self.times.append(time.perf_counter() - self._start)


def run(model: str, gated: bool, steps: int, batch: int, channels_last: bool = False, precision: str = "32-true") -> list[float]:
    """The times of the training steps after the warm-up of one epoch of ``steps`` steps, in
    Lightning's ``precision``."""
    factory, shape, cost = MODELS[model]
    L.seed_everything(0)
    data = RandomImages(shape, steps * batch, batch_size=batch, channels_last=channels_last)
    module = ImageClassifier(factory(), 10, optimizer=partial(torch.optim.Adam, lr=1e-3))
    timer = StepTimer(skip=WARMUP_STEPS)
    callbacks: list[Callback] = [timer]
    if gated:
        callbacks += [BudgetAwareRegularization(factor=4, cost=cost, example_input=shape, verbose=False),
                      SigmoidalBudgetAnnealing(until_epoch=1)]
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, precision=precision)
    trainer.fit(module, datamodule=data)
    return timer.times


def compare(model: str, variants: dict[str, dict], args: argparse.Namespace) -> dict:
    """Time ``model``'s training steps in every variant (keyword arguments of :func:`run`),
    alternating the variants in each of ``args.rounds`` rounds; the median step times (ms), the
    steps timed, and the speedup of the second variant over the first (ratio of the medians)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, kwargs in variants.items():
            times[name] += run(model, args.gates, args.steps, args.batch, **kwargs)
    median = {name: 1000 * statistics.median(t) for name, t in times.items()}
    first, second = variants
    return {"median_step_ms": median, "steps_timed": {name: len(t) for name, t in times.items()},
            "speedup": median[first] / median[second]}


def print_comparison(title: str, record: dict, labels: dict[str, str]) -> None:
    """A Markdown section of :func:`compare`'s results per model (``record["models"]``), the
    columns named by ``labels`` (variant: label)."""
    load = record["load_average_1min"]
    print(f"## {title}: training-step time (batch {record['batch']}{', with BAR gates' if record['gates'] else ''})\n")
    print(f"`{record['command']}`, {record['date']}, {record['machine']}, {record['threads']} threads, "
          f"1-min load average {load['before']:.1f} -> {load['after']:.1f}\n")
    print(f"| network | {' | '.join(f'{label} step (ms)' for label in labels.values())} | speedup |\n|---|---:|---:|---:|")
    for model, r in record["models"].items():
        steps = " | ".join(f"{r['median_step_ms'][name]:.1f}" for name in labels)
        print(f"| {model} | {steps} | **{r['speedup']:.2f}x** |")


def timing_parser(script: str, description: str, steps: int, threads: int) -> argparse.ArgumentParser:
    """The options every step-timing script (``script``: its file name) takes: ``--rounds --steps
    --batch --threads --out``."""
    parser = argparse.ArgumentParser(prog=script, description=description)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--out", type=Path, default=None, help="also write the medians and the run's context to this JSON file")
    return parser


def compare_settings(script: str, description: str, variants: dict[str, dict], title: str, labels: dict[str, str],
                     argv: list[str] | None) -> dict:
    """The main function of a script (file name ``script``) that compares two training settings
    (``variants``, see :func:`compare`) with the options of :func:`timing_parser` and ``--models
    --gates``: times them, writes the record to ``--out`` and prints it (see :func:`print_comparison`)."""
    parser = timing_parser(script, description, steps=20, threads=1)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["lenet5", "resnet20", "vgg16"])
    parser.add_argument("--gates", action="store_true", help="train with BAR's gates (as in its soft phase)")
    args, context = start_timing(parser, argv)
    results = {model: compare(model, variants, args) for model in args.models}
    record = finish_timing(args, context, gates=args.gates, models=results)
    print_comparison(title, record, labels)
    return record


def start_timing(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    """Parse and check the options, set the thread count; return them and the run's context
    (``finish_timing`` completes it)."""
    args = parser.parse_args(argv)
    if min(args.rounds, args.batch, args.threads) < 1 or args.steps <= WARMUP_STEPS:
        parser.error(f"--rounds, --batch and --threads must be >= 1, --steps above {WARMUP_STEPS} (the untimed warm-up steps of each run)")
    torch.set_num_threads(args.threads)
    command = f"python benchmarks/{parser.prog} {' '.join(sys.argv[1:] if argv is None else argv)}".strip()
    started = datetime.datetime.now().astimezone()
    context = {"command": command, "date": f"{started:%Y-%m-%d %H:%M %Z}", "machine": _cpu_name(), "torch": torch.__version__,
               "batch": args.batch, "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
               "load_average_1min": {"before": os.getloadavg()[0]}}
    return args, context


def finish_timing(args: argparse.Namespace, context: dict, **results) -> dict:
    """The run's record: its context with the load average after it and ``results``; written to
    ``--out`` when given."""
    context["load_average_1min"]["after"] = os.getloadavg()[0]
    record = {**context, **results}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = timing_parser(Path(__file__).name, __doc__.splitlines()[0], steps=40, threads=2)
    parser.add_argument("--model", choices=sorted(MODELS), default="lenet5")
    args, context = start_timing(parser, argv)
    plain: list[float] = []
    gated: list[float] = []
    for _ in range(args.rounds):
        plain += run(args.model, False, args.steps, args.batch)
        gated += run(args.model, True, args.steps, args.batch)
    median = {"plain": 1000 * statistics.median(plain), "gated": 1000 * statistics.median(gated)}  # ms
    ratio = median["gated"] / median["plain"]
    record = finish_timing(args, context, model=args.model, median_step_ms=median,
                           steps_timed={"plain": len(plain), "gated": len(gated)}, ratio=ratio)
    load = record["load_average_1min"]
    print(f"## BAR training-step overhead ({args.model}, batch {args.batch})\n")
    print(f"`{record['command']}`, {record['date']}, "
          f"2-core CPU, {args.threads} threads, 1-min load average {load['before']:.1f} -> {load['after']:.1f}\n")
    print("| variant | median step (ms) | steps timed |\n|---|---:|---:|")
    print(f"| plain | {median['plain']:.1f} | {len(plain)} |")
    print(f"| with BAR gates | {median['gated']:.1f} | {len(gated)} |")
    print(f"\nstep time with gates / without: **{ratio:.3f}**")
    return record


if __name__ == "__main__":
    main()
