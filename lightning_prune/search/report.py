"""Summaries and plots of AdaNS searches."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_prune._plotting import pyplot, save_figure


def plot_progress(
    traces: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str = "AdaNS: best score against evaluations",
    log_scale: bool = False,
) -> Path:
    """Plot the best score so far against the number of evaluations, one line per run
    (e.g. per sampler), and save it to ``path`` (PNG, SVG or PDF by suffix). ``log_scale``:
    logarithmic score axis (scores below the accuracy threshold are many decades smaller)."""
    if not traces:
        raise ValueError("traces must hold at least one run")
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, trace in traces.items():
        values = np.maximum.accumulate(np.asarray(trace, dtype=float))
        ax.plot(np.arange(1, len(values) + 1), values, label=name)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best score f(x)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def summary(status: Mapping[str, Any], best: Mapping[str, Any] | None, reference: Mapping[str, Any] | None,
            theta: Sequence[float] | None = None, names: Sequence[str] | None = None) -> str:
    """A few lines of text: original model, best candidate, boundary."""
    lines = ["=== AdaNS summary ===", f"evaluations      : {status.get('evaluations', 0)} launched, "
                                       f"{status.get('iteration', 0)} AdaNS iterations"]
    if reference is not None:
        lines.append(f"original         : accuracy {reference['accuracy']:.2f} %, cost {reference['cost']:,.0f}")
    if best is not None:
        lines += [
            f"best score       : {best['score']:.4f}",
            f"best accuracy    : {best['accuracy']:.2f} % (before fine-tuning)",
            f"best cost        : {best['cost']:,.0f} ({100 * best['cost_fraction']:.1f} % of the original)",
        ]
        if names is not None:
            lines.append("best x           : " + ", ".join(f"{n}={v:.3f}" for n, v in zip(names, best["x"])))
    if theta is not None:
        lines.append("boundary theta   : " + ", ".join(f"{v:.3f}" for v in theta))
    return "\n".join(lines)
