"""The benchmark's methods. Each takes the same trained dense network (a copy), the same
number of epochs after it (``task.prune.epochs``, its own schedule inside them) and returns
the pruned, fine-tuned plain network; the runner measures and scores it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torch_pruning as tp
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelPruning
from omegaconf import DictConfig
from torch import Tensor, nn

from lightning_prune.bench.training import TOY_BATCHES, dense_epochs, fit
from lightning_prune.callbacks import (
    BudgetAwareRegularization,
    DirichletImportance,
    HardPruning,
    RandomPruning,
    SigmoidalBudgetAnnealing,
)
from lightning_prune.core.cost import count_cost
from lightning_prune.core.session import session_of


@dataclass
class Run:
    """What every method gets."""

    cfg: DictConfig
    datamodule: L.LightningDataModule
    dense: nn.Module  # trained; methods work on copies
    example: Tensor  # one zero input
    target: float  # the budget in ``cost`` units
    latency: Any = None  # with budget.cost=latency: the dense network's LatencyTable
    info: dict[str, Any] = field(default_factory=dict)  # what the method wants recorded

    @property
    def cost(self) -> str:
        return self.cfg.budget.cost

    @property
    def epochs(self) -> int:
        return int(self.cfg.task.prune.epochs)

    def spend(self, net: nn.Module) -> int:
        was = net.training
        value = count_cost(net.eval(), self.example)[self.cost]
        net.train(was)
        return value

    def head(self, net: nn.Module) -> list[nn.Module]:
        """The output layer (never pruned)."""
        return [m for m in net.modules() if isinstance(m, nn.Linear) and m.out_features == self.datamodule.num_classes][-1:]


def _common(run: Run) -> dict[str, Any]:
    return {"factor": float(run.cfg.budget.factor), "cost": run.cost, "latency": run.latency,
            "example_input": tuple(run.example.shape[1:]), "verbose": False}


def _record_latency(run: Run, callbacks: list[Callback]) -> None:
    """With a latency budget: the predicted and measured latency HardPruning reported."""
    for callback in callbacks:
        if isinstance(callback, HardPruning) and callback.latency is not None:
            run.info["latency"] = dict(callback.latency)


class _AliveTrace(Callback):
    """Records, at the end of every epoch while gates learn, the alive channels per group, the
    network's current cost and the method's last logged values (budget, barrier, ...)."""

    def __init__(self, method: Callable[[], Any]) -> None:
        self.method, self.epochs = method, []

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = list(state_dict["epochs"])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        session = session_of(pl_module)
        if session is None or not session.active:
            return
        alive = {n: int(m.sum()) for n, m in session.current_masks().items()}
        last = {k: round(float(v), 4) for k, v in (getattr(self.method(), "last", None) or {}).items()}
        self.epochs.append({"epoch": trainer.current_epoch, "cost": int(session.current_cost()), "alive": alive, **last})


def bar(run: Run) -> nn.Module:
    m = run.cfg.method
    soft = max(1, min(run.epochs - 1, round(run.epochs * m.soft_fraction)))
    if not 0 < float(m.anneal_fraction) <= 1:
        raise ValueError(f"method.anneal_fraction must be in (0, 1], got {m.anneal_fraction}")
    callbacks = [
        BudgetAwareRegularization(**_common(run), lambda_=m.lambda_, margin=m.margin, margin_of=m.margin_of, cap=m.cap, fill=m.fill, gate_lr=m.gate_lr,
                                  gate_optimizer=m.gate_optimizer, init_log_alpha=m.init_log_alpha, penalty=m.penalty, cost_power=m.cost_power, repair=m.repair,
                                  distillation=m.distillation, distill_fine_tuning=m.distill_fine_tuning, residual=m.residual),
        SigmoidalBudgetAnnealing(soft * float(m.anneal_fraction), hardness=m.hardness, interpolation=m.anneal_interpolation),
        HardPruning(soft, plot=False, verbose=False),
    ]
    trace = _AliveTrace(lambda: callbacks[0].method)
    callbacks.append(trace)
    run.info["prune_epoch"] = soft
    net = fit(run.cfg, run.datamodule, copy.deepcopy(run.dense), run.cfg.task.prune, run.epochs, callbacks)
    _record_latency(run, callbacks)
    method = callbacks[0].method  # what hard pruning had to repair: the soft phase ended over budget
    run.info.update(repair_dropped={n: len(d) for n, d in method.dropped.items()}, capped_steps=method.capped_steps,
                    refilled={n: len(d) for n, d in method.refilled.items()},
                    soft_phase=trace.epochs)
    return net


def dirichlet(run: Run) -> nn.Module:
    m = run.cfg.method
    switch = max(1, min(run.epochs - 1, int(m.switch_epochs)))
    callbacks = [
        DirichletImportance(**_common(run), alpha0=m.alpha0, gate_lr=m.gate_lr, allocation=m.allocation, fill=m.fill, epochs=switch,
                            distill_fine_tuning=m.distill_fine_tuning, residual=m.residual, freeze_weights=m.freeze_weights,
                            estimator=m.estimator),
        HardPruning(switch, plot=False, verbose=False),
    ]
    run.info["prune_epoch"] = switch
    net = fit(run.cfg, run.datamodule, copy.deepcopy(run.dense), run.cfg.task.prune, run.epochs, callbacks)
    _record_latency(run, callbacks)
    return net


def random(run: Run) -> nn.Module:
    callbacks = [RandomPruning(**_common(run), seed=int(run.cfg.seed), distill_fine_tuning=run.cfg.method.distill_fine_tuning),
                 HardPruning(0, plot=False, verbose=False)]
    net = fit(run.cfg, run.datamodule, copy.deepcopy(run.dense), run.cfg.task.prune, run.epochs, callbacks)
    _record_latency(run, callbacks)
    return net


def width(run: Run) -> nn.Module:
    """The widest uniformly thinned network under the budget (bisection on the multiplier),
    trained from scratch for the dense epochs (warm restarts included) plus the pruning epochs,
    with the dense recipe stretched over them."""
    build = lambda w: instantiate(run.cfg.task.model, num_classes=run.datamodule.num_classes, width=w)  # noqa: E731
    low, high = 0.0, 1.0
    for _ in range(30):
        mid = (low + high) / 2
        if run.spend(build(mid)) <= run.target:
            low = mid
        else:
            high = mid
    if low == 0.0:
        raise ValueError(f"width: no width multiplier meets the budget {run.target:,.0f} {run.cost}")
    run.info["width"] = low
    dense = run.cfg.task.dense
    epochs = dense_epochs(run.cfg) + run.epochs
    run.info["epochs_from_scratch"] = epochs
    return fit(run.cfg, run.datamodule, build(low), dense, epochs, planned=int(dense.epochs))


def _held_out(run: Run, n: int) -> tuple[Tensor, Tensor]:
    """``n`` images the search may score on: the validation split, else the first training
    images in a fixed order (never the test set)."""
    dm = run.datamodule
    dataset = dm.val_set if dm.val_set is not None and len(dm.val_set) > 0 else dm.train_set
    xs, ys = zip(*(dataset[i] for i in range(min(n, len(dataset)))))
    return torch.stack(xs), torch.as_tensor(ys)


def adans(run: Run) -> nn.Module:
    """AdaNS-Gaussian (Javaheripi et al., IEEE JSTSP 2020) over per-layer keep fractions
    (structured pruning), every candidate repaired to the budget and scored on held-out images
    without training (with ``calibration_size`` > 0, after re-estimating its batch-norm
    statistics on that many other held-out images); the best candidate is built and fine-tuned
    for all the epochs. With ``finalists`` k > 1, the k best candidates are each fine-tuned
    for ``finalist_epochs`` and scored again on the same held-out images; the best of them
    trains on for the epochs left (the k trials count against the method's epochs, so the
    winner gets ``epochs - (k - 1) * finalist_epochs`` in all, the schedule restarted)."""
    from lightning_prune.search import CompressionSearch, CompressionSpace
    from lightning_prune.search.spaces import top1

    m = run.cfg.method
    net = copy.deepcopy(run.dense).eval()
    space = CompressionSpace(net, run.example, "structured", run.cost)
    eval_size, rank_size = (64, 64) if run.cfg.toy else (int(m.eval_size), int(m.rank_size))
    calibration_size = min(int(m.calibration_size), 64) if run.cfg.toy else int(m.calibration_size)
    inputs, targets = _held_out(run, eval_size + rank_size + calibration_size)
    calibration = inputs[eval_size + rank_size :] if calibration_size else None
    batch = 100
    space.rank_channels([(inputs[eval_size + i : eval_size + i + batch], targets[eval_size + i : eval_size + i + batch])
                         for i in range(0, rank_size, batch)])
    accuracy = lambda x: space.accuracy(x, inputs[:eval_size], targets[:eval_size], calibration=calibration)  # noqa: E731
    reference = accuracy(space.search_space.identity)
    search = CompressionSearch(
        space.search_space, sampler=m.sampler, batch_size=4 if run.cfg.toy else int(m.batch_size),
        iterations=2 if run.cfg.toy else int(m.iterations), threshold=max(0.0, reference - float(m.max_drop)),
        boundary_steps=None if run.cfg.toy or m.boundary_steps is None else int(m.boundary_steps), seed=int(run.cfg.seed),
        budget=1.0 / float(run.cfg.budget.factor), fill_budget=bool(m.fill_budget),
    )
    best = search.run(lambda xs: [{"accuracy": accuracy(x), "cost": float(space.predict_cost(x))} for x in xs])
    run.info.update(search_reference_accuracy=reference, search_best=best, evaluations=len(search.log))
    finalists, trial = int(m.finalists), int(m.finalist_epochs)
    if finalists == 1:
        return fit(run.cfg, run.datamodule, space.compress(best["x"]), run.cfg.task.prune, run.epochs)
    if trial < 1 or finalists * trial >= run.epochs:
        raise ValueError(f"method.finalists * method.finalist_epochs ({finalists} * {trial}) must be at least 1 and less "
                         f"than the {run.epochs} epochs: the winner trains on for the epochs left")
    tried = []
    for candidate in search.top(finalists):
        net = fit(run.cfg, run.datamodule, space.compress(candidate["x"]), run.cfg.task.prune, trial)
        tuned = top1(net, inputs[:eval_size], targets[:eval_size])
        tried.append((tuned, net))
        run.info.setdefault("finalists", []).append({"x": candidate["x"], "search_accuracy": candidate["accuracy"],
                                                     "tuned_accuracy": tuned})
    winner = max(range(finalists), key=lambda i: tried[i][0])  # the first of equals: the better search score
    run.info["finalist_chosen"] = winner
    return fit(run.cfg, run.datamodule, tried[winner][1], run.cfg.task.prune, run.epochs - finalists * trial)


# -- Torch-Pruning's pruners, through its public API ----------------------------------------------

class _TaylorGradients:
    """Gradients of the training loss on a few batches, for Taylor importance."""

    def __init__(self, run: Run, batches: int) -> None:
        self.run, self.batches = run, batches

    def __call__(self, net: nn.Module) -> None:
        net.zero_grad()
        net.train()
        for i, (x, y) in enumerate(self.run.datamodule.train_dataloader()):
            if i >= self.batches:
                break
            F.cross_entropy(net(x), y).backward()


def _tp_prune(run: Run, net: nn.Module, pruner: Any, before_step: Callable[[nn.Module], None] | None = None) -> None:
    """Torch-Pruning's own iterative steps until the budget is met."""
    steps = int(run.cfg.method.iterative_steps)
    for step in range(steps):
        if run.spend(net) <= run.target:
            break
        if before_step is not None:
            before_step(net)
        pruner.step()
    else:
        if run.spend(net) > run.target:
            raise ValueError(f"{run.cfg.method.name}: {steps} iterative steps did not reach the budget")
    run.info["tp_steps"] = step
    net.zero_grad(set_to_none=True)


def _tp_pruner(run: Run, net: nn.Module, importance: Any, cls: Any = tp.pruner.MetaPruner, **kwargs: Any) -> Any:
    m = run.cfg.method
    return cls(net, run.example, importance=importance, global_pruning=bool(m.global_pruning), pruning_ratio=1.0,
               max_pruning_ratio=0.95, iterative_steps=int(m.iterative_steps), ignored_layers=run.head(net), **kwargs)


def tp_l1(run: Run) -> nn.Module:
    net = copy.deepcopy(run.dense)
    _tp_prune(run, net, _tp_pruner(run, net, tp.importance.GroupMagnitudeImportance(p=1)))
    return fit(run.cfg, run.datamodule, net, run.cfg.task.prune, run.epochs)


def tp_taylor(run: Run) -> nn.Module:
    net = copy.deepcopy(run.dense)
    batches = TOY_BATCHES if run.cfg.toy else int(run.cfg.method.taylor_batches)
    _tp_prune(run, net, _tp_pruner(run, net, tp.importance.GroupTaylorImportance()), _TaylorGradients(run, batches))
    return fit(run.cfg, run.datamodule, net, run.cfg.task.prune, run.epochs)


class _GroupNormRegularizer(Callback):
    """Adds Torch-Pruning's group-norm sparsity gradient after every backward pass."""

    def __init__(self, pruner: Any) -> None:
        self.pruner = pruner

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.pruner.regularize(pl_module.net)


def tp_groupnorm(run: Run) -> nn.Module:
    m = run.cfg.method
    net = copy.deepcopy(run.dense)
    pruner = _tp_pruner(run, net, tp.importance.GroupMagnitudeImportance(p=2), cls=tp.pruner.GroupNormPruner, reg=float(m.reg))
    sparse = max(1, min(run.epochs - 1, round(run.epochs * m.sparse_fraction)))
    pruner.update_regularizer()
    net = fit(run.cfg, run.datamodule, net, run.cfg.task.prune, sparse, [_GroupNormRegularizer(pruner)], planned=run.epochs)
    _tp_prune(run, net, pruner)
    run.info["sparse_epochs"] = sparse
    return fit(run.cfg, run.datamodule, net, run.cfg.task.prune, run.epochs - sparse, planned=run.epochs)


def lightning_l1(run: Run) -> nn.Module:
    """Lightning's ModelPruning (L1 structured over output channels, the same amount in every
    layer but the head) at the first epoch, then fine-tuning with the masks: a reference row,
    its MACs do not drop."""
    net = copy.deepcopy(run.dense)
    layers = [(mod, "weight") for mod in net.modules() if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod not in run.head(net)]
    amount = 1.0 - (1.0 / float(run.cfg.budget.factor)) ** 0.5  # in and out channels thinned alike: cost ~ (1 - amount)^2
    run.info["amount"] = amount
    pruning = ModelPruning("ln_structured", parameters_to_prune=layers, amount=amount, pruning_dim=0, pruning_norm=1,
                           use_global_unstructured=False, apply_pruning=lambda epoch: epoch == 0,
                           make_pruning_permanent=True, verbose=0)
    net = fit(run.cfg, run.datamodule, net, run.cfg.task.prune, run.epochs, [pruning])
    run.info["zero_output_channels"] = sum(int((mod.weight.flatten(1).abs().sum(1) == 0).sum()) for mod, _ in layers)
    return net


METHODS: dict[str, Callable[[Run], nn.Module]] = {
    "bar": bar, "dirichlet": dirichlet, "adans": adans, "random": random, "width": width,
    "tp_l1": tp_l1, "tp_taylor": tp_taylor, "tp_groupnorm": tp_groupnorm, "lightning_l1": lightning_l1,
}
# rows whose network keeps its size (masks only): reported, not held to the budget
REFERENCE = {"lightning_l1"}
