"""Latency of networks measured in one run, interleaved so that load from other processes
affects every network alike. Report ratios between networks timed together, never an
absolute time compared across runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from lightning_prune._checks import check_int


@torch.no_grad()
def interleaved_times(
    runs: Mapping[str, Callable[[], object]], repeats: int, warmup: int, sync: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Seconds of ``repeats`` calls of each callable in ``runs`` (no arguments, no grad), after
    ``warmup`` untimed rounds; each round calls every callable once, in turn. ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before and after each timed call."""
    check_int("repeats", repeats, 1)
    check_int("warmup", warmup, 0)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(warmup + repeats):
        for name, run in runs.items():
            if sync is not None:
                sync()
            start = time.perf_counter()
            run()
            if sync is not None:
                sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median_latency(models: Mapping[str, nn.Module], example: Tensor, repeats: int = 30, warmup: int = 3) -> dict[str, float]:
    """Median seconds of one forward pass (eval mode, no grad) of every model on ``example``;
    each round times every model once, in turn."""
    for model in models.values():
        model.eval()
    times = interleaved_times({name: (lambda m=model: m(example)) for name, model in models.items()}, repeats, warmup)
    return {name: statistics.median(t) for name, t in times.items()}
