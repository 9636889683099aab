"""The AdaNS sampling subroutines (Javaheripi, Samragh, Javidi and Koushanfar, "AdaNS: Adaptive
Non-Uniform Sampling for Automated Design of Compact DNNs", IEEE JSTSP 2020, doi:10.1109/JSTSP.2020.2992384;
Sec. V) and a uniform baseline.

A sampler turns the history (all evaluated points ``xs`` with their scores, and the mask of
good samples ``S_g`` chosen by Algorithm 1) into the next batch. Samplers are stateless except
Zoom, whose sub-region hierarchy grows by one division per iteration; every sampler has
``state_dict`` / ``load_state_dict`` with plain values so a search can be saved and resumed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_prune.search.space import Box, _truncated_normal


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def split_counts(n: int, fractions: list[float]) -> list[int]:
    """Split ``n`` into integer parts proportional to ``fractions`` (largest remainder)."""
    total = sum(fractions)
    exact = [n * f / total for f in fractions]
    counts = [int(np.floor(e)) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


class Sampler:
    """Base class: ``propose`` draws ``n`` points in ``box`` from the history."""

    name = "sampler"

    def propose(
        self,
        n: int,
        box: Box,
        xs: np.ndarray,
        scores: np.ndarray,
        good: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """``n`` new points, shape (n, d), inside ``box``.

        ``xs`` (N, d) are all evaluated points, ``scores`` (N,) their scores, ``good`` (N,) the
        boolean mask of ``S_g``.
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class UniformSampler(Sampler):
    """The naive baseline: every batch uniform over the box, ignoring the history."""

    name = "uniform"

    def propose(self, n, box, xs, scores, good, rng):  # noqa: D102 (documented on Sampler)
        return box.uniform(n, rng)


class ZoomSampler(Sampler):
    """AdaNS-Zoom (§V-A): the box is divided into sub-regions; each iteration the region with
    the largest share of good samples ``w_i = |S_g|_i / |S|_i`` (eq. 9) is halved along its
    longest side, then every new point is drawn uniformly from a region chosen with
    probability proportional to ``w_i``.

    A region that holds no evaluated point yet (possible right after a division) inherits the
    ``w`` of the region it was split from.
    """

    name = "zoom"

    def __init__(self) -> None:
        self.regions: list[tuple[np.ndarray, np.ndarray]] = []
        self.inherited: list[float] = []

    def _members(self, box: Box, xs: np.ndarray) -> np.ndarray:
        """(regions, N) membership: half-open regions, closed at the box's upper faces, so
        that every point of the box is in exactly one region."""
        member = np.zeros((len(self.regions), len(xs)), dtype=bool)
        for r, (lo, hi) in enumerate(self.regions):
            upper_ok = (xs < hi) | ((xs <= hi) & (hi >= box.upper))
            member[r] = np.all((xs >= lo) & upper_ok, axis=1)
        return member

    def weights(self, box: Box, xs: np.ndarray, good: np.ndarray) -> np.ndarray:
        """``w_i`` of every region (eq. 9)."""
        member = self._members(box, xs)
        total = member.sum(axis=1)
        n_good = (member & good[None, :]).sum(axis=1)
        inherited = np.asarray(self.inherited, dtype=float)
        return np.where(total > 0, n_good / np.maximum(total, 1), inherited)

    def propose(self, n, box, xs, scores, good, rng):  # noqa: D102
        if not self.regions:
            self.regions = [(box.lower.copy(), box.upper.copy())]
            self.inherited = [1.0]
        w = self.weights(box, xs, good)
        best = int(np.argmax(w))
        lo, hi = self.regions[best]
        axis = int(np.argmax(hi - lo))
        mid = (lo[axis] + hi[axis]) / 2
        left_hi, right_lo = hi.copy(), lo.copy()
        left_hi[axis] = mid
        right_lo[axis] = mid
        self.regions[best : best + 1] = [(lo, left_hi), (right_lo, hi)]
        self.inherited[best : best + 1] = [float(w[best]), float(w[best])]
        w = self.weights(box, xs, good)
        if w.sum() <= 0:  # no region holds a good sample: fall back to volume
            w = np.array([np.prod(h - l) for l, h in self.regions])
            w = w if w.sum() > 0 else np.ones(len(self.regions))
        chosen = rng.choice(len(self.regions), size=n, p=w / w.sum())
        lows = np.stack([self.regions[c][0] for c in chosen])
        highs = np.stack([self.regions[c][1] for c in chosen])
        return lows + (highs - lows) * rng.random(lows.shape)

    def state_dict(self) -> dict[str, Any]:
        return {
            "regions": [[lo.tolist(), hi.tolist()] for lo, hi in self.regions],
            "inherited": list(self.inherited),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.regions = [(np.array(lo, dtype=float), np.array(hi, dtype=float)) for lo, hi in state.get("regions", [])]
        self.inherited = [float(w) for w in state.get("inherited", [])]
        if len(self.inherited) != len(self.regions):
            raise ValueError("state: 'regions' and 'inherited' must have the same length")


class GeneticSampler(Sampler):
    """AdaNS-Genetic (§V-B): score-proportional selection from ``S_g`` without replacement
    after subtracting the minimum score (eq. 10), crossover of adjacent pairs (probability
    ``p_cross`` per pair, ``p_swap`` per element), mutation (probability ``p_mutate`` per
    sample, ``p_tweak`` per element, noise N(0, ``sigma``) with ``sigma`` = 0.2), clipped to the
    box.

    When fewer members of ``S_g`` than ``n`` have a positive selection weight, the remaining
    parents are drawn again from them (with replacement).
    """

    name = "genetic"

    def __init__(
        self,
        p_cross: float = 0.8,
        p_swap: float = 0.2,
        p_mutate: float = 0.2,
        p_tweak: float = 0.05,
        sigma: float = 0.2,
    ) -> None:
        self.p_cross = _check_fraction("p_cross", p_cross)
        self.p_swap = _check_fraction("p_swap", p_swap)
        self.p_mutate = _check_fraction("p_mutate", p_mutate)
        self.p_tweak = _check_fraction("p_tweak", p_tweak)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"sigma must be a positive number, got {sigma!r}")
        self.sigma = float(sigma)

    def select(self, n: int, scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Indices (into ``scores``) of ``n`` parents, selected as eq. 10 says."""
        weights = scores - scores.min()
        positive = np.flatnonzero(weights > 0)
        if len(positive) == 0:  # every good sample scores the same
            return rng.choice(len(scores), size=n, replace=len(scores) < n)
        take = min(n, len(positive))
        p = weights[positive] / weights[positive].sum()
        chosen = list(rng.choice(positive, size=take, replace=False, p=p))
        if take < n:
            chosen += list(rng.choice(positive, size=n - take, replace=True, p=p))
        return rng.permutation(np.asarray(chosen, dtype=int))

    def propose(self, n, box, xs, scores, good, rng):  # noqa: D102
        pool, pool_scores = xs[good], scores[good]
        children = pool[self.select(n, pool_scores, rng)].copy()
        for k in range(0, n - 1, 2):  # adjacent pairs
            if rng.random() < self.p_cross:
                swap = rng.random(box.d) < self.p_swap
                a, b = children[k, swap].copy(), children[k + 1, swap].copy()
                children[k, swap], children[k + 1, swap] = b, a
        for k in range(n):
            if rng.random() < self.p_mutate:
                tweak = rng.random(box.d) < self.p_tweak
                children[k, tweak] += rng.normal(0.0, self.sigma, int(tweak.sum()))
        return box.clip(children)

    def __repr__(self) -> str:
        return (
            f"GeneticSampler(p_cross={self.p_cross}, p_swap={self.p_swap}, p_mutate={self.p_mutate}, "
            f"p_tweak={self.p_tweak}, sigma={self.sigma})"
        )


PAIR_STRATEGIES = (1, 2, 3, 4)


class GaussianSampler(Sampler):
    """AdaNS-Gaussian (§V-C): a mix of

    - *Local* samples (default 45 %) from a Gaussian mixture centred on the members of
      ``S_g`` with weights proportional to their scores and a diagonal standard deviation
      equal to the span of ``S_g`` in each dimension (eqs. 11-12);
    - *Cross* samples (default 45 %) from Gaussians centred on midpoints of pairs of good
      samples, with standard deviation ``|x1_j - x2_j| / 2`` (eq. 13);
    - *Uniform* samples (default 10 %) over the box.

    Pair strategies (the paper's numbering; 4 is its default): 1 both at random; 2 pairs in
    decreasing order of ``f(x1) + f(x2)``; 3 ``x1`` in decreasing score order and ``x2`` the
    farthest good sample from it; 4 ``x1`` in decreasing score order and ``x2`` at random.
    Gaussian draws are restricted to the box coordinate-wise (truncated normals).
    """

    name = "gaussian"

    def __init__(self, local: float = 0.45, cross: float = 0.45, uniform: float = 0.10, pair_strategy: int = 4) -> None:
        self.local = _check_fraction("local", local)
        self.cross = _check_fraction("cross", cross)
        self.uniform = _check_fraction("uniform", uniform)
        if abs(self.local + self.cross + self.uniform - 1.0) > 1e-9:
            raise ValueError(f"local + cross + uniform must be 1, got {self.local + self.cross + self.uniform}")
        if pair_strategy not in PAIR_STRATEGIES:
            raise ValueError(f"pair_strategy must be one of {PAIR_STRATEGIES}, got {pair_strategy!r}")
        self.pair_strategy = int(pair_strategy)

    def counts(self, n: int) -> tuple[int, int, int]:
        """How many (local, cross, uniform) points a batch of ``n`` gets."""
        local, cross, uniform = split_counts(n, [self.local, self.cross, self.uniform])
        return local, cross, uniform

    def pairs(self, m: int, pool: np.ndarray, pool_scores: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int]]:
        """``m`` index pairs into ``pool`` following ``pair_strategy``."""
        k = len(pool)
        if k < 2:
            return [(0, 0)] * m
        order = np.argsort(-pool_scores, kind="stable")
        out: list[tuple[int, int]] = []
        if self.pair_strategy == 2:
            i, j = np.triu_indices(k, 1)
            ranked = np.argsort(-(pool_scores[i] + pool_scores[j]), kind="stable")
            return [(int(i[r]), int(j[r])) for r in ranked[np.arange(m) % len(ranked)]]
        for t in range(m):
            if self.pair_strategy == 1:
                a, b = rng.choice(k, size=2, replace=False)
            else:
                a = int(order[t % k])
                if self.pair_strategy == 3:
                    b = int(np.argmax(np.linalg.norm(pool - pool[a], axis=1)))
                else:
                    b = int(rng.choice(np.delete(np.arange(k), a)))
            out.append((int(a), int(b)))
        return out

    def propose(self, n, box, xs, scores, good, rng):  # noqa: D102
        pool, pool_scores = xs[good], scores[good]
        n_local, n_cross, n_uniform = self.counts(n)
        parts = []
        if n_local:
            w = np.clip(pool_scores, 0, None)
            w = w / w.sum() if w.sum() > 0 else np.full(len(pool), 1 / len(pool))
            centres = pool[rng.choice(len(pool), size=n_local, p=w)]
            span = pool.max(axis=0) - pool.min(axis=0)
            parts.append(_truncated_normal(rng, centres, np.tile(span, (n_local, 1)), box.lower, box.upper))
        if n_cross:
            pairs = self.pairs(n_cross, pool, pool_scores, rng)
            a = pool[[p[0] for p in pairs]]
            b = pool[[p[1] for p in pairs]]
            parts.append(_truncated_normal(rng, (a + b) / 2, np.abs(a - b) / 2, box.lower, box.upper))
        if n_uniform:
            parts.append(box.uniform(n_uniform, rng))
        return np.concatenate(parts, axis=0)

    def __repr__(self) -> str:
        return (
            f"GaussianSampler(local={self.local}, cross={self.cross}, uniform={self.uniform}, "
            f"pair_strategy={self.pair_strategy})"
        )


SAMPLERS: dict[str, type[Sampler]] = {
    "uniform": UniformSampler,
    "zoom": ZoomSampler,
    "genetic": GeneticSampler,
    "gaussian": GaussianSampler,
}


def make_sampler(name: str, **kwargs: Any) -> Sampler:
    """A sampler by name (``uniform``, ``zoom``, ``genetic``, ``gaussian``) with its options."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name](**kwargs)
