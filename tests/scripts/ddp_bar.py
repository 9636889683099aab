"""Run by test_bar.py: BAR on a tiny model with 1 process (global batch 32) or 2 DDP CPU
processes (16 each); every rank saves its final state_dict to <out>/rank<r>.pt."""

import sys
from pathlib import Path

import lightning as L
import torch

from lightning.pytorch.callbacks import Callback

from lightning_prune.callbacks import BudgetAwareRegularization
from lightning_prune.core.gates import HardConcreteGate
from tests.bar_helpers import ForeignModule, tiny_loader

class FixedGateInit(Callback):
    """Lightning re-seeds each DDP process before setup, so the random gate init would differ
    from the single-process run: start every run from the same gates instead."""

    def setup(self, trainer, pl_module, stage):
        for name, gate in pl_module.prune_gates.items():
            with torch.no_grad():
                gate.log_alpha.copy_(torch.linspace(0.0, 0.01, gate.num_channels))


if __name__ == "__main__":
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    HardConcreteGate.sample = lambda self, noise=None: self.deterministic()  # same math for any batching
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = ForeignModule(batch_norm=False)
    bar = BudgetAwareRegularization(factor=4, cost="macs", example_input=(1, 8, 8), verbose=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=4, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[bar, FixedGateInit()], use_distributed_sampler=False,
    )
    loader = tiny_loader(32 // devices, n=256)
    if devices > 1:  # rank r takes samples r, r+2, ...: each step's two halves make the single run's batch
        sampler = torch.utils.data.DistributedSampler(loader.dataset, devices, trainer.global_rank, shuffle=False)
        loader = torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler)
    trainer.fit(module, loader)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items() if not k.endswith("_extra_state")},
               out / f"rank{trainer.global_rank}.pt")
