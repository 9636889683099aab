"""``HardPruning``: turns learned gates into fixed masks under the budget, freezes them and
shrinks the network, so the remaining epochs train the small network."""

from __future__ import annotations

import copy
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
from lightning_prune.core.surgery import shrink as shrink_network


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
        latency_rounds: with a latency budget, the dense network and the chosen pruned one are
            timed together, interleaved, in their inference form (by rank 0 under DDP, whose
            masks every rank then takes). While the measured ratio pruned / dense is above the
            budget's fraction, the masks are chosen again under a target narrowed by the
            measured overshoot, at most ``latency_rounds`` times (0: time once and report). The
            latency model predicts; this makes the measurement meet the budget as well (the
            empirical check of NetAdapt, Yang et al., ECCV 2018, arXiv:1804.03230). Not with ``widths``.
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
        latency_rounds: int = 3,
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
        self.latency_rounds = check_int("latency_rounds", latency_rounds, 0)
        self.shrink = shrink
        self.freeze = freeze
        self.widths = dict(widths) if isinstance(widths, Mapping) else list(widths) if widths is not None else None
        self.plot = plot
        self.verbose = verbose
        self.pruned_at: int | None = None
        self.summary: dict[str, Any] = {}
        self.latency: dict[str, Any] | None = None  # with a latency budget: predicted, measured and budget ms

    @property
    def state_key(self) -> str:
        return self._generate_state_key(at_epoch=self.at_epoch)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.check_schedule(trainer)

    def check_schedule(self, trainer: L.Trainer) -> None:
        """Raise if ``trainer``'s run ends before ``at_epoch`` (called at setup; callers that
        train before the pruning fit call it first, so the error comes before any training)."""
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
        if session.cost == LATENCY:
            masks, self.latency = self._meet_measured_latency(trainer, session, masks)
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
            report = self.latency
            report.update(predicted_ms=cost / 1e6, budget_ms=budget.target / 1e6)
            narrowed = len(report["rounds"]) - 1
            line = (  # the budget holds for the prediction; the measurement is reported beside it
                f"latency predicted {report['predicted_ms']:.2f} ms <= budget {report['budget_ms']:.2f} ms "
                f"({100 * cost / budget.full:.1f}% of the dense {budget.full / 1e6:.2f} ms; batch "
                f"{session.latency.key.batch_size}, {session.latency.key.threads} thread(s)), measured {report['measured_ms']:.2f} ms, "
                f"{report['measured_ratio']:.3f} of the dense network's {report['dense_measured_ms']:.2f} ms timed with it "
                f"(budget {budget.fraction:.3f})" + (f"; masks chosen again {narrowed} time(s) to meet the measurement" if narrowed else "")
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

    def _meet_measured_latency(
        self, trainer: L.Trainer, session: PruningSession, masks: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Time the dense network and the network ``masks`` leave, in their inference form,
        interleaved; choose the masks again under a narrowed target while the measured ratio
        is over the budget (``latency_rounds`` times at most). Rank 0 measures and chooses;
        every rank takes its masks. Returns the masks and the rounds' measurements."""
        budget = session.budget
        rounds: list[dict[str, float]] = []
        if trainer.is_global_zero:
            example = session.graph.example_input()
            bare = session.bare_copy().eval()
            dense = export(bare, inference=True, example_input=example, allow_over_budget=True)
            fraction = budget.fraction
            for attempt in range(self.latency_rounds + 1):
                pruned = copy.deepcopy(bare)
                shrink_network(pruned, masks, graph=session.graph)
                timed = time_network({"dense": dense, "pruned": export(pruned, inference=True, example_input=example, allow_over_budget=True)},
                                     session.latency, example)
                ratio = timed["pruned"] / timed["dense"]
                rounds.append({"fraction": fraction, "dense_ms": timed["dense"] / 1e6, "pruned_ms": timed["pruned"] / 1e6, "ratio": ratio})
                narrower = max(fraction * budget.fraction / ratio, budget.floor / budget.full)
                if ratio <= budget.fraction or self.widths is not None or attempt == self.latency_rounds or narrower == fraction:
                    break  # met, not the method's choice, out of rounds, or already at the floor (the same masks again)
                fraction = narrower
                with budget.narrowed(fraction):
                    masks = session.keep_masks(round_to=self.round_to)
            if rounds[-1]["ratio"] > budget.fraction and self.verbose:
                rank_zero_warn(
                    f"HardPruning: the pruned network measured {rounds[-1]['ratio']:.3f} of the dense network's latency, over the "
                    f"budget's {budget.fraction:.3f}" + ("" if self.widths is not None else f", after {len(rounds) - 1} narrowed choice(s)")
                    + " (timing noise, or a latency model measured under other load: measure it again)"
                )
        masks, rounds = trainer.strategy.broadcast((masks, rounds), src=0)
        last = rounds[-1]
        return masks, {"measured_ms": last["pruned_ms"], "dense_measured_ms": last["dense_ms"], "measured_ratio": last["ratio"],
                       "rounds": rounds}

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

