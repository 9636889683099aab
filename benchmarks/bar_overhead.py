"""Training-step time with BAR's gates over without, measured in one run.

Both variants train the same network on the same random batches through Lightning; a
callback times every training batch (forward, backward, BAR's penalty and gate step,
optimizer step). The runs alternate (plain, BAR, plain, BAR, ...) so that load from other
processes affects both alike; the ratio of the medians over all timed steps is reported.

Usage: ``python benchmarks/bar_overhead.py [--model lenet5|resnet20] [--rounds 3] [--steps 40]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from functools import partial

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune.callbacks import BudgetAwareRegularization, SigmoidalBudgetAnnealing
from lightning_prune.classifier import ImageClassifier
from lightning_prune.models import CifarResNet, LeNet5

MODELS = {
    "lenet5": (lambda: LeNet5(), (1, 28, 28), "macs"),
    "resnet20": (lambda: CifarResNet(20), (3, 32, 32), "volume"),
}


class StepTimer(Callback):
    def __init__(self, skip: int) -> None:
        self.skip, self.times, self._start = skip, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.skip:
            self.times.append(time.perf_counter() - self._start)


def run(model: str, gated: bool, steps: int, batch: int) -> list[float]:
    factory, shape, cost = MODELS[model]
    L.seed_everything(0)
    data = TensorDataset(torch.randn(steps * batch, *shape), torch.randint(0, 10, (steps * batch,)))
    module = ImageClassifier(factory(), 10, optimizer=partial(torch.optim.Adam, lr=1e-3))
    timer = StepTimer(skip=3)
    callbacks: list[Callback] = [timer]
    if gated:
        callbacks += [BudgetAwareRegularization(factor=4, cost=cost, example_input=shape, verbose=False),
                      SigmoidalBudgetAnnealing(until_epoch=1)]
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, DataLoader(data, batch_size=batch))
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="lenet5")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    plain: list[float] = []
    gated: list[float] = []
    for _ in range(args.rounds):
        plain += run(args.model, False, args.steps, args.batch)
        gated += run(args.model, True, args.steps, args.batch)
    ratio = statistics.median(gated) / statistics.median(plain)
    print(f"## BAR training-step overhead ({args.model}, batch {args.batch})\n")
    print(f"`python benchmarks/bar_overhead.py --model {args.model} --rounds {args.rounds} --steps {args.steps} "
          f"--batch {args.batch} --threads {args.threads}`, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
          f"2-core CPU, {args.threads} threads, 1-min load average {load:.1f} -> {os.getloadavg()[0]:.1f}\n")
    print("| variant | median step (ms) | steps timed |\n|---|---:|---:|")
    print(f"| plain | {1000 * statistics.median(plain):.1f} | {len(plain)} |")
    print(f"| with BAR gates | {1000 * statistics.median(gated):.1f} | {len(gated)} |")
    print(f"\nstep time with gates / without: **{ratio:.3f}**")


if __name__ == "__main__":
    main()
