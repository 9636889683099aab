"""Latency of networks measured in one run, interleaved so that load from other processes
affects every network alike. Report ratios between networks timed together, never an
absolute time compared across runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_prune._checks import check_int


@torch.no_grad()
def median_latency(models: Mapping[str, nn.Module], example: Tensor, repeats: int = 30, warmup: int = 3) -> dict[str, float]:
    """Median seconds of one forward pass (eval mode, no grad) of every model on ``example``;
    each round times every model once, in turn."""
    check_int("repeats", repeats, 1)
    check_int("warmup", warmup, 0)
    for model in models.values():
        model.eval()
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(warmup + repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(example)
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}
