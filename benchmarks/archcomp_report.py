"""Summarise an Architecture Compression pipeline run (``python -m lightning_prune.archcomp``).

Reads the files one pipeline wrote under its ``dir`` (dataset.json, compressor_metrics.json,
compression.json) and prints the numbers recorded in benchmarks/RESULTS.md: the dataset, the
regressors' error on the held-out architectures next to the trivial baseline (predicting the
training split's median accuracy), and the columns of Table 1 of Ashok, "Architecture Compression"
(arXiv:1902.03326, 2019) for the compressed network.

    python benchmarks/archcomp_report.py logs/archcomp/archcomp_mnist_cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from lightning_prune.archcomp import ArchitectureDataModule, describe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="the pipeline's `dir` (holds dataset.json, compressor_metrics.json, compression.json)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="fit.datamodule.val_fraction of the run")
    parser.add_argument("--seed", type=int, default=0, help="fit.datamodule.seed of the run")
    args = parser.parse_args()

    dm = ArchitectureDataModule(args.dir / "dataset.json", max_len=10**6, val_fraction=args.val_fraction, seed=args.seed)
    dm.setup()
    meta = dm.metadata
    labelled = [r for r in dm.train_records or [] if r.ok]
    accs = [r.accuracy for r in labelled + dm.val_records]
    secs = [r.seconds for r in labelled + dm.val_records]
    print("## dataset")
    print(f"- architectures trained: {meta['count']} (failed: {len(meta['failed'])}), untrained (tokens + params only): {meta.get('unlabelled', 0)}")
    print(f"- seeds per architecture: {meta['seeds']}, trainer overrides: {meta['trainer']}, optimizer: {meta['optimizer']}")
    print(f"- data: subset={meta['data'].get('subset')}, val_size={meta['data'].get('val_size')}, batch_size={meta['data'].get('batch_size')}")
    print(f"- mean accuracy over seeds: min {min(accs):.4f}, median {statistics.median(accs):.4f}, max {max(accs):.4f}")
    print(f"- training time per architecture (all seeds): median {statistics.median(secs):.1f} s, total {sum(secs) / 60:.1f} min (sum over jobs)")
    lengths = [len(r.tokens) for r in labelled + dm.val_records]
    params = [r.params for r in labelled + dm.val_records]
    print(f"- layers: {min(lengths)}..{max(lengths)}; parameters: {min(params):,}..{max(params):,} (median {int(statistics.median(params)):,})")

    fit = json.loads((args.dir / "compressor_metrics.json").read_text())
    median = statistics.median(r.accuracy for r in labelled)
    baseline = statistics.fmean(abs(r.accuracy - median) for r in dm.val_records)
    print("\n## compressor (held-out architectures)")
    print(f"- train/held-out architectures: {fit['train_architectures']}/{fit['val_architectures']} (train includes untrained ones), steps {fit['steps']}, {fit['seconds']:.0f} s")
    print(f"- accuracy MAE: {fit['val/acc_mae']:.4f} (baseline, training median {median:.3f} for all: {baseline:.4f})")
    print(f"- parameter count: Spearman rank correlation {fit['val/params_spearman']:.4f}, mean relative error {fit['val/params_rel_err']:.3f}")
    print(f"- reconstruction: token exact {fit['val/token_exact']:.3f}, sequence exact {fit['val/seq_exact']:.3f}, "
          f"layer types exact {fit['val/types_exact']:.3f}, channel rel. error {fit['val/channels_rel_err']:.3f}")  # fmt: skip

    report_file = args.dir / "compression.json"
    if report_file.is_file():
        rep = json.loads(report_file.read_text())
        o, c = rep["original"], rep["compressed"]
        print("\n## compression (Ashok 2019, Table 1 columns)")
        print("| model | acc. | #params | delta acc. | compr. |")
        print("|---|---|---|---|---|")
        print(f"| original | {100 * o['accuracy']:.2f}% | {o['params']:,} | | |")
        print(f"| compressed | {100 * c['accuracy']:.2f}% | {c['params']:,} | {100 * rep['delta_accuracy']:+.2f}% | {rep['compression']:.2f}x |")
        print(f"- per-seed accuracies: original {[round(a, 4) for a in o['accuracies']]}, compressed {[round(a, 4) for a in c['accuracies']]}")
        print(f"- chosen step {c['step']}; step 0 decodes the original exactly: {rep['step0_reconstructs_original']}; "
              f"predicted accuracy {c['predicted_accuracy']:.3f}, predicted params {c['predicted_params']:,.0f}; repairs: {len(c['repairs'])}")  # fmt: skip
        for s in rep["trajectory"]:
            print(f"  step {s['step']:2d}: L_c {s['loss']:.3f}  a_hat {s['predicted_accuracy']:.3f}  p_hat {s['predicted_params']:>10,.0f}  "
                  f"decoded params {s['params'] if s['params'] is not None else '-':>8}  layers {s['layers']}")  # fmt: skip
        print("- compressed architecture:\n" + "\n".join("    " + line for line in describe(c["tokens"]).splitlines()))


if __name__ == "__main__":
    main()
