"""Does a longer dense schedule bring the suite's ResNet-20 to 89% on this CIFAR-10 copy? One
more cosine cycle (the task's dense recipe, ``task.dense``, from ``lr``) continues the
suite's dense network (``benchmarks/checkpoints/resnet20_cifar10.pt``, or the weights
``--start`` names) for ``epochs`` epochs, and the full test set scores it every 5 epochs. The log (one JSON line per epoch:
``train_acc`` is the accuracy of the epoch's last training batch, ``test`` the test accuracy)
goes to ``benchmarks/dense_restart/<name>.jsonl`` and the continued network's weights to
``<name>.pt`` next to it (``name``: ``<epochs>-<lr>`` unless given); a killed run resumes from
its last epoch (the bench's per-epoch checkpoints, in ``benchmarks/partial/``, deleted once the
weights are saved), and a finished one (its ``.pt`` exists) is skipped. The suite's dense
checkpoint is not changed. With ``--scratch`` the network starts from a fresh initialisation
(seed 0) and trains with the same recipe: one long schedule instead of a continuation (name ``scratch-<epochs>-<lr>``).
``--label-smoothing`` smooths the training loss's targets (the recipe's ``label_smoothing``).
``--teachers`` distils from the ensemble of the networks it names (:class:`EnsembleDistillation`,
``--temperature``, ``--alpha``). The training runs in the task's ``precision``; a precision other than ``32-true`` ends the default
name (``-bf16-mixed``).

    LP_DATA_DIR=../shared/data python benchmarks/dense_restart.py --epochs 40 --lr 0.05 --threads 2
    LP_DATA_DIR=../shared/data python benchmarks/dense_restart.py --scratch --epochs 200 --lr 0.1 --threads 2
"""

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from lightning_prune.bench.runner import load_dense, task_datamodule
from lightning_prune.bench.training import fit, resumable, task_precision, test_accuracy
from lightning_prune.callbacks.distillation import _DistillGradient
from lightning_prune.classifier import ImageClassifier
from lightning_prune.configs import config_dir
from lightning_prune.train import load_network_weights

HERE = Path(__file__).resolve().parent


def run_name(args: argparse.Namespace, precision: str) -> str:
    """The default name of a run: ``[scratch-]<epochs>-<lr>[-ls<label smoothing>][-kd<teachers>][-<precision>]``
    (no precision suffix for ``32-true``)."""
    return (f"{'scratch-' if args.scratch else ''}{args.epochs}-{args.lr}"
            + (f"-ls{args.label_smoothing}" if args.label_smoothing else "")
            + (f"-kd{len(args.teachers)}" if args.teachers else "")
            + (f"-{precision}" if precision != "32-true" else ""))


def run_recipe(cfg: DictConfig, args: argparse.Namespace) -> DictConfig:
    """The run's training recipe, from scratch or continuing a network: the task's dense recipe
    without its length and its restarts (its optimizer and schedule, which the run stretches to
    its epochs) from ``args.lr``, with ``args.label_smoothing``. (The continued runs logged in
    benchmarks/dense_restart/ before the task dropped its warm restart took that restart's recipe:
    the same SGD with a cosine schedule.)"""
    base = OmegaConf.masked_copy(cfg.task.dense, [k for k in cfg.task.dense if k not in ("epochs", "restarts")])
    recipe = OmegaConf.merge(base, {"optimizer": {"lr": args.lr}})
    if args.label_smoothing:
        with open_dict(recipe):  # a key the task's recipe may not have
            recipe.label_smoothing = args.label_smoothing
    return recipe


def run_identity(args: argparse.Namespace, recipe: DictConfig, precision: str) -> str:
    """What a run's checkpoints must match to be resumed: its arguments (not ``--threads``: a
    resume with other threads continues the same run; not the optional flags at their defaults,
    so that a run keeps the identity it had before they existed), recipe and precision."""
    defaults = {"scratch": False, "label_smoothing": 0.0, "teachers": None}
    if not args.teachers:
        defaults.update(temperature=args.temperature, alpha=args.alpha)  # no distillation: not part of the run
    identity = {k: str(v) for k, v in vars(args).items() if k != "threads" and not (k in defaults and v == defaults[k])}
    return OmegaConf.to_yaml({"args": identity, "recipe": recipe, **({"precision": precision} if precision != "32-true" else {})})


class EnsembleDistillation(Callback):
    """Knowledge distillation from an ensemble (Hinton, Vinyals and Dean, "Distilling the
    Knowledge in a Neural Network", arXiv:1503.02531): while the network trains, a forward hook
    blends the gradient of the training loss on its logits with that of ``T^2 KL(p || p_student)``,
    ``p`` the mean of the frozen ``teachers``' probabilities at temperature ``T`` (the share
    ``alpha``; the package's BAR distillation does the same with one teacher)."""

    def __init__(self, teachers: list[nn.Module], temperature: float, alpha: float) -> None:
        self.teachers = [teacher.eval().requires_grad_(False) for teacher in teachers]
        self.temperature, self.alpha = temperature, alpha
        self._handle = None

    def on_train_start(self, trainer: L.Trainer, module: ImageClassifier) -> None:
        self._handle = module.net.register_forward_hook(self._distil)

    def on_train_end(self, trainer: L.Trainer, module: ImageClassifier) -> None:
        self._handle.remove()

    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits whose softmax at the temperature is the teachers' mean probability."""
        t = self.temperature
        with torch.no_grad():
            mean = torch.stack([(teacher(inputs).float() / t).softmax(-1) for teacher in self.teachers]).mean(0)
        return t * mean.log()

    def _distil(self, net: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not net.training:  # the test-set scoring
            return None
        return _DistillGradient.apply(output, self.teacher_logits(inputs[0]), self.temperature, self.alpha, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--start", type=Path, default=None, help="a state dict to continue (default: the suite's dense network)")
    parser.add_argument("--scratch", action="store_true", help="train a freshly initialised network with the task's dense recipe")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the training loss")
    parser.add_argument("--teachers", type=Path, nargs="+", default=None,
                        help="state dicts of networks of the task's architecture: distil from their ensemble")
    parser.add_argument("--temperature", type=float, default=4.0, help="of the distillation from --teachers")
    parser.add_argument("--alpha", type=float, default=0.9, help="the distillation's share of the loss gradient")
    parser.add_argument("--name", default=None, help="the log's and the weights' file name (default: [scratch-]<epochs>-<lr>[-ls<label smoothing>][-<precision>])")
    args = parser.parse_args()
    if args.scratch and args.start is not None:
        parser.error("--scratch trains a fresh network: it takes no --start")
    if not 0 <= args.label_smoothing < 1:
        parser.error(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.temperature <= 0 or not 0 <= args.alpha <= 1:
        parser.error(f"--temperature must be > 0 and --alpha in [0, 1], got {args.temperature} and {args.alpha}")
    for teacher in args.teachers or ():
        if not teacher.is_file():
            parser.error(f"--teachers: no file {teacher}")
    with initialize_config_dir(config_dir=str(config_dir("bench")), version_base="1.3"):
        cfg = compose("bench", overrides=["task=resnet20_cifar10", f"bench_dir={HERE}"])
    precision = task_precision(cfg)
    name = args.name or run_name(args, precision)
    log = HERE / "dense_restart" / f"{name}.jsonl"
    if log.with_suffix(".pt").exists():
        print(f"finished: {log.with_suffix('.pt')} exists", flush=True)
        return
    torch.set_num_threads(args.threads)
    recipe = run_recipe(cfg, args)
    L.seed_everything(0, workers=True)
    datamodule = task_datamodule(cfg)
    if args.start is None and not args.scratch:
        net = load_dense(cfg, datamodule.num_classes)
    else:
        net = instantiate(cfg.task.model, num_classes=datamodule.num_classes)
        if args.start is not None:
            load_network_weights(net, args.start, "--start")
    log.parent.mkdir(exist_ok=True)

    class Score(Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, module: ImageClassifier) -> None:
            epoch = trainer.current_epoch + 1
            row = {"epoch": epoch, "time": time.time(), "train_acc": float(trainer.callback_metrics.get("train/acc", -1))}
            if epoch % 5 == 0 or epoch == args.epochs:
                row["test"] = test_accuracy(cfg, module.net, datamodule)
                module.net.train()
            # rewrite the log without this epoch's line or later ones: a run killed after its line
            # but before Lightning's checkpoint of the epoch repeats the epoch when it resumes
            rows = [line for line in log.read_text().splitlines() if json.loads(line)["epoch"] < epoch] if log.exists() else []
            log.write_text("".join(line + "\n" for line in rows + [json.dumps(row)]))
            print(row, flush=True)

    with resumable(HERE / "partial" / f"dense_restart-{name}", run_identity(args, recipe, precision), time.perf_counter()) as checkpoints:
        callbacks: list[Callback] = [Score()]
        if args.teachers:
            teachers = [instantiate(cfg.task.model, num_classes=datamodule.num_classes) for _ in args.teachers]
            for teacher, path in zip(teachers, args.teachers):
                load_network_weights(teacher, path, "--teachers")
            callbacks.append(EnsembleDistillation(teachers, args.temperature, args.alpha))
        net = fit(cfg, datamodule, net, recipe, args.epochs, callbacks=callbacks)
    torch.save(net.state_dict(), log.with_suffix(".pt"))
    checkpoints.delete()


if __name__ == "__main__":
    main()
