"""``HardPruning``: turns learned gates into fixed masks under the budget, freezes them and
shrinks the network, so the remaining epochs train the small network."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from lightning_prune._checks import check_bool, check_int
from lightning_prune.callbacks.gated import GatedPruning
from lightning_prune.callbacks.report import layer_table, plot_alive_channels


class HardPruning(Callback):
    """At the start of epoch ``at_epoch``, replace the gates of the pruning callback in the
    Trainer (:class:`BudgetAwareRegularization`, :class:`DirichletImportance` or
    :class:`RandomPruning`) by hard masks.

    The masks come from that callback (BAR: alive channels, repaired to meet the budget;
    Dirichlet: global allocation by importance per unit of cost; Random: channels dropped at
    random until the budget is met) or from ``widths``
    (``{group name: channels to keep}``). The final cost is checked against the budget.

    Args:
        at_epoch: epoch at whose start the masks are fixed.
        shrink: remove the dropped channels physically (the user's optimizer state is sliced
            along; under DDP the module is wrapped anew, so DDP follows the new parameters).
        freeze: must be True: after hard pruning the gate parameters no longer change
            (papers/001 §3.1). Kept as an argument for configs that state it.
        widths: optional explicit channels per group instead of the budget-driven choice:
            ``{group name: channels}``, or a list with one number per group in network order
            (e.g. ``[5, 8, 15]`` for LeNet-5's groups features.0, features.2, classifier.1).
        plot: save ``alive_channels.png`` (channels per group before and after) in the log folder.
    """

    def __init__(
        self,
        at_epoch: int,
        shrink: bool = True,
        freeze: bool = True,
        widths: Mapping[str, int] | Sequence[int] | None = None,
        plot: bool = True,
        verbose: bool = True,
    ) -> None:
        self.at_epoch = check_int("at_epoch", at_epoch, 0)
        for name, value in (("shrink", shrink), ("freeze", freeze), ("plot", plot)):
            check_bool(name, value)
        if not freeze:
            raise ValueError("freeze must be True: hard-pruned gates are fixed masks (papers/001 §3.1)")
        if widths is not None and (isinstance(widths, str) or not isinstance(widths, (Mapping, Sequence))):
            raise TypeError("widths must be a mapping {group name: channels to keep}, a list (one per group) or None")
        self.shrink = shrink
        self.freeze = freeze
        self.widths = dict(widths) if isinstance(widths, Mapping) else list(widths) if widths is not None else None
        self.plot = plot
        self.verbose = verbose
        self.pruned_at: int | None = None
        self.summary: dict[str, Any] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(at_epoch=self.at_epoch)

    @staticmethod
    def source(trainer: L.Trainer) -> GatedPruning:
        found = [c for c in trainer.callbacks if isinstance(c, GatedPruning)]
        if len(found) != 1:
            raise ValueError(
                "HardPruning needs exactly one channel-selection callback (BudgetAwareRegularization, "
                f"DirichletImportance or RandomPruning) in the Trainer, found {len(found)}"
            )
        return found[0]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        max_epochs = trainer.max_epochs
        if not trainer.fast_dev_run and max_epochs is not None and max_epochs >= 0 and self.at_epoch >= max_epochs:
            raise ValueError(
                f"at_epoch: hard pruning at epoch {self.at_epoch} never happens in a run of max_epochs={max_epochs} "
                f"(epochs 0-{max_epochs - 1}); prune earlier or train longer"
            )
        self.source(trainer).when_ready(self.check_widths)

    def resolved_widths(self, source: GatedPruning) -> dict[str, int] | None:
        """``widths`` as ``{group name: channels}`` (a list is matched to the groups in network order)."""
        if self.widths is None:
            return None
        names = source.graph.names
        if isinstance(self.widths, list):
            if len(self.widths) != len(names):
                raise ValueError(f"widths: {len(self.widths)} numbers for {len(names)} channel groups ({', '.join(names)})")
            return dict(zip(names, self.widths))
        return dict(self.widths)

    def check_widths(self, source: GatedPruning) -> None:
        """Check ``widths`` against the channel groups and the budget (run before training)."""
        widths = self.resolved_widths(source)
        if widths is None:
            return
        groups = source.graph.groups
        for name, width in widths.items():
            if name not in groups:
                raise ValueError(f"widths: unknown channel group {name!r}; the groups are {', '.join(groups)}")
            if isinstance(width, bool) or not isinstance(width, int):
                raise TypeError(f"widths[{name!r}] must be an int, got {type(width).__name__}")
            if not 1 <= width <= groups[name].size:
                raise ValueError(f"widths[{name!r}] must be in 1..{groups[name].size} (the group's channels), got {width}")
        masks = {**source.graph.full_masks(), **{n: torch.arange(groups[n].size) < w for n, w in widths.items()}}
        cost = source.cost_model.exact(masks, source.cost)
        if cost > source.target_cost:
            raise ValueError(
                f"widths: they keep {source.cost} {cost:,}, over the budget {source.target_cost:,.0f} "
                f"({source.budget:.4g} of {source.full_cost:,.0f}); narrow them or raise the budget"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        source = self.source(trainer)
        if self.pruned_at is None and trainer.current_epoch >= self.at_epoch and source.active:
            self.prune(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # Without an example input the network is traced on the first batch, after the first epoch start.
        source = self.source(trainer)
        if self.pruned_at is None and trainer.current_epoch >= self.at_epoch and source.graph is None:
            source.ensure_ready(trainer, pl_module, batch)
            self.prune(trainer, pl_module)

    def prune(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        source = self.source(trainer)
        widths = self.resolved_widths(source)
        masks = source.keep_masks(widths)
        cost = source.cost_model.exact(masks, source.cost)
        if cost > source.target_cost:
            raise RuntimeError(f"internal: hard masks cost {cost} > budget {source.target_cost}")
        before = source.measure()
        source.harden(trainer, pl_module, masks, shrink_network=self.shrink)
        after = source.measure()
        self.pruned_at = trainer.current_epoch
        widths_before = {n: int(m.numel()) for n, m in masks.items()}
        widths_after = {n: int(m.sum()) for n, m in masks.items()}
        self.summary = {
            "table": layer_table(before.cost, after.cost, before.widths, after.widths),
            "line": f"{source.cost} {cost:,} <= budget {source.target_cost:,.0f} "
            f"({100 * cost / source.full_cost:.1f}% of {source.full_cost:,.0f})",
            "widths_before": widths_before,
            "widths_after": widths_after,
            "title": f"{type(source).__name__}: {source.cost} budget {source.target_cost:,.0f}",
        }
        if self.verbose:
            rank_zero_info(
                f"HardPruning at epoch {self.pruned_at}: {self.summary['line']}; channels per group: "
                + ", ".join(f"{n} {widths_before[n]}->{widths_after[n]}" for n in widths_before)
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.pruned_at is None and not trainer.fast_dev_run:
            rank_zero_warn(
                f"HardPruning: fit ended in epoch {trainer.current_epoch} before hard pruning at epoch {self.at_epoch} "
                "(stopped early?): the network is not pruned and may be over its budget; "
                "lightning_prune.export refuses it unless allow_over_budget=True"
            )
        elif self.summary:
            self._report(trainer)

    @rank_zero_only
    def _report(self, trainer: L.Trainer) -> None:
        rank_zero_info(
            f"HardPruning at epoch {self.pruned_at}: {self.summary['line']}\n{self.summary['table']}\n"
            f"Checkpoints from epoch {self.pruned_at} on hold the smaller network: load them with "
            f"lightning_prune.load_checkpoint({type(trainer.lightning_module).__name__}(...), path), or resume with ckpt_path="
        )
        if self.plot:
            log_dir = Path(trainer.log_dir or trainer.default_root_dir)
            path = plot_alive_channels(
                self.summary["widths_before"], self.summary["widths_after"], log_dir / "alive_channels.png",
                title=self.summary["title"],
            )
            rank_zero_info(f"HardPruning: channels per group before and after saved to {path}")

    def state_dict(self) -> dict[str, Any]:
        return {"pruned_at": self.pruned_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruned_at = state_dict.get("pruned_at")

