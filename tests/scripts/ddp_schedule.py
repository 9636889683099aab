"""Run by test_reliability.py: the whole BAR or Dirichlet schedule (soft phase, hard pruning,
shrinking, fine-tuning) under ``strategy`` with 2 CPU processes, then resumed from a
checkpoint of the soft phase and from one taken after shrinking. No example input is given
(the network is traced on the first batch) and the user's optimizer is never told about the
gates. Every rank saves its final tensors to ``<out>/<run>-rank<r>.pt``; ``ddp_spawn`` runs
also save the main process's module to ``<out>/<run>-main.pt``.

    python ddp_schedule.py <out> <strategy> <method>
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning_prune
from lightning_prune.callbacks import BudgetAwareRegularization, DirichletImportance, HardPruning, SigmoidalBudgetAnnealing
from tests.bar_helpers import ForeignModule, tensor_state, tiny_loader


def callbacks(method: str) -> list:
    if method == "bar":
        return [BudgetAwareRegularization(factor=3, cost="macs", verbose=False), SigmoidalBudgetAnnealing(until_epoch=2),
                HardPruning(at_epoch=2, plot=False, verbose=False)]
    return [DirichletImportance(factor=3, cost="macs", verbose=False), HardPruning(at_epoch=2, plot=False, verbose=False)]


class SaveRankState(Callback):
    """Each rank saves its module's tensors at the end of fit (in the worker processes of ddp_spawn too)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(tensor_state(pl_module), self.path.format(rank=trainer.global_rank))


def run(out: Path, strategy: str, method: str, name: str, ckpt: str | None) -> None:
    L.seed_everything(0)
    module = ForeignModule(batch_norm=False)
    if strategy == "ddp_spawn":  # the main process must load the pruned weights rank 0 sends back
        lightning_prune.enable_pruned_loading(module)
    checkpoints = ModelCheckpoint(dirpath=out / name, save_top_k=-1, filename="{epoch}")
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=4, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[*callbacks(method), checkpoints, SaveRankState(str(out / f"{name}-rank{{rank}}.pt"))],
    )
    trainer.fit(module, tiny_loader(8, n=64, shuffle=True), ckpt_path=ckpt)
    if strategy == "ddp_spawn":  # the main process got rank 0's pruned weights back
        torch.save(tensor_state(module), out / f"{name}-main.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, strategy, method = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    out.mkdir(parents=True, exist_ok=True)
    run(out, strategy, method, "straight", None)
    run(out, strategy, method, "from_soft", str(out / "straight" / "epoch=0.ckpt"))
    run(out, strategy, method, "from_shrunk", str(out / "straight" / "epoch=2.ckpt"))
