"""What a pruning run shows the user at the end of fit: a per-layer table and a plot of the
channels each group keeps (as in Lemaire et al., CVPR 2019, Fig. 1)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

from lightning_prune._plotting import pyplot, save_figure
from lightning_prune.core.cost import CostReport


def layer_table(before: CostReport, after: CostReport, widths_before: Mapping[str, int], widths_after: Mapping[str, int]) -> str:
    """A text table, one row per convolution/linear layer: output channels, MACs and volume
    before and after pruning, plus the totals. ``widths_*`` map layer names to output channels;
    a layer missing from ``widths_after`` was removed (a residual branch that kept no channel)."""
    rows = [("layer", "channels", "MACs", "volume")]
    for name in before.per_layer:
        if name not in widths_before:
            continue
        b, a = before.per_layer[name], after.per_layer.get(name)
        rows.append(
            (
                name,
                f"{widths_before[name]} -> {widths_after[name] if name in widths_after else 'removed'}",
                f"{b.macs:,} -> {a.macs if a else 0:,}",
                f"{b.volume:,} -> {a.volume if a else 0:,}",
            )
        )
    rows.append(("total", "", f"{before.macs:,} -> {after.macs:,}", f"{before.volume:,} -> {after.volume:,}"))
    rows.append(("params", "", f"{before.params:,} -> {after.params:,}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_alive_channels(
    before: Mapping[str, int], after: Mapping[str, int], path: str | Path, title: str = "", removed: Collection[str] = ()
) -> Path:
    """Bar chart of channels per group before (light) and after (dark) pruning, saved as PNG.
    The groups in ``removed`` (residual branches that kept no channel: the block was removed,
    as in Lemaire et al., CVPR 2019, supplementary material, Fig. 1) are marked "removed"."""
    plt = pyplot()

    names = list(before)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 3.5))
    xs = range(len(names))
    ax.bar(xs, [before[n] for n in names], color="#c6dbef", label="before")
    ax.bar(xs, [after.get(n, 0) for n in names], color="#08519c", label="after")
    gone = [i for i, n in enumerate(names) if n in set(removed)]
    if gone:
        ax.bar(gone, [before[names[i]] for i in gone], fill=False, hatch="//", edgecolor="#cb181d", label="removed")
        for i in gone:
            ax.text(i, before[names[i]], "removed", rotation=90, ha="center", va="bottom", fontsize=6, color="#cb181d")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("channels")
    ax.set_title(title or "alive channels per layer")
    ax.legend()
    return save_figure(fig, path)
