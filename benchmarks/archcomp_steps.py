"""Where gradient steps on the embedding lead, without training anything (Ashok, "Architecture
Compression", arXiv:1902.03326, 2019, Sec. 4.4).

For a trained compressor checkpoint and a CONV-k network, runs :func:`compress` for a grid of
step sizes, numbers of steps and parameter weights ``lam`` and prints, per setting, the
decoded architecture's exact parameter count and compression ratio, the regressors'
predictions and how many repairs the decoding needed. It is how the compress settings of a
pipeline are chosen before paying for the final trainings.

    python benchmarks/archcomp_steps.py logs/archcomp/archcomp_mnist_cpu/compressor.ckpt --depth 7 --channels 8
"""

from __future__ import annotations

import argparse
import itertools

import torch

from lightning_prune.archcomp import ArchitectureCompressor, ArchitectureDataModule, ConvK, InvalidArchitecture, compress, to_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--depth", type=int, default=7)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--input-shape", type=int, nargs=3, default=[1, 28, 28])
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--lam", type=float, nargs="+", default=[1.0])
    parser.add_argument("--params-target", type=float, default=None, help="p0 as a parameter count (default: the paper's p0 = 0)")
    parser.add_argument("--dataset", help="dataset.json of the pipeline, for --refit-steps")
    parser.add_argument("--refit-steps", type=int, default=0)
    parser.add_argument("--refit-every", type=int, default=5)
    parser.add_argument("--refit-lr", type=float, default=1e-3)
    parser.add_argument("--original-accuracy", type=float, default=None, help="measured accuracy of the original, for the re-fit")
    args = parser.parse_args()

    torch.set_num_threads(1)
    compressor = ArchitectureCompressor.load_from_checkpoint(args.checkpoint, map_location="cpu")
    shape = tuple(args.input_shape)
    tokens = to_tokens(ConvK(args.depth, args.channels, args.num_classes, shape), shape)
    step0 = compress(compressor, tokens, shape, args.num_classes, steps=0)
    print(f"original: {len(tokens)} layers, {step0.original_params:,} params; step 0 decodes "
          f"{'exactly' if step0.tokens == tuple(tokens) else f'{len(step0.tokens)} layers, {step0.params:,} params'}; "
          f"predicted accuracy {step0.predicted_accuracy:.3f}, predicted params {step0.predicted_params:,.0f}")  # fmt: skip
    refit = {}
    if args.refit_steps:
        dm = ArchitectureDataModule(args.dataset, max_len=compressor.max_len)
        refit = dict(refit_data=dm.train_dataloader(), refit_steps=args.refit_steps, refit_every=args.refit_every,
                     refit_lr=args.refit_lr, original_accuracy=args.original_accuracy)  # fmt: skip
    print("| lr | steps | lam | chosen step | layers | params | ratio | a_hat | p_hat | repairs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for lr, steps, lam in itertools.product(args.lr, args.steps, args.lam):
        try:
            torch.manual_seed(0)
            r = compress(compressor, tokens, shape, args.num_classes, steps=steps, lr=lr, lam=lam, params_target=args.params_target, **refit)
        except InvalidArchitecture as err:
            print(f"| {lr} | {steps} | {lam} | - | - | - | - | - | - | {err} |")
            continue
        print(f"| {lr} | {steps} | {lam} | {r.step} | {len(r.tokens)} | {r.params:,} | {r.ratio:.2f}x | "
              f"{r.predicted_accuracy:.3f} | {r.predicted_params:,.0f} | {len(r.repairs)} |")  # fmt: skip


if __name__ == "__main__":
    main()
