"""``HardPruning``: turns learned gates into fixed masks under the budget, freezes them and
shrinks the network, so the remaining epochs train the small network."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

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
            along). Under DDP the network is masked instead and shrunk at the end of fit,
            because DDP cannot follow parameters that change shape; a message says so.
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
        self.deferred_shrink = False
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
        if stage == "fit":
            self.source(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        source = self.source(trainer)
        if self.pruned_at is None and trainer.current_epoch >= self.at_epoch and source.active:
            self.prune(trainer, pl_module)

    def prune(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        source = self.source(trainer)
        widths = self.widths
        if isinstance(widths, list):
            names = source.graph.names
            if len(widths) != len(names):
                raise ValueError(f"widths: {len(widths)} numbers for {len(names)} channel groups ({', '.join(names)})")
            widths = dict(zip(names, widths))
        masks = source.keep_masks(widths)
        cost = source.cost_model.exact(masks, source.cost)
        if self.widths is None and cost > source.target_cost:
            raise RuntimeError(f"internal: hard masks cost {cost} > budget {source.target_cost}")
        before = source.measure()
        self.deferred_shrink = self.shrink and trainer.world_size > 1
        if self.deferred_shrink:
            rank_zero_info(
                "HardPruning: under DDP the dropped channels are masked now and removed at the end of fit "
                "(DDP cannot follow parameters that change shape)"
            )
        source.harden(trainer, pl_module, masks, shrink_network=self.shrink and not self.deferred_shrink)
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
        if self.deferred_shrink:
            self.source(trainer).shrink_masked()
            self.deferred_shrink = False
        if self.summary:
            self._report(trainer)

    @rank_zero_only
    def _report(self, trainer: L.Trainer) -> None:
        rank_zero_info(f"HardPruning at epoch {self.pruned_at}: {self.summary['line']}\n{self.summary['table']}")
        if self.plot:
            log_dir = Path(trainer.log_dir or trainer.default_root_dir)
            path = plot_alive_channels(
                self.summary["widths_before"], self.summary["widths_after"], log_dir / "alive_channels.png",
                title=self.summary["title"],
            )
            rank_zero_info(f"HardPruning: channels per group before and after saved to {path}")

    def state_dict(self) -> dict[str, Any]:
        return {"pruned_at": self.pruned_at, "deferred_shrink": self.deferred_shrink}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruned_at = state_dict.get("pruned_at")
        self.deferred_shrink = state_dict.get("deferred_shrink", False)

