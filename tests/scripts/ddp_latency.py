"""Run by test_latency_cost.py: random pruning under a latency budget with 2 CPU processes
(``ddp``). The latency model is measured when the network is traced (no table given); rank 0
measures it and the other rank receives it, so both prune the same channels. Every rank saves
its final tensors and the table it used to ``<out>/rank<r>.pt``.

    python ddp_latency.py <out>
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_prune.callbacks import HardPruning, RandomPruning
from tests.bar_helpers import ForeignModule, tensor_state, tiny_loader


class SaveRankState(Callback):
    def __init__(self, out: Path, pruning: RandomPruning) -> None:
        self.out, self.pruning = out, pruning

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {"tensors": tensor_state(pl_module), "table": self.pruning.session.latency.to_dict()}
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0)
    # Wide enough that the convolutions, not the per-call overhead, make most of the latency: the
    # budget is then feasible on any machine (with 8 and 12 channels, one channel per group
    # kept 0.984 of the measured latency on one machine, over a budget of 0.98; with 128 and 192,
    # 0.12 on another).
    pruning = RandomPruning(budget=0.75, cost="latency", verbose=False,
                            latency={"batch_size": 64, "threads": 1, "grid": 2, "repeats": 2, "cache_dir": str(out / "cache")})
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        callbacks=[pruning, HardPruning(at_epoch=1, plot=False, verbose=False), SaveRankState(out, pruning)],
    )
    trainer.fit(ForeignModule(batch_norm=False, widths=(128, 192)), tiny_loader(8, n=64, shuffle=True))  # no BN: running statistics differ per rank
