"""Boundary characterisation (Javaheripi, Samragh, Javidi and Koushanfar, "AdaNS: Adaptive
Non-Uniform Sampling for Automated Design of Compact DNNs", IEEE JSTSP 2020, doi:10.1109/JSTSP.2020.2992384;
Sec. IV-C).

For every dimension ``i`` alone (all others at their identity value), find how far it can be
compressed while the accuracy stays above ``A_thr``: the largest pruning rate ``theta_i`` for a
rate dimension, the smallest normalised rank ``theta_i`` for a rank dimension. Accuracy is
monotone in each coordinate (the paper's premise), so the boundary is found by bisection: one
round evaluates the most compressed setting of every dimension, then ``steps`` rounds halve
the bracket of every dimension that is still open. Each round is one batch of at most ``d``
independent points, so it runs in parallel like an AdaNS batch.

The resolution is ``2**-steps`` of the range; with ``steps = 6`` that is finer than one
channel of a 64-channel layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lightning_prune.search.space import Box, SearchSpace


class BoundaryCharacterization:
    """Ask/tell bisection of the per-dimension boundary.

    ``ask()`` returns the points (n, d) of the next round and ``tell(accuracies)`` their
    accuracies (percent). ``done`` says when ``theta`` is final; ``box()`` is the resulting
    search box. Internally each dimension is parametrised by its compression distance
    ``t`` in [0, 1] from the identity (``x = t`` for rates, ``x = 1 - t`` for ranks).
    """

    def __init__(self, space: SearchSpace, threshold: float, steps: int = 6) -> None:
        if not isinstance(space, SearchSpace):
            raise TypeError(f"space must be a SearchSpace, got {type(space).__name__}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 100:
            raise ValueError(f"threshold must be an accuracy in percent, got {threshold!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        self.space = space
        self.threshold = float(threshold)
        self.steps = steps
        self.lo = np.zeros(space.d)  # largest t known to keep the accuracy above threshold
        self.hi = np.ones(space.d)  # smallest t known to break it (1 until tested)
        self.round = 0  # 0: extremes, 1..steps: bisection
        self.open = np.ones(space.d, dtype=bool)
        self.pending_dims: list[int] | None = None
        self.evaluations: list[dict[str, Any]] = []  # dim, t, accuracy of every evaluated point

    def _point(self, dim: int, t: float) -> np.ndarray:
        x = self.space.identity.copy()
        x[dim] = t if self.space.dims[dim].kind == "rate" else 1.0 - t
        return x

    @property
    def done(self) -> bool:
        return self.round > self.steps or not self.open.any()

    def ask(self) -> np.ndarray:
        """The points of the next round, shape (n, d) with n <= d (empty when done)."""
        if self.done:
            return np.zeros((0, self.space.d))
        if self.pending_dims is None:
            self.pending_dims = [int(i) for i in np.flatnonzero(self.open)]
        ts = [1.0 if self.round == 0 else (self.lo[i] + self.hi[i]) / 2 for i in self.pending_dims]
        return np.stack([self._point(i, t) for i, t in zip(self.pending_dims, ts)])

    def tell(self, accuracies: Sequence[float]) -> None:
        """Accuracies (percent) of the points of the last ``ask``."""
        if self.pending_dims is None:
            raise RuntimeError("tell() needs a round from ask() first")
        points = self.ask()
        accuracies = np.asarray(accuracies, dtype=float)
        if accuracies.shape != (len(self.pending_dims),):
            raise ValueError(f"accuracies must have {len(self.pending_dims)} entries, got shape {accuracies.shape}")
        for i, x, acc in zip(self.pending_dims, points, accuracies):
            t = float(x[i] if self.space.dims[i].kind == "rate" else 1.0 - x[i])
            self.evaluations.append({"dim": i, "t": t, "x": float(x[i]), "accuracy": float(acc)})
            if acc > self.threshold:
                self.lo[i] = t
                if self.round == 0:  # even the most compressed setting keeps the accuracy
                    self.open[i] = False
            else:
                self.hi[i] = t
        self.round += 1
        self.pending_dims = None

    @property
    def theta(self) -> np.ndarray:
        """``theta`` in x units: max pruning rate (rates) or min normalised rank (ranks)."""
        rate = np.array([k == "rate" for k in self.space.kinds])
        return np.where(rate, self.lo, 1.0 - self.lo)

    def box(self) -> Box:
        return Box.from_theta(self.space, self.theta)

    def state_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "steps": self.steps,
            "lo": self.lo.tolist(),
            "hi": self.hi.tolist(),
            "round": self.round,
            "open": self.open.tolist(),
            "pending_dims": self.pending_dims,
            "evaluations": self.evaluations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["threshold"], state["steps"]) != (self.threshold, self.steps):
            raise ValueError(
                f"state: saved with threshold={state['threshold']}, steps={state['steps']}; "
                f"now threshold={self.threshold}, steps={self.steps}"
            )
        self.lo = np.asarray(state["lo"], dtype=float)
        self.hi = np.asarray(state["hi"], dtype=float)
        self.round = int(state["round"])
        self.open = np.asarray(state["open"], dtype=bool)
        self.pending_dims = None if state["pending_dims"] is None else [int(i) for i in state["pending_dims"]]
        self.evaluations = [dict(e) for e in state["evaluations"]]


def characterize(
    space: SearchSpace,
    accuracy: Callable[[np.ndarray], Sequence[float]],
    threshold: float,
    steps: int = 6,
) -> np.ndarray:
    """``theta`` for every dimension, evaluating ``accuracy((n, d)) -> n accuracies (percent)``
    one round at a time."""
    bc = BoundaryCharacterization(space, threshold, steps)
    while not bc.done:
        bc.tell(accuracy(bc.ask()))
    return bc.theta
