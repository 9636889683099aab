"""``DirichletImportance``: Dirichlet importance switches learned on a trained network with
its weights frozen; their posterior means rank the channels, and a budget decides how many
each layer keeps (Adamczewski and Park, "Dirichlet Pruning for Neural Network Compression",
AISTATS 2021, arXiv:2011.05985).

How a run goes (one ``trainer.fit``)::

    epochs [0, from_epoch)               ordinary training; every switch is the identity
    epochs [from_epoch, end)             the switch phase: switches learn, weights frozen
    HardPruning(at_epoch=end)            channels chosen under the budget, network shrunk
    epochs [end, max_epochs)             the user's optimizer fine-tunes the small network

with ``end = from_epoch + epochs`` (``epochs=None``: until HardPruning's ``at_epoch``).
``from_epoch=0`` when the LightningModule arrives already trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_prune._checks import check_bool, check_int
from lightning_prune.callbacks.gated import GatedPruning
from lightning_prune.methods.dirichlet import DirichletSwitches


class DirichletImportance(GatedPruning):
    """Dirichlet pruning (Adamczewski & Park, AISTATS 2021) as a Lightning callback.

    One Dirichlet switch per prunable channel group (:class:`~lightning_prune.core.gates.DirichletSwitch`):
    the group's output channels are multiplied by ``K * s`` (K channels, ``s`` on the simplex),
    so a uniform switch is the identity and the switch phase starts from exactly the trained
    network. In the switch phase the switches learn from the user's loss (through the user's
    own backward pass) plus ``kl_weight * sum_l KL(Dir(phi_l) || Dir(alpha0))``, added by the
    gate optimizer after AMP unscaling, gradient accumulation and DDP's all-reduce.

    Estimators of the expected loss (Adamczewski and Park 2021):

    - ``"mean"``: the switch is its posterior mean ``E[s] = phi / sum(phi)`` (deterministic);
    - ``"gamma"``: ``samples`` (S) reparameterised samples per step, ``g ~ Gamma(phi, 1)``,
      ``s = g / sum g``; the network's output (logits) is the average of S forward passes,
      each with fresh samples (a forward hook re-runs the network S - 1 more times, in the
      switch phase and in training mode only; the S graphs are kept for the backward pass,
      so memory grows with S). Validation always uses the posterior mean.

    ``freeze_weights=True`` (the method's procedure): during the switch phase the user's
    optimizers change nothing. Their gradients are set to ``None`` in
    ``on_before_optimizer_step`` (after unscaling / accumulation / all-reduce, before the
    step), so SGD and Adam skip every parameter: no update, no weight decay, no momentum.
    Gradients are still computed, and ``requires_grad`` is left alone, because DDP fixes the
    set of parameters it reduces when it wraps the model. Normalisation layers with running
    statistics (batch norm) are put in eval mode for the phase, so the network the switches
    see is exactly the trained network and its statistics do not drift. The user's LR
    schedulers keep stepping (the callback does not touch them).

    Layer by layer (``layerwise=True``): the optimizer steps of the switch phase are split
    into equal consecutive parts, one per group in network order; in its part a group's
    switches act and learn while every other switch is the identity (the method's
    "layer by layer"; the default learns all switches jointly).

    The KL weight: the variational objective per training sample is
    ``E_q[CE] + KL / N`` with N training samples, so ``kl_weight=None`` (default) uses
    ``1 / N``, N = ``len(train_dataloader.dataset)`` (the user's loss being a batch mean).

    From importance to a pruned network (:meth:`keep_masks`, used by :class:`HardPruning`):
    channels are dropped greedily, the least important per unit of marginal cost first, until
    the exact cost meets the budget (:func:`~lightning_prune.core.allocation.fit_budget`); within a
    group that is the order of the posterior mean, across groups it decides the widths. What
    "least important" means across groups is ``allocation``:

    - ``"share"`` (default): dropping channel i of group l loses the share of the group's
      *kept* posterior mass it holds, ``log(m_l) - log(m_l - E[s_li])`` with ``m_l`` the sum of
      the kept ``E[s_l]``; the greedy maximises ``sum_l n_l log m_l`` (the product of the
      importance every layer keeps: a chain of layers is as good as its weakest) under the
      budget, so a layer gets harder to thin the more of its importance it has already lost.
      ``n_l`` is the number of layers writing group l's channels: 1 for a plain layer, 4 for a
      ResNet-20 stage's residual stream (stem or projection, and each block adding into it),
      which therefore weighs as the 4 layers it feeds from;
    - ``"score"``: the plain score ``K * E[s]`` (1 for every channel of a uniform switch, so
      comparable across widths) per unit of cost. Cost then dominates: on LeNet-5 under a MAC
      budget it empties the convolutions (1 channel left) before touching the cheap 500 fc
      units, see benchmarks/RESULTS.md;
    - ``"taylor"``: the share rule on each channel's first-order saliency, the mean over the
      switch phase's backward passes of ``|dL/dm * m|`` with ``m = K * E[s]`` its multiplier
      (Molchanov et al., ICLR 2017, arXiv:1611.06440, eq. 7, taken at the switch), each group
      weighted by its total saliency instead of ``n_l``: the first channel dropped from a group
      costs about its own saliency, a loss change comparable across layers, and each further
      one more (within a group the order is the saliency's). Under DDP the ranks' sums are
      added at the end of the switch phase.

    ``widths`` (a ``{group: channels}`` mapping, or a list in group order given to
    HardPruning) keeps the top channels by posterior mean instead.

    Args:
        budget, factor, cost, gate_lr, module, example_input, ignore, verbose, distillation,
            distill_fine_tuning, temperature, alpha: see
            :class:`~lightning_prune.callbacks.gated.GatedPruning` (``cost`` defaults to
            ``"macs"`` here: Adamczewski and Park report FLOPs).
        alpha0: concentration of the symmetric Dirichlet prior (< 1 favours sparse importance).
        kl_weight: weight of the summed KL divergences (nats); ``None``: ``1 / N``.
        estimator: ``"mean"`` or ``"gamma"``.
        samples: S, the switch samples averaged per step (``"gamma"`` only; 1 for ``"mean"``).
        from_epoch: first epoch of the switch phase.
        epochs: epochs of the switch phase; ``None``: until HardPruning's ``at_epoch`` (or
            the end of fit without HardPruning). With HardPruning, ``from_epoch + epochs``
            must equal its ``at_epoch``.
        freeze_weights: the user's optimizers change nothing during the switch phase.
        layerwise: learn one group's switches at a time instead of all jointly.
        init: initial Dirichlet concentration of every switch (uniform, so the identity).
        allocation: ``"share"``, ``"score"`` or ``"taylor"``: how channels of different groups
            are compared when choosing the widths under the budget (above).
        fill: after the greedy, add dropped channels back (highest posterior mean first)
            while the network stays under the budget: it spends what the last, overshooting
            drops left.
        residual: ``"tied"`` (default) or ``"mixed"`` residual blocks (see
            :func:`lightning_prune.core.trace.build_graph`): with ``"mixed"`` each residual
            branch has its own switch and the allocation may remove a branch entirely.
    """

    ALLOCATIONS = DirichletSwitches.ALLOCATIONS

    def __init__(
        self,
        *,
        budget: float | None = None,
        factor: float | None = None,
        cost: str = "macs",
        latency: Any = None,
        alpha0: float = 0.5,
        kl_weight: float | None = None,
        estimator: str = "mean",
        samples: int = 1,
        from_epoch: int = 0,
        epochs: int | None = None,
        freeze_weights: bool = True,
        layerwise: bool = False,
        init: float = 1.0,
        allocation: str = "share",
        fill: bool = True,
        gate_lr: float = 0.1,
        residual: str = "tied",
        module: str | None = None,
        example_input: Any = None,
        ignore: Sequence[str] = (),
        verbose: bool = True,
        distillation: bool = False,
        distill_fine_tuning: bool = False,
        temperature: float = 4.0,
        alpha: float = 0.9,
    ) -> None:
        self._method_args = {"alpha0": alpha0, "estimator": estimator, "init": init, "allocation": allocation,
                             "fill": fill, "gate_lr": gate_lr, "kl_scale": kl_weight, "residual": residual}
        super().__init__(budget=budget, factor=factor, cost=cost, latency=latency, module=module, example_input=example_input,
                         ignore=ignore, verbose=verbose, distillation=distillation, distill_fine_tuning=distill_fine_tuning,
                         temperature=temperature, alpha=alpha)
        self.samples = check_int("samples", samples, minimum=1)
        if estimator == "mean" and self.samples != 1:
            raise ValueError(f"samples must be 1 with estimator='mean' (the posterior mean is deterministic), got {samples}")
        if distillation and self.samples > 1:
            raise ValueError(f"distillation: the switch phase averages {samples} forward passes (samples); distil in it with samples=1, "
                             "or only through fine-tuning (distill_fine_tuning=True)")
        self.from_epoch = check_int("from_epoch", from_epoch, 0)
        self.epochs = None if epochs is None else check_int("epochs", epochs, minimum=1)
        for name, value in (("freeze_weights", freeze_weights), ("layerwise", layerwise)):
            check_bool(name, value)
        self.kl_weight = kl_weight
        self.freeze_weights = freeze_weights
        self.layerwise = layerwise
        self.end_epoch: int | None = None  # first epoch after the switch phase (None: never ends)
        self._hook: Any = None
        self._rerunning = False
        self._frozen_norms: list[nn.Module] = []
        self._epoch: int | None = None  # the epoch the switches were last set up for
        self._steps_per_epoch = 0

    def make_method(self) -> DirichletSwitches:
        return DirichletSwitches(**self._method_args)

    @property
    def learning_groups(self) -> tuple[str, ...]:
        return self.method.learning_groups

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        fresh = self.session is None
        super().setup(trainer, pl_module, stage)
        if fresh and self.session is not None and self.samples > 1:
            self._hook = self.session.network.register_forward_hook(self._average_samples, with_kwargs=True)

    def _plan(self) -> None:
        """The end of the switch phase, from ``epochs`` or HardPruning's epoch (known once every
        callback's ``on_fit_start`` ran)."""
        at_epoch = self.session.hard_pruning_epoch
        if self.epochs is not None:
            self.end_epoch = self.from_epoch + self.epochs
            if at_epoch is not None and at_epoch != self.end_epoch:
                raise ValueError(
                    f"epochs: the switch phase ends at epoch from_epoch + epochs = {self.end_epoch}, "
                    f"but HardPruning prunes at epoch {at_epoch}; make them equal (or leave epochs=None)"
                )
        elif at_epoch is not None:
            if at_epoch <= self.from_epoch:
                raise ValueError(
                    f"from_epoch: the switch phase starts at epoch {self.from_epoch}, but HardPruning prunes at epoch "
                    f"{at_epoch}; the switches need at least one epoch before it"
                )
            self.end_epoch = at_epoch
        elif self.layerwise:
            raise ValueError("layerwise: the switch phase must have an end to share it among the groups; give epochs or add HardPruning")

    # -- which switches act ----------------------------------------------------------------------
    @property
    def learning(self) -> bool:
        """True while some switches act and learn (the switch phase, before hard pruning)."""
        return self.active and bool(self.learning_groups)

    def learn(self, groups: Iterable[str] | None = None) -> None:
        """Let the switches of ``groups`` (all groups when ``None``) act and learn; every other
        switch is the identity. ``learn(())`` makes every switch the identity. Called by the
        callback at every epoch (and, layer by layer, every batch); public to drive the
        switches by hand."""
        if self.session is None or self.gates is None:
            raise RuntimeError("DirichletImportance: no switches (setup has not run, or they were hardened)")
        self.method.learn(self.session, groups)

    def in_switch_phase(self, epoch: int) -> bool:
        return epoch >= self.from_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._enter_epoch(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        traced_now = self.ensure_traced(trainer, batch)
        if traced_now or self._epoch != trainer.current_epoch:  # resumed mid-epoch: on_train_epoch_start did not run
            self._enter_epoch(trainer)
        if self.layerwise and self.active and self.in_switch_phase(trainer.current_epoch):
            self.learn((self.layer_at(trainer.current_epoch, batch_idx // trainer.accumulate_grad_batches),))

    def _enter_epoch(self, trainer: L.Trainer) -> None:
        self._epoch = trainer.current_epoch
        if not self.active:
            self._restore_norms()
            return
        if self.end_epoch is None:
            self._plan()
        if not self.in_switch_phase(trainer.current_epoch):
            self.learn(())
            self._restore_norms()
            return
        if self.method.kl_scale is None:
            self.method.kl_scale = 1.0 / self._num_samples(trainer)
        if self.freeze_weights:
            self._freeze_norms()
        if self.layerwise:
            self._steps_per_epoch = -(-trainer.num_training_batches // trainer.accumulate_grad_batches)
            total = self._steps_per_epoch * (self.end_epoch - self.from_epoch)
            if total < len(self.gates):
                raise ValueError(
                    f"layerwise: the switch phase has {total} optimizer steps for {len(self.gates)} channel groups; "
                    "give it more epochs or batches"
                )
        else:
            self.learn(None)

    def layer_at(self, epoch: int, step_in_epoch: int) -> str:
        """Layer by layer: the group whose switches learn at this optimizer step of this epoch."""
        names = tuple(self.gates)
        total = self._steps_per_epoch * (self.end_epoch - self.from_epoch)
        step = (epoch - self.from_epoch) * self._steps_per_epoch + step_in_epoch
        return names[min(len(names) - 1, step * len(names) // total)]

    @staticmethod
    def _num_samples(trainer: L.Trainer) -> int:
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        try:
            n = len(dataset)
        except TypeError:
            n = 0
        if n < 1:
            raise ValueError(
                "kl_weight: the number of training samples is unknown (the train dataloader has no sized dataset); "
                "give kl_weight (e.g. 1 / number of training samples)"
            )
        return n

    def _freeze_norms(self) -> None:
        if self._frozen_norms:
            return
        for m in self.session.network.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.training:
                m.eval()
                self._frozen_norms.append(m)

    def _restore_norms(self) -> None:
        for m in self._frozen_norms:
            m.train()
        self._frozen_norms = []

    # -- the gamma estimator with S samples ------------------------------------------------------
    def _average_samples(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._rerunning or not (self.learning and module.training and torch.is_grad_enabled()):
            return None
        if not isinstance(output, Tensor):
            raise TypeError(
                f"samples: averaging {self.samples} switch samples needs a network that returns a tensor, "
                f"{type(module).__name__} returned {type(output).__name__}"
            )
        self._rerunning = True
        try:
            total = output
            for _ in range(self.samples - 1):
                total = total + module(*args, **kwargs)
        finally:
            self._rerunning = False
        return total / self.samples

    # -- the switch phase's steps ---------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self.active:
            return
        for name, gate in self.gates.items():
            if name not in self.learning_groups:
                gate.theta.grad = None  # the identity's zero gradient must not move Adam's state
        if not self.learning_groups:
            return
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if self.freeze_weights:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.learning:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self.active and self.in_switch_phase(trainer.current_epoch)):
            return
        if self.end_epoch is None or trainer.current_epoch != self.end_epoch - 1:
            return
        # every rank recorded the saliency of its own batches: sum them so the ranks allocate alike
        self.method.reduce_saliency(self.session, lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        if self.verbose:
            rank_zero_info(
                "DirichletImportance: learned importance K * E[s] (min / max) per group: "
                + ", ".join(f"{n} {float(s.min()):.3g}/{float(s.max()):.3g}" for n, s in self.importance().items())
            )

    # -- importance ---------------------------------------------------------------------------------
    def importance(self) -> dict[str, Tensor]:
        """``{group: K * E[s]}`` per channel (CPU, detached): the posterior mean of each switch
        times its number of channels, 1 for every channel of a uniform switch."""
        if self.session is None or self.gates is None:
            raise RuntimeError("DirichletImportance: no switches (setup has not run, or they were hardened)")
        return self.method.scores(self.session)
