"""The search space of AdaNS (Javaheripi, Samragh, Javidi and Koushanfar, "AdaNS: Adaptive
Non-Uniform Sampling for Automated Design of Compact DNNs", IEEE JSTSP 2020, doi:10.1109/JSTSP.2020.2992384;
Sec. IV-A): one normalised value per hyperparameter.

Every dimension is in [0, 1] and has a *kind*:

- ``"rate"`` (pruning): the fraction removed; 0 leaves the layer untouched, larger values
  compress more.
- ``"rank"`` (decomposition): the kept fraction of the full rank; 1 leaves the layer
  untouched, smaller values compress more.

A :class:`Box` is the part of [0, 1]^d the samplers draw from. It starts as the whole cube;
boundary characterisation (§IV-C) shrinks it to ``[0, theta_i]`` for rates and
``[theta_i, 1]`` for ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KINDS = ("rate", "rank")


@dataclass(frozen=True)
class Dimension:
    """One hyperparameter: a layer's (or channel group's) pruning rate or normalised rank.

    ``levels`` is the number of distinct integer settings behind it (channels ``c`` of a
    group, full rank ``R`` of a layer), or None when continuous.
    """

    name: str
    kind: str
    levels: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.levels is not None and (isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 1):
            raise ValueError(f"levels must be a positive int or None, got {self.levels!r}")

    @property
    def identity(self) -> float:
        """The value that leaves the layer untouched: 0 for rates, 1 for ranks."""
        return 0.0 if self.kind == "rate" else 1.0


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions of x and, optionally, a predictor of the compressed cost.

    ``predict_cost(x)`` returns the cost (e.g. MACs per sample) of the model that ``x``
    describes, without evaluating it; it lets the search repair over-budget candidates
    before they are launched.
    """

    dims: tuple[Dimension, ...]
    predict_cost: Callable[[np.ndarray], float] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        dims = tuple(self.dims)
        if not dims:
            raise ValueError("dims must hold at least one Dimension")
        if not all(isinstance(d, Dimension) for d in dims):
            raise TypeError("dims must be Dimension objects")
        names = [d.name for d in dims]
        if len(set(names)) != len(names):
            raise ValueError(f"dims must have unique names, got duplicates in {names}")
        object.__setattr__(self, "dims", dims)

    @classmethod
    def of(cls, kinds: Sequence[str], names: Sequence[str] | None = None, **kwargs: Any) -> SearchSpace:
        """A space from a list of kinds (names default to ``x0, x1, ...``)."""
        names = list(names) if names is not None else [f"x{i}" for i in range(len(kinds))]
        if len(names) != len(kinds):
            raise ValueError(f"names must have one entry per kind ({len(kinds)}), got {len(names)}")
        return cls(tuple(Dimension(n, k) for n, k in zip(names, kinds)), **kwargs)

    @property
    def d(self) -> int:
        return len(self.dims)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dims]

    @property
    def kinds(self) -> list[str]:
        return [d.kind for d in self.dims]

    @property
    def identity(self) -> np.ndarray:
        """The x that leaves the model untouched."""
        return np.array([d.identity for d in self.dims])

    @property
    def most_compressed(self) -> np.ndarray:
        """The x that compresses every dimension as far as it goes."""
        return 1.0 - self.identity

    def box(self) -> Box:
        """The whole cube [0, 1]^d."""
        return Box(np.zeros(self.d), np.ones(self.d), self.identity)

    def check(self, x: Any, name: str = "x") -> np.ndarray:
        """``x`` as a float array of shape (d,), or ValueError/TypeError naming ``name``."""
        try:
            arr = np.asarray(x, dtype=float)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a sequence of {self.d} numbers") from err
        if arr.shape != (self.d,):
            raise ValueError(f"{name} must have {self.d} entries (one per dimension), got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite, got {arr.tolist()}")
        if arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"{name} must lie in [0, 1], got values in [{arr.min()}, {arr.max()}]")
        return arr


def _truncated_normal(rng: np.random.Generator, mean: np.ndarray, std: np.ndarray, lower: np.ndarray,
                      upper: np.ndarray, tries: int = 64) -> np.ndarray:
    """Draws of N(mean, std^2) restricted to [lower, upper], coordinate-wise (exact for a
    diagonal covariance): out-of-box coordinates are redrawn, and after ``tries`` rounds the
    few that are still outside are clipped."""
    mean = np.broadcast_to(mean, np.broadcast_shapes(np.shape(mean), np.shape(std))).astype(float)
    std = np.broadcast_to(std, mean.shape)
    lower = np.broadcast_to(lower, mean.shape)
    upper = np.broadcast_to(upper, mean.shape)
    out = mean + std * rng.standard_normal(mean.shape)
    for _ in range(tries):
        bad = (out < lower) | (out > upper)
        if not bad.any():
            break
        out[bad] = mean[bad] + std[bad] * rng.standard_normal(int(bad.sum()))
    return np.clip(out, lower, upper)


@dataclass
class Box:
    """An axis-aligned box ``[lower, upper]`` inside [0, 1]^d, and the identity of each dim."""

    lower: np.ndarray
    upper: np.ndarray
    identity: np.ndarray

    def __post_init__(self) -> None:
        self.lower = np.asarray(self.lower, dtype=float).copy()
        self.upper = np.asarray(self.upper, dtype=float).copy()
        self.identity = np.asarray(self.identity, dtype=float).copy()
        if not (self.lower.shape == self.upper.shape == self.identity.shape) or self.lower.ndim != 1:
            raise ValueError("lower, upper and identity must be 1-d arrays of the same length")
        if np.any(self.lower < 0) or np.any(self.upper > 1) or np.any(self.lower > self.upper):
            raise ValueError(f"the box must satisfy 0 <= lower <= upper <= 1, got {self.lower} .. {self.upper}")

    @property
    def d(self) -> int:
        return self.lower.shape[0]

    @property
    def width(self) -> np.ndarray:
        return self.upper - self.lower

    @classmethod
    def from_theta(cls, space: SearchSpace, theta: Sequence[float]) -> Box:
        """The box boundary characterisation leaves: ``[0, theta]`` for rates, ``[theta, 1]``
        for ranks."""
        theta = np.asarray(theta, dtype=float)
        if theta.shape != (space.d,):
            raise ValueError(f"theta must have {space.d} entries, got shape {theta.shape}")
        rate = np.array([k == "rate" for k in space.kinds])
        lower = np.where(rate, 0.0, theta)
        upper = np.where(rate, theta, 1.0)
        return cls(lower, upper, space.identity)

    def clip(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, self.lower, self.upper)

    def contains(self, x: np.ndarray) -> np.ndarray:
        """Boolean per row of ``x`` (n, d): inside the box."""
        x = np.atleast_2d(x)
        return np.all((x >= self.lower) & (x <= self.upper), axis=1)

    def uniform(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` points drawn uniformly from the box, shape (n, d)."""
        return self.lower + self.width * rng.random((n, self.d))

    def initial(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """The first batch after boundary characterisation (§IV-C): a rate dimension with
        bound theta is drawn from N(theta/2, theta/2) (standard deviation theta/2) restricted
        to [0, theta]; a rank dimension from U[theta, 1]."""
        rate = self.identity == 0.0
        theta = np.where(rate, self.upper, self.lower)
        out = self.uniform(n, rng)
        if rate.any():
            half = theta[rate] / 2
            out[:, rate] = _truncated_normal(
                rng, np.tile(half, (n, 1)), np.tile(half, (n, 1)), self.lower[rate], self.upper[rate]
            )
        return out

    def state_dict(self) -> dict[str, list[float]]:
        return {"lower": self.lower.tolist(), "upper": self.upper.tolist(), "identity": self.identity.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, list[float]]) -> Box:
        return cls(np.array(state["lower"]), np.array(state["upper"]), np.array(state["identity"]))


def integer_setting(value: float, kind: str, levels: int) -> int:
    """The integer a normalised value stands for (Appendix A): for a rate ``p`` over ``c``
    channels, the number of channels *kept*, ``c - floor(p c)``; for a normalised rank over full
    rank ``R``, ``floor(rank R)``. Never below 1 (a layer keeps at least one channel / rank)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be a positive int, got {levels!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"value must lie in [0, 1], got {value}")
    # 1e-9 guards against 0.3 * 10 = 2.9999999999999996 style round-off.
    kept = levels - math.floor(value * levels + 1e-9) if kind == "rate" else math.floor(value * levels + 1e-9)
    return max(1, min(levels, kept))
