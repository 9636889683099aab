"""Algorithm 1 of Javaheripi, Samragh, Javidi and Koushanfar, "AdaNS: Adaptive Non-Uniform
Sampling for Automated Design of Compact DNNs", IEEE JSTSP 2020, doi:10.1109/JSTSP.2020.2992384: the AdaNS
iteration with the adaptive proximity parameter.

:class:`AdaNS` is an ask/tell object: ``ask()`` gives the next batch of ``b`` points,
``tell(scores)`` records their scores. Between the two nothing is assumed about how the
points are evaluated (in this process, by a Hydra launcher, on a cluster), and the whole
state (history, random generator, sampler state, the pending batch) is plain values
(``state_dict``), so a search can be saved after every batch and resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lightning_prune.search.samplers import Sampler, make_sampler
from lightning_prune.search.space import Box

INITS = ("boundary", "uniform")


def proximity(scores: np.ndarray, num_good: int, alpha_max: float) -> tuple[float, np.ndarray]:
    """``alpha_t`` and the mask of ``S_g`` (Algorithm 1, lines 1-3).

    ``alpha_t`` is the largest ``alpha <= alpha_max`` that leaves at least ``num_good`` samples
    with ``f >= alpha * max f``. (The paper writes ``>``; the supremum of the strict version is
    not attained, so the ``num_good``-th best sample is kept with ``>=``.) Scores must be
    positive.
    """
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError("scores must be a non-empty 1-d array")
    if not np.all(np.isfinite(scores)) or np.any(scores <= 0):
        raise ValueError(f"scores must be positive and finite (AdaNS compares them as ratios), got min {scores.min()}")
    f_star = scores.max()
    kth = np.sort(scores)[::-1][min(num_good, len(scores)) - 1]
    alpha = float(min(alpha_max, kth / f_star))
    good = scores >= alpha * f_star * (1 - 1e-12)
    return alpha, good


class AdaNS:
    """The AdaNS loop over a :class:`Box` with one of the samplers.

    Args:
        box: where points are drawn (after boundary characterisation, or the whole cube).
        sampler: a :class:`Sampler` or its name (``uniform``, ``zoom``, ``genetic``, ``gaussian``).
        batch_size: ``b``, points per iteration.
        alpha_max: the target proximity parameter (the paper uses about 0.95).
        num_good: minimum size of ``S_g`` (default ``batch_size``, as in Algorithm 1).
        init: first batch from the boundary-aware distribution of §IV-C (``"boundary"``) or
            uniform over the box (``"uniform"``).
        seed: seed of the random generator.
        repair: optional function applied to every proposed batch (n, d) -> (n, d) before it is
            handed out, e.g. to project over-budget points back onto the budget.
    """

    def __init__(
        self,
        box: Box,
        sampler: Sampler | str,
        batch_size: int,
        alpha_max: float = 0.95,
        num_good: int | None = None,
        init: str = "boundary",
        seed: int = 0,
        repair: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        if not isinstance(box, Box):
            raise TypeError(f"box must be a Box, got {type(box).__name__}")
        if isinstance(sampler, str):
            sampler = make_sampler(sampler)
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a Sampler or a sampler name, got {type(sampler).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(alpha_max, bool) or not isinstance(alpha_max, (int, float)) or not 0 < alpha_max < 1:
            raise ValueError(f"alpha_max must be in (0, 1), got {alpha_max!r}")
        num_good = batch_size if num_good is None else num_good
        if isinstance(num_good, bool) or not isinstance(num_good, int) or num_good < 1:
            raise ValueError(f"num_good must be a positive int, got {num_good!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.box = box
        self.sampler = sampler
        self.batch_size = batch_size
        self.alpha_max = float(alpha_max)
        self.num_good = num_good
        self.init = init
        self.seed = seed
        self.repair = repair
        self.rng = np.random.default_rng(seed)
        self.xs = np.zeros((0, box.d))
        self.scores = np.zeros(0)
        self.batch_of = np.zeros(0, dtype=int)  # iteration index of every sample
        self.infos: list[dict[str, Any]] = []
        self.alphas: list[float] = []  # alpha_t used to propose batch t (t >= 1)
        self.pending: np.ndarray | None = None

    # --- Algorithm 1 ------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        """Number of batches evaluated so far."""
        return int(self.batch_of.max()) + 1 if len(self.batch_of) else 0

    def good(self) -> tuple[float, np.ndarray]:
        """``alpha_t`` and the mask of ``S_g`` for the current history."""
        return proximity(self.scores, self.num_good, self.alpha_max)

    def ask(self) -> np.ndarray:
        """The next batch, shape (b, d). Asking again before ``tell`` returns the same batch."""
        if self.pending is None:
            if len(self.scores) == 0:
                batch = self.box.initial(self.batch_size, self.rng) if self.init == "boundary" else self.box.uniform(
                    self.batch_size, self.rng
                )
            else:
                alpha, good = self.good()
                self.alphas.append(alpha)
                batch = self.sampler.propose(self.batch_size, self.box, self.xs, self.scores, good, self.rng)
            batch = self.box.clip(batch)
            if self.repair is not None:
                batch = np.asarray(self.repair(batch), dtype=float)
                if batch.shape != (self.batch_size, self.box.d):
                    raise ValueError(f"repair must return shape {(self.batch_size, self.box.d)}, got {batch.shape}")
            self.pending = batch
        return self.pending.copy()

    def tell(self, scores: Sequence[float], infos: Sequence[dict[str, Any]] | None = None) -> None:
        """Record the scores (positive) of the batch returned by the last ``ask``."""
        if self.pending is None:
            raise RuntimeError("tell() needs a batch from ask() first")
        scores = np.asarray(scores, dtype=float)
        if scores.shape != (len(self.pending),):
            raise ValueError(f"scores must have {len(self.pending)} entries (one per asked point), got shape {scores.shape}")
        if not np.all(np.isfinite(scores)) or np.any(scores <= 0):
            raise ValueError(f"scores must be positive and finite, got {scores.tolist()}")
        infos = [dict(i) for i in infos] if infos is not None else [{} for _ in scores]
        if len(infos) != len(scores):
            raise ValueError(f"infos must have {len(scores)} entries, got {len(infos)}")
        t = self.iteration
        self.xs = np.concatenate([self.xs, self.pending])
        self.scores = np.concatenate([self.scores, scores])
        self.batch_of = np.concatenate([self.batch_of, np.full(len(scores), t)])
        self.infos.extend(infos)
        self.pending = None

    def step(self, objective: Callable[[np.ndarray], Sequence[float]]) -> None:
        """One iteration: ask, score the batch with ``objective((b, d)) -> b scores``, tell."""
        self.tell(objective(self.ask()))

    def run(self, objective: Callable[[np.ndarray], Sequence[float]], iterations: int) -> tuple[np.ndarray, float]:
        """``iterations`` iterations (including the first batch); returns the best point and score."""
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive int, got {iterations!r}")
        while self.iteration < iterations:
            self.step(objective)
        x, f, _ = self.best()
        return x, f

    # --- results ----------------------------------------------------------------------------
    def best(self) -> tuple[np.ndarray, float, dict[str, Any]]:
        """The best point so far, its score and info."""
        if len(self.scores) == 0:
            raise RuntimeError("no point has been evaluated yet")
        i = int(np.argmax(self.scores))
        return self.xs[i].copy(), float(self.scores[i]), dict(self.infos[i])

    def best_so_far(self) -> np.ndarray:
        """The running maximum of the score after every evaluation, shape (N,)."""
        return np.maximum.accumulate(self.scores) if len(self.scores) else np.zeros(0)

    # --- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as JSON-compatible values."""
        return {
            "box": self.box.state_dict(),
            "sampler": {"name": self.sampler.name, "state": self.sampler.state_dict()},
            "batch_size": self.batch_size,
            "alpha_max": self.alpha_max,
            "num_good": self.num_good,
            "init": self.init,
            "seed": self.seed,
            "rng": self.rng.bit_generator.state,
            "xs": self.xs.tolist(),
            "scores": self.scores.tolist(),
            "batch_of": self.batch_of.tolist(),
            "infos": self.infos,
            "alphas": self.alphas,
            "pending": None if self.pending is None else self.pending.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by ``state_dict``; the settings must match this object's."""
        mine = {"batch_size": self.batch_size, "alpha_max": self.alpha_max, "num_good": self.num_good,
                "init": self.init, "seed": self.seed, "sampler": self.sampler.name}
        theirs = {k: state[k] for k in mine if k != "sampler"} | {"sampler": state["sampler"]["name"]}
        if mine != theirs:
            diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
            raise ValueError(f"state: saved with different settings (saved, now): {diff}")
        self.box = Box.from_state(state["box"])
        self.sampler.load_state_dict(state["sampler"]["state"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self.xs = np.asarray(state["xs"], dtype=float).reshape(-1, self.box.d)
        self.scores = np.asarray(state["scores"], dtype=float)
        self.batch_of = np.asarray(state["batch_of"], dtype=int)
        self.infos = [dict(i) for i in state["infos"]]
        self.alphas = [float(a) for a in state["alphas"]]
        self.pending = None if state["pending"] is None else np.asarray(state["pending"], dtype=float)
