"""The test accuracy of dense networks and of their ensemble (the mean of their probabilities).

Scores each network a task's architecture loads (state dicts, e.g. the cycles of
``benchmarks/dense_restart.py``) on the task's full test set, and the ensemble that averages their
softmax outputs: the teacher ``dense_restart.py --teachers`` distils from (at temperature 1).

    LP_DATA_DIR=../shared/data python benchmarks/dense_ensemble.py benchmarks/dense_restart/40-0.05.pt ... \\
        --out benchmarks/dense_restart/ensemble.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_prune.bench.runner import task_datamodule
from lightning_prune.configs import config_dir
from lightning_prune.train import load_network_weights


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="dense_ensemble.py", description=__doc__.splitlines()[0])
    parser.add_argument("networks", type=Path, nargs="+", help="state dicts of the task's architecture")
    parser.add_argument("--task", default="resnet20_cifar10")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the accuracies as JSON")
    args = parser.parse_args(argv)
    for path in args.networks:
        if not path.is_file():
            parser.error(f"no file {path}")
    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=str(config_dir("bench")), version_base="1.3"):
        cfg = compose("bench", overrides=[f"task={args.task}"])
    datamodule = task_datamodule(cfg)
    datamodule.setup("test")
    nets = []
    for path in args.networks:
        net = instantiate(cfg.task.model, num_classes=datamodule.num_classes)
        load_network_weights(net, path, "networks")
        nets.append(net.eval())
    correct = torch.zeros(len(nets) + 1)
    total = 0
    for inputs, targets in datamodule.test_dataloader():
        probabilities = torch.stack([net(inputs).softmax(-1) for net in nets])
        correct[:-1] += (probabilities.argmax(-1) == targets).sum(-1)
        correct[-1] += (probabilities.mean(0).argmax(-1) == targets).sum()
        total += len(targets)
    accuracy = (100 * correct / total).tolist()
    record = {"task": args.task, "test_images": total,
              "networks": {str(path): acc for path, acc in zip(args.networks, accuracy)}, "ensemble": accuracy[-1],
              "command": "python benchmarks/dense_ensemble.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__}
    for path, acc in record["networks"].items():
        print(f"{acc:6.2f}%  {path}")
    print(f"{record['ensemble']:6.2f}%  ensemble of {len(nets)}")
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
