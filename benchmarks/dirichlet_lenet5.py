"""Dirichlet pruning of LeNet-5 on MNIST under a MAC budget, next to Table 1 of the supplementary
material of Adamczewski and Park, "Dirichlet Pruning for Neural Network Compression" (AISTATS 2021,
arXiv:2011.05985).

Four steps, each a subcommand (results go to ``--out``, one JSON file per step):

    out=benchmarks/results/dirichlet_lenet5
    python benchmarks/dirichlet_lenet5.py dense --out $out --epochs 8       # train the dense net once
    python benchmarks/dirichlet_lenet5.py prune --out $out --variant V      # V: mean, gamma150, joint, joint_gamma150,
                                                                            #    joint_score, mean_paper_widths
    python benchmarks/dirichlet_lenet5.py time --out $out --time-samples 5120   # gamma vs mean epoch time
    python benchmarks/dirichlet_lenet5.py table --out $out                  # the Markdown table of the prune steps

``prune`` starts from the saved dense network (weights loaded before fit, so the switch phase
starts at epoch 0), learns the switches with the weights frozen on a fixed random subset of
the training set (``--switch-samples``; the gamma estimator with S = 150 runs the network 150
times per step), prunes to the budget with :class:`HardPruning` (global allocation by
importance per unit of MACs) and fine-tunes on the full training set with Adam.

``time`` runs one switch-phase epoch of the mean estimator and of the gamma estimator
(S = 150) on the same batches in one process, alternating (mean, gamma, mean), and reports
the per-epoch time of each (training batches only).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

import lightning_prune
from lightning_prune.callbacks import DirichletImportance, HardPruning
from lightning_prune.classifier import ImageClassifier
from lightning_prune.core.cost.measure import output_widths
from lightning_prune.data import MNISTDataModule
from lightning_prune.models import LeNet5

FULL_MACS = 2_293_000
VARIANTS: dict[str, dict[str, Any]] = {
    # Adamczewski and Park 2021, suppl. Table 1: rows "Dirichlet (mean)" and "Dirichlet (150)" are layer by layer;
    # "Dirichlet (joint)" learns all switches at once.
    "mean": dict(estimator="mean", layerwise=True),
    "gamma150": dict(estimator="gamma", samples=150, layerwise=True),
    "joint": dict(estimator="mean", layerwise=False),
    "joint_gamma150": dict(estimator="gamma", samples=150, layerwise=False),
    # ablation: the plain score K * E[s] per unit of cost instead of the kept share (allocation="share")
    "joint_score": dict(estimator="mean", layerwise=False, allocation="score"),
    # the widths of Adamczewski and Park 2021's "Dirichlet (mean)" row that exist here (5-8-45-15: 45 is a
    # count of fc1 *inputs*, pruned weight-wise; channel pruning keeps conv2 x 16 = 128 of them)
    "mean_paper_widths": dict(estimator="mean", layerwise=True, widths=[5, 8, 15]),
}
PAPER = {  # Adamczewski and Park 2021, suppl. Table 1: row, architecture (conv1-conv2-fc1 inputs-fc1 outputs), error %, FLOPs, params
    "mean": ("Dirichlet (mean)", "5-8-45-15", 1.1, "140K", "5.5K"),
    "gamma150": ("Dirichlet (150)", "6-8-40-20", 1.1, "168K", "6K"),
    "joint": ("Dirichlet (joint)", "6-7-35-17", 1.1, "158K", "5.5K"),
    "mean_paper_widths": ("Dirichlet (mean)", "5-8-45-15", 1.1, "140K", "5.5K"),
}


class PhasedMNIST(MNISTDataModule):
    """MNIST whose training loader, during the first ``switch_epochs`` epochs, is a fixed
    random subset of ``switch_samples`` training images (the switch phase); the full
    training set afterwards. Needs ``Trainer(reload_dataloaders_every_n_epochs=1)``."""

    def __init__(self, *args: Any, switch_epochs: int = 0, switch_samples: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.switch_epochs = switch_epochs
        self.switch_samples = switch_samples

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if epoch < self.switch_epochs and self.switch_samples:
            order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(1))
            return DataLoader(Subset(self.train_set, order[: self.switch_samples].tolist()), batch_size=self.batch_size,
                              shuffle=True, num_workers=self.num_workers)
        return super().train_dataloader()


class EpochTimer(L.Callback):
    """Wall time of every training epoch (batches only: from epoch start to epoch end, before validation)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.is_last_batch:
            self.seconds.append(time.perf_counter() - self._start)


class ImportanceRange(L.Callback):
    """The smallest and largest learned importance K * E[s] of every group at the end of the
    switch phase (before hard pruning replaces the switches). Goes after the switches' callback."""

    def __init__(self, switches: DirichletImportance, epochs: int) -> None:
        self.switches, self.epochs = switches, epochs
        self.range: dict[str, list[float]] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epochs - 1:
            self.range = {name: [float(s.min()), float(s.max())] for name, s in self.switches.importance().items()}


def machine() -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0],
    }


def trainer(max_epochs: int, callbacks: list, out: Path, **kwargs: Any) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=out, callbacks=callbacks, **kwargs)


def test_error(module: L.LightningModule, dm: MNISTDataModule, out: Path) -> float:
    metrics = trainer(1, [], out).test(module, datamodule=dm, verbose=False)[0]
    return 100.0 * (1.0 - metrics["test/acc"])


def dense(args: argparse.Namespace) -> dict[str, Any]:
    L.seed_everything(args.seed)
    dm = MNISTDataModule(args.data_dir, batch_size=128, val_size=5000)
    # Adam 1e-3, the last two epochs at 1e-4
    scheduler = partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[args.epochs - 2], gamma=0.1)
    module = ImageClassifier(LeNet5(), 10, optimizer=partial(torch.optim.Adam, lr=1e-3), scheduler=scheduler)
    start = time.perf_counter()
    trainer(args.epochs, [], args.out).fit(module, dm)
    seconds = time.perf_counter() - start
    torch.save(module.net.state_dict(), args.out / "dense.pt")
    return {"step": "dense", "epochs": args.epochs, "test_error": test_error(module, dm, args.out), "seconds": seconds}


def dense_module(args: argparse.Namespace, lr: float = 1e-3, milestones: list[int] | None = None) -> ImageClassifier:
    net = LeNet5()
    net.load_state_dict(torch.load(args.out / "dense.pt", weights_only=True))
    scheduler = partial(torch.optim.lr_scheduler.MultiStepLR, milestones=milestones, gamma=0.1) if milestones else None
    return ImageClassifier(net, 10, optimizer=partial(torch.optim.Adam, lr=lr), scheduler=scheduler)


def prune(args: argparse.Namespace) -> dict[str, Any]:
    L.seed_everything(args.seed)
    s, f = args.switch_epochs, args.finetune_epochs
    dm = PhasedMNIST(args.data_dir, batch_size=128, val_size=5000, switch_epochs=s, switch_samples=args.switch_samples)
    # fine-tuning: Adam 1e-3, the last two epochs at 1e-4
    module = dense_module(args, milestones=[s + f - 2] if f > 2 else None)
    dense_error = test_error(module, dm, args.out)
    options = dict(VARIANTS[args.variant])
    widths = options.pop("widths", None)
    switches = DirichletImportance(factor=FULL_MACS / args.budget, cost="macs", alpha0=args.alpha0, gate_lr=args.gate_lr,
                                   epochs=s, verbose=True, **options)
    timer, learned = EpochTimer(), ImportanceRange(switches, s)
    t = trainer(s + f, [switches, learned, HardPruning(at_epoch=s, widths=widths, plot=False), timer], args.out,
                reload_dataloaders_every_n_epochs=1)
    t.fit(module, dm)
    small = lightning_prune.export(module)
    cost = lightning_prune.count_cost(small, torch.zeros(1, 1, 28, 28))
    return {
        "step": "prune", "variant": args.variant, **options, "widths_given": widths, "alpha0": args.alpha0, "gate_lr": args.gate_lr,
        "switch_epochs": s, "switch_samples": args.switch_samples, "finetune_epochs": f,
        "budget_macs": args.budget, "dense_test_error": dense_error, "test_error": test_error(module, dm, args.out),
        "macs": cost.macs, "params": cost.params, "widths": output_widths(small), "importance_min_max": learned.range,
        "switch_epoch_seconds": timer.seconds[:s], "finetune_epoch_seconds": timer.seconds[s:],
    }


def time_estimators(args: argparse.Namespace) -> dict[str, Any]:
    dm = PhasedMNIST(args.data_dir, batch_size=128, val_size=5000, switch_epochs=1, switch_samples=args.time_samples)
    seconds: dict[str, list[float]] = {"mean": [], "gamma150": []}
    for name in ("mean", "gamma150", "mean"):
        L.seed_everything(args.seed)
        timer = EpochTimer()
        options = {k: v for k, v in VARIANTS[name].items() if k not in ("layerwise", "allocation")}
        switches = DirichletImportance(factor=FULL_MACS / args.budget, cost="macs", epochs=1, verbose=False, **options)
        trainer(1, [switches, timer], args.out, limit_val_batches=0).fit(dense_module(args), dm)
        seconds[name] += timer.seconds
    mean = sum(seconds["mean"]) / len(seconds["mean"])
    return {"step": "time", "batches": -(-args.time_samples // 128), "batch_size": 128, "seconds": seconds,
            "ratio_gamma_over_mean": seconds["gamma150"][0] / mean}


def switches(record: dict[str, Any]) -> str:
    """How a prune step's switches were learned, from its record (the variant's options)."""
    text = f"gamma S={record['samples']}" if record["estimator"] == "gamma" else "mean"
    text += ", layer by layer" if record["layerwise"] else ", joint"
    if record.get("allocation"):
        text += f"; `allocation=\"{record['allocation']}\"`"
    if record.get("widths_given"):
        text += f"; `widths={record['widths_given']}`"
    return text


def table(args: argparse.Namespace) -> str:
    rows = ["| run | switches | widths (conv1-conv2-fc1) | error % | MACs | params | Adamczewski and Park 2021, suppl. Table 1 (arch, error %, FLOPs, params) |",
            "|---|---|---|---:|---:|---:|---|"]
    for name in VARIANTS:
        path = args.out / f"prune_{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        w = r["widths"]
        arch = f"{w['features.0']}-{w['features.2']}-{w['classifier.1']}"
        paper = f"{PAPER[name][0]}: " + ", ".join(map(str, PAPER[name][1:])) if name in PAPER else "-"
        rows.append(f"| {name} | {switches(r)} | {arch} | {r['test_error']:.2f} | {r['macs']:,} | {r['params']:,} | {paper} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["dense", "prune", "time", "table"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LP_DATA_DIR", "data")),
                        help="the folder that holds MNIST (default: $LP_DATA_DIR, else ./data)")
    parser.add_argument("--variant", choices=list(VARIANTS), default="mean")
    parser.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    parser.add_argument("--budget", type=int, default=FULL_MACS // 16, help="MACs per image (default: 1/16 of 2,293,000)")
    parser.add_argument("--switch-epochs", type=int, default=1)
    parser.add_argument("--switch-samples", type=int, default=10_000, help="training images of the switch phase")
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--alpha0", type=float, default=0.5)
    parser.add_argument("--gate-lr", type=float, default=0.1)
    parser.add_argument("--time-samples", type=int, default=1280, help="training images of the timed epochs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "table":
        print(table(args))
        return
    info = machine()
    result = {"dense": dense, "prune": prune, "time": time_estimators}[args.step](args)
    result.update(info, load_avg_1min_after=os.getloadavg()[0], command=" ".join(["python", *sys.argv]))
    name = f"prune_{args.variant}" if args.step == "prune" else args.step
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
