"""What a LeNet-5 of fixed widths reaches under the benchmark suite's LeNet-5 recipe: the widths
are cut out of the suite's dense network (benchmarks/checkpoints/lenet5_mnist.pt), keeping the
channels with the largest L1 norm layer by layer, and fine-tuned with Adam (1e-3, 10x lower for
the last quarter of the epochs), batch 128, on the suite's 55,000 training images, optionally
with distillation from the dense network (T = 4, alpha = 0.9); scored on the 10,000 test images.
A ceiling check for the methods' rows, not a method.

    LP_DATA_DIR=../shared/data python benchmarks/lenet5_fixed_widths.py 3-14-134 --epochs 8 [--distill]

What a change of the protocol would give: ``--shift S`` trains with random translations of up to
S pixels (``MNISTDataModule(shift=S)``); ``--dense-epochs E`` cuts the widths out of a dense
network trained here for E epochs with the same recipe (and shift) instead of the suite's
checkpoint (cached in LP_CACHE_DIR, default ~/.cache/lightning-prune; its test accuracy is
recorded as ``dense_accuracy``).

One entry per run is appended to benchmarks/lenet5_fixed_widths.json (a run already there is skipped).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune import count_cost
from lightning_prune.data import MNISTDataModule, default_cache_dir
from lightning_prune.models import LeNet5

HERE = Path(__file__).resolve().parent


def cut(dense: LeNet5, c1: int, c2: int, f1: int) -> LeNet5:
    """A LeNet-5 of widths c1-c2-f1 holding the dense network's largest-L1 channels."""
    sd = dense.state_dict()
    w1 = sd["features.0.weight"]
    k1 = w1.abs().flatten(1).sum(1).topk(c1).indices.sort().values
    w2 = sd["features.2.weight"][:, k1]
    k2 = w2.abs().flatten(1).sum(1).topk(c2).indices.sort().values
    wf = sd["classifier.1.weight"].view(500, 50, 16)[:, k2]
    k3 = wf.abs().flatten(1).sum(1).topk(f1).indices.sort().values
    net = LeNet5()
    net.features[0], net.features[2] = nn.Conv2d(1, c1, 5), nn.Conv2d(c1, c2, 5)
    net.classifier[1], net.classifier[3] = nn.Linear(16 * c2, f1), nn.Linear(f1, 10)
    with torch.no_grad():
        net.features[0].weight.copy_(w1[k1])
        net.features[0].bias.copy_(sd["features.0.bias"][k1])
        net.features[2].weight.copy_(w2[k2])
        net.features[2].bias.copy_(sd["features.2.bias"][k2])
        net.classifier[1].weight.copy_(wf[k3].reshape(f1, -1))
        net.classifier[1].bias.copy_(sd["classifier.1.bias"][k3])
        net.classifier[3].weight.copy_(sd["classifier.3.weight"][:, k3])
        net.classifier[3].bias.copy_(sd["classifier.3.bias"])
    return net


def train(net: nn.Module, data: MNISTDataModule, epochs: int, teacher: nn.Module | None = None) -> None:
    """Adam (1e-3, 10x lower for the last quarter of the epochs), batch 128; with ``teacher``,
    cross-entropy (0.1) plus the distillation loss at T = 4 (0.9)."""
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [round(epochs * 0.75)], 0.1)
    for _ in range(epochs):
        net.train()
        for x, y in data.train_dataloader():
            out = net(x)
            loss = F.cross_entropy(out, y)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(x)
                kl = F.kl_div(F.log_softmax(out / 4, 1), F.log_softmax(target / 4, 1), reduction="batchmean", log_target=True)
                loss = 0.9 * 16 * kl + 0.1 * loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()


def accuracy(net: nn.Module, data: MNISTDataModule) -> float:
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in data.test_dataloader():
            correct += int((net(x).argmax(1) == y).sum())
            total += len(y)
    return 100 * correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("widths", help="conv1-conv2-fc1, e.g. 3-14-134")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--distill", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shift", type=int, default=0, help="random translation of the training images, in pixels")
    parser.add_argument("--dense-epochs", type=int, default=None,
                        help="train the dense network here for this many epochs instead of loading the suite's")
    parser.add_argument("--out", type=Path, default=HERE / "lenet5_fixed_widths.json")
    args = parser.parse_args()
    try:
        c1, c2, f1 = (int(w) for w in args.widths.split("-"))
    except ValueError:
        parser.error(f"widths: expected conv1-conv2-fc1 such as 3-14-134, got {args.widths!r}")
    runs = json.loads(args.out.read_text()) if args.out.exists() else []
    key = {"widths": args.widths, "distill": args.distill, "epochs": args.epochs, "seed": args.seed,
           "shift": args.shift, "dense_epochs": args.dense_epochs}
    older = {"shift": 0, "dense_epochs": None}  # what entries written before these options ran with
    if any(all(r.get(k, older.get(k)) == v for k, v in key.items()) for r in runs):
        print(f"already run: {key}")
        return
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data = MNISTDataModule(data_dir=os.environ.get("LP_DATA_DIR", "data"), batch_size=128, eval_batch_size=1000,
                           num_workers=0, val_size=5000, seed=0, shift=args.shift)
    data.setup("fit")
    data.setup("test")
    dense = LeNet5()
    if args.dense_epochs is None:
        dense.load_state_dict(torch.load(HERE / "checkpoints" / "lenet5_mnist.pt", weights_only=True))
    else:
        saved = default_cache_dir() / f"lenet5_dense_{args.dense_epochs}ep_shift{args.shift}_seed{args.seed}.pt"
        if saved.is_file():
            dense.load_state_dict(torch.load(saved, weights_only=True))
        else:
            train(dense, data, args.dense_epochs)
            saved.parent.mkdir(parents=True, exist_ok=True)
            torch.save(dense.state_dict(), saved)
    dense.eval()
    dense_accuracy = accuracy(dense, data)
    net = cut(dense, c1, c2, f1)
    macs = count_cost(net.eval(), torch.zeros(1, 1, 28, 28)).macs
    started = time.perf_counter()
    train(net, data, args.epochs, teacher=dense if args.distill else None)
    options = (" --distill" if args.distill else "") + (f" --seed {args.seed}" if args.seed else "") + (
        f" --shift {args.shift}" if args.shift else "") + (f" --dense-epochs {args.dense_epochs}" if args.dense_epochs else "")
    runs.append({**key, "macs": macs, "test_accuracy": accuracy(net, data), "dense_accuracy": dense_accuracy,
                 "wall_seconds": round(time.perf_counter() - started),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
                 "threads": 1, "command": f"python benchmarks/lenet5_fixed_widths.py {args.widths} --epochs {args.epochs}{options}"})
    args.out.write_text(json.dumps(runs, indent=1) + "\n")
    print(json.dumps(runs[-1]))


if __name__ == "__main__":
    main()
