"""Run by test_core_residual.py: BAR with mixed-connectivity residual blocks (soft phase, hard
pruning that removes a block, shrinking, fine-tuning) under ``ddp`` with 2 CPU processes, then
resumed from a checkpoint of the soft phase and from one taken after shrinking. No example input
is given (the network is traced on the first batch). Every rank saves its final tensors to
``<out>/<run>-rank<r>.pt``.

    python ddp_mixed.py <out>
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_prune.callbacks import BudgetAwareRegularization, HardPruning, SigmoidalBudgetAnnealing
from tests.bar_helpers import tensor_state
from tests.residual_helpers import WIDTHS, ResidualModule, residual_loader


class SaveRankState(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(tensor_state(pl_module), self.path.format(rank=trainer.global_rank))


def run(out: Path, name: str, ckpt: str | None) -> None:
    L.seed_everything(0)
    module = ResidualModule()
    callbacks = [BudgetAwareRegularization(budget=0.95, cost="macs", verbose=False), SigmoidalBudgetAnnealing(until_epoch=2),
                 HardPruning(at_epoch=2, widths=WIDTHS, plot=False, verbose=False)]
    checkpoints = ModelCheckpoint(dirpath=out / name, save_top_k=-1, filename="{epoch}")
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=4, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[*callbacks, checkpoints, SaveRankState(str(out / f"{name}-rank{{rank}}.pt"))],
    )
    trainer.fit(module, residual_loader(8, n=64), ckpt_path=ckpt)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    run(out, "straight", None)
    run(out, "from_soft", str(out / "straight" / "epoch=0.ckpt"))
    run(out, "from_shrunk", str(out / "straight" / "epoch=2.ckpt"))
