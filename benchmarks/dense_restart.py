"""Does a longer dense schedule bring the suite's ResNet-20 to 89% on this CIFAR-10 copy? One
more cosine cycle (SGD, Nesterov, weight decay 5e-4, the dense recipe's optimizer) continues the
suite's dense network (``benchmarks/checkpoints/resnet20_cifar10.pt``, or the weights
``--start`` names) for ``epochs`` epochs from ``lr``, and the full test set scores it every 5 epochs. The log (one JSON line per epoch:
``train_acc`` is the accuracy of the epoch's last training batch, ``test`` the test accuracy)
goes to ``benchmarks/dense_restart/<name>.jsonl`` and the continued network's weights to
``<name>.pt`` next to it (``name``: ``<epochs>-<lr>`` unless given); a killed run resumes from
its last epoch (the Lightning checkpoint in ``benchmarks/partial/``). The suite's dense
checkpoint is not changed.

    LP_DATA_DIR=../shared/data python benchmarks/dense_restart.py --epochs 40 --lr 0.05 --threads 2
"""

import argparse
import json
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_prune.bench.runner import load_dense, task_datamodule
from lightning_prune.bench.training import test_accuracy
from lightning_prune.classifier import ImageClassifier
from lightning_prune.configs import config_dir

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--start", type=Path, default=None, help="a state dict to continue (default: the suite's dense network)")
    parser.add_argument("--name", default=None, help="the log's and the weights' file name (default: <epochs>-<lr>)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=str(config_dir("bench")), version_base="1.3"):
        cfg = compose("bench", overrides=["task=resnet20_cifar10", f"bench_dir={HERE}"])
    L.seed_everything(0, workers=True)
    datamodule = task_datamodule(cfg)
    net = load_dense(cfg, datamodule.num_classes)
    if args.start is not None:
        net.load_state_dict(torch.load(args.start, map_location="cpu", weights_only=True))
    name = args.name or f"{args.epochs}-{args.lr}"
    log = HERE / "dense_restart" / f"{name}.jsonl"
    log.parent.mkdir(exist_ok=True)

    class Score(Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, module: ImageClassifier) -> None:
            epoch = trainer.current_epoch + 1
            row = {"epoch": epoch, "time": time.time(), "train_acc": float(trainer.callback_metrics.get("train/acc", -1))}
            if epoch % 5 == 0 or epoch == args.epochs:
                row["test"] = test_accuracy(cfg, module.net, datamodule)
                module.net.train()
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(row, flush=True)

    module = ImageClassifier(
        net, datamodule.num_classes,
        optimizer=partial(torch.optim.SGD, lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True),
        scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=args.epochs),
    )
    checkpoints = HERE / "partial" / f"dense_restart-{name}"
    last = checkpoints / "last.ckpt"
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[Score(), ModelCheckpoint(dirpath=checkpoints, filename="last", save_on_train_epoch_end=True,
                                            enable_version_counter=False)],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.exists() else None)
    torch.save(module.net.state_dict(), log.with_suffix(".pt"))


if __name__ == "__main__":
    main()
