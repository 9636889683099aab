"""``HardPruning``: turns learned gates into fixed masks under the budget, freezes them and
shrinks the network, so the remaining epochs train the small network."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from lightning_prune._checks import check_bool, check_int
from lightning_prune.callbacks.gated import require_session, rewrap_ddp
from lightning_prune.callbacks.report import layer_table, plot_alive_channels
from lightning_prune.core.cost.latency import LATENCY
from lightning_prune.core.cost.latency_measure import time_network
from lightning_prune.core.export import export
from lightning_prune.core.session import PruningSession


class HardPruning(Callback):
    """At the start of epoch ``at_epoch``, replace the gates of the pruning session (opened by
    :class:`BudgetAwareRegularization`, :class:`DirichletImportance` or :class:`RandomPruning`)
    by hard masks.

    The masks come from the session's method (BAR: alive channels, repaired to meet the budget;
    Dirichlet: global allocation by importance per unit of cost; Random: channels dropped at
    random until the budget is met) or from ``widths`` (``{group name: channels to keep}``,
    checked against the groups and the budget before training). The final cost is checked
    against the budget.

    Args (keyword-only except ``at_epoch``):
        at_epoch: epoch at whose start the masks are fixed (without an example input and with
            ``at_epoch=0``: at the first batch after the network was traced on it).
        shrink: remove the dropped channels physically (the user's optimizer state is sliced
            along; under DDP the module is wrapped anew, so DDP follows the new parameters).
        freeze: must be True: after hard pruning the gate parameters no longer change
            (Lemaire et al. 2019, supplementary material, Sec. 3.1). Kept as an argument for configs that state it.
        widths: optional explicit channels per group instead of the budget-driven choice:
            ``{group name: channels}``, or a list with one number per group in network order
            (e.g. ``[5, 8, 15]`` for LeNet-5's groups features.0, features.2, classifier.1).
        round_to: optional hardware-friendly widths: every group keeps a multiple of
            ``round_to`` channels (e.g. 8 or 16 for the vector and matrix units that compute
            whole tiles of channels), or its full width (a group narrower than ``round_to``
            stays whole; a residual branch of a mixed-connectivity block may be removed). The
            method's choice is rounded to the nearest multiple by its channel scores, then
            narrowed ``round_to`` channels at a time (the group losing the least score per unit
            of cost saved) until the exact cost meets the budget; a ``ValueError`` if it
            cannot (:func:`lightning_prune.core.allocation.round_widths`). With ``widths``,
            each must be such a multiple (checked before training).
        plot: save ``alive_channels.png`` (channels per group before and after) in the log folder.
    """

    def __init__(
        self,
        at_epoch: int,
        *,
        shrink: bool = True,
        freeze: bool = True,
        widths: Mapping[str, int] | Sequence[int] | None = None,
        round_to: int | None = None,
        plot: bool = True,
        verbose: bool = True,
    ) -> None:
        self.at_epoch = check_int("at_epoch", at_epoch, 0)
        for name, value in (("shrink", shrink), ("freeze", freeze), ("plot", plot)):
            check_bool(name, value)
        if not freeze:
            raise ValueError("freeze must be True: hard-pruned gates are fixed masks (Lemaire et al. 2019, supplementary material, Sec. 3.1)")
        if widths is not None and (isinstance(widths, str) or not isinstance(widths, (Mapping, Sequence))):
            raise TypeError("widths must be a mapping {group name: channels to keep}, a list (one per group) or None")
        self.round_to = None if round_to is None else check_int("round_to", round_to, 1)
        self.shrink = shrink
        self.freeze = freeze
        self.widths = dict(widths) if isinstance(widths, Mapping) else list(widths) if widths is not None else None
        self.plot = plot
        self.verbose = verbose
        self.pruned_at: int | None = None
        self.summary: dict[str, Any] = {}
        self.latency: dict[str, float] | None = None  # with a latency budget: predicted, measured and budget ms

    @property
    def state_key(self) -> str:
        return self._generate_state_key(at_epoch=self.at_epoch)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        max_epochs = trainer.max_epochs
        if not trainer.fast_dev_run and max_epochs is not None and max_epochs >= 0 and self.at_epoch >= max_epochs:
            raise ValueError(
                f"at_epoch: hard pruning at epoch {self.at_epoch} never happens in a run of max_epochs={max_epochs} "
                f"(epochs 0-{max_epochs - 1}); prune earlier or train longer"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        session = require_session(pl_module, "HardPruning")
        session.hard_pruning_epoch = self.at_epoch
        if self.widths is not None:
            session.when_traced(lambda s: s.check_widths(self.widths, round_to=self.round_to) if s.active else None)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_prune(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._maybe_prune(trainer, pl_module)  # the network was traced on the first batch, after the epoch start

    def _maybe_prune(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        session = require_session(pl_module, "HardPruning")
        if self.pruned_at is None and trainer.current_epoch >= self.at_epoch and session.active:
            self.prune(trainer, session)

    def prune(self, trainer: L.Trainer, session: PruningSession) -> None:
        masks = session.keep_masks(self.widths, round_to=self.round_to)
        dropped = getattr(session.method, "dropped", None)
        if dropped and self.widths is None and self.verbose:
            rank_zero_warn(
                f"HardPruning: the channels the method kept cost more than the budget {session.budget.target:,.0f}; "
                "dropped (the method's rule): " + ", ".join(f"{n}: {len(d)}" for n, d in dropped.items())
            )
        cost = session.cost_model.exact(masks, session.cost)
        graph = session.graph
        checked = graph.check_masks(masks)
        effective = graph.effective_masks(checked)  # a branch channel adding into a removed stream channel is gone too
        gone = graph.removed_layers(checked)  # the layers of residual branches that keep no channel
        removed = [n for n, g in graph.groups.items() if gone and set(g.layers) <= gone]
        before = session.measure()
        session.harden(masks, shrink=self.shrink, optimizers=trainer.optimizers)
        rewrap_ddp(trainer)  # the learned gates (and the removed channels) are gone
        after = session.measure()
        self.pruned_at = session.pruned_at = trainer.current_epoch
        budget = session.budget
        widths_before = {n: int(m.numel()) for n, m in masks.items()}
        widths_after = {n: 0 if n in removed else int(effective[n].sum()) for n in masks}
        line = f"{session.cost} {cost:,} <= budget {budget.target:,.0f} ({100 * cost / budget.full:.1f}% of {budget.full:,.0f})"
        if session.cost == LATENCY:
            self.latency = self._measure_latency(session, cost)
            line = (  # the budget holds for the prediction; the measurement is reported beside it
                f"latency predicted {self.latency['predicted_ms']:.2f} ms <= budget {self.latency['budget_ms']:.2f} ms "
                f"({100 * cost / budget.full:.1f}% of the dense {budget.full / 1e6:.2f} ms; batch "
                f"{session.latency.key.batch_size}, {session.latency.key.threads} thread(s)), measured {self.latency['measured_ms']:.2f} ms"
            )
        self.summary = {
            "table": layer_table(before.cost, after.cost, before.widths, after.widths),
            "removed": list(removed),
            "line": line + (f", widths multiples of {self.round_to}" if self.round_to is not None else ""),
            "widths_before": widths_before,
            "widths_after": widths_after,
            "title": f"{session.method.name}: {session.cost} budget {budget.target:,.0f}",
        }
        if self.verbose:
            rank_zero_info(
                f"HardPruning at epoch {self.pruned_at}: {self.summary['line']}; channels per group: "
                + ", ".join(f"{n} {widths_before[n]}->{'removed' if n in removed else widths_after[n]}" for n in widths_before)
            )

    @staticmethod
    def _measure_latency(session: PruningSession, predicted: int) -> dict[str, float]:
        """The hard-pruned network's latency in its inference form, measured now, next to the
        latency model's prediction (milliseconds per batch)."""
        inference = export(session.network, inference=True, example_input=session.graph.example_input())
        measured = time_network({"pruned": inference}, session.latency, session.graph.example_input())["pruned"]
        return {"predicted_ms": predicted / 1e6, "measured_ms": measured / 1e6, "budget_ms": session.budget.target / 1e6}

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
                title=self.summary["title"], removed=self.summary["removed"],
            )
            rank_zero_info(f"HardPruning: channels per group before and after saved to {path}")

    def state_dict(self) -> dict[str, Any]:
        return {"pruned_at": self.pruned_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruned_at = state_dict.get("pruned_at")

