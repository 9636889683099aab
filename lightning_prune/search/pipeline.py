"""The whole AdaNS search as one ask/tell object: reference, boundary, Algorithm 1.

:class:`CompressionSearch` asks for points ``x`` to evaluate and is told, for each, a result
``{"accuracy": percent, "cost": number}`` (any extra keys are kept). It runs

1. the *reference*: the identity point (the original model), whose accuracy and cost define
   the score (:class:`~lightning_prune.search.score.Scorer`);
2. *boundary characterisation* (§IV-C), unless ``boundary_steps`` is None;
3. ``iterations`` batches of Algorithm 1 with the chosen sampler.

Points are rounded to 6 decimals when they are proposed, so that a point sent as text (a
Hydra override) and read back is the same point. A point that was already evaluated is not
asked again: its result is reused. With a ``budget`` (fraction of the original cost) and a
space that predicts costs, every proposed point whose predicted cost is over budget is
*repaired* before it is asked: moved along the segment towards the most compressed corner of
the box just far enough to meet the budget. With ``fill_budget`` an under-budget point is moved
the other way, towards the original model, until it spends the budget: every candidate then
costs about the budget, and the search compares them by accuracy alone.

Everything is plain values (``state_dict``), so the search can be saved after every batch and
resumed without evaluating finished points again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lightning_prune.search.boundary import BoundaryCharacterization
from lightning_prune.search.loop import AdaNS
from lightning_prune.search.samplers import Sampler, make_sampler
from lightning_prune.search.score import Scorer
from lightning_prune.search.space import SearchSpace

PHASES = ("reference", "boundary", "search", "done")
DECIMALS = 6


def _key(x: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.round(np.asarray(x, dtype=float), DECIMALS))


def _check_result(result: Any) -> dict[str, Any]:
    if not isinstance(result, dict) or "accuracy" not in result or "cost" not in result:
        raise ValueError(f"an evaluation must return a dict with 'accuracy' (percent) and 'cost', got {result!r}")
    out = dict(result)
    out["accuracy"] = float(out["accuracy"])
    out["cost"] = float(out["cost"])
    if not 0.0 <= out["accuracy"] <= 100.0:
        raise ValueError(f"accuracy must be a percentage in [0, 100], got {out['accuracy']}")
    return out


class CompressionSearch:
    """AdaNS from the original model to the best compression vector.

    Args:
        space: the dimensions of x (and optionally ``predict_cost``).
        sampler: ``uniform``, ``zoom``, ``genetic``, ``gaussian`` or a :class:`Sampler`.
        batch_size: points per AdaNS iteration (``b``).
        iterations: number of AdaNS batches, the first one included.
        threshold: ``A_thr`` in percent.
        alpha_max: target proximity parameter of Algorithm 1.
        boundary_steps: bisection rounds of boundary characterisation; None skips it (the box
            stays the whole cube).
        init: first AdaNS batch from the §IV-C distribution (``boundary``) or uniform.
        seed: random seed.
        min_drop, cost_weight: see :func:`~lightning_prune.search.score.score`.
        budget: optional maximum cost as a fraction of the original cost (needs
            ``space.predict_cost``); over-budget points are repaired before they are asked.
        fill_budget: with ``budget``, also move every under-budget point towards the original
            model (less compression in every dimension) until it spends the budget.
    """

    def __init__(
        self,
        space: SearchSpace,
        sampler: Sampler | str = "gaussian",
        batch_size: int = 50,
        iterations: int = 50,
        threshold: float = 70.0,
        alpha_max: float = 0.95,
        boundary_steps: int | None = 6,
        init: str = "boundary",
        seed: int = 0,
        min_drop: float = 0.1,
        cost_weight: float = 1.0,
        budget: float | None = None,
        fill_budget: bool = False,
    ) -> None:
        if not isinstance(space, SearchSpace):
            raise TypeError(f"space must be a SearchSpace, got {type(space).__name__}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive int, got {iterations!r}")
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
                raise ValueError(f"budget must be a fraction of the original cost in (0, 1], got {budget!r}")
            if space.predict_cost is None:
                raise ValueError("budget needs a space that predicts costs (space.predict_cost is None)")
        if not isinstance(fill_budget, bool):
            raise TypeError(f"fill_budget must be a bool, got {type(fill_budget).__name__}")
        if fill_budget and budget is None:
            raise ValueError("fill_budget needs a budget")
        self.fill_budget = fill_budget
        self.space = space
        self.iterations = iterations
        self.threshold = float(threshold)
        self.min_drop = min_drop
        self.cost_weight = cost_weight
        self.budget = None if budget is None else float(budget)
        self.boundary = None if boundary_steps is None else BoundaryCharacterization(space, threshold, boundary_steps)
        sampler = make_sampler(sampler) if isinstance(sampler, str) else sampler
        self.ada = AdaNS(space.box(), sampler, batch_size, alpha_max=alpha_max, init=init, seed=seed, repair=self.repair)
        self.phase = "reference"
        self.reference: dict[str, Any] | None = None
        self.cache: dict[tuple[float, ...], dict[str, Any]] = {}
        self.log: list[dict[str, Any]] = []  # every launched evaluation: phase, x, result
        self.batch: list[np.ndarray] | None = None  # points of the current ask, cached ones included
        self._base_predicted: float | None = None

    # --- scoring and repair -----------------------------------------------------------------
    @property
    def scorer(self) -> Scorer:
        if self.reference is None:
            raise RuntimeError("the reference (original model) has not been evaluated yet")
        return Scorer(self.reference["accuracy"], self.reference["cost"], self.threshold, self.min_drop, self.cost_weight)

    def _predicted_fraction(self, x: np.ndarray) -> float:
        assert self.space.predict_cost is not None  # only called with a budget (checked in __init__)
        if self._base_predicted is None:
            self._base_predicted = float(self.space.predict_cost(self.space.identity))
        return float(self.space.predict_cost(x)) / self._base_predicted

    def _towards(self, x: np.ndarray, end: np.ndarray) -> np.ndarray:
        """The point on the segment from ``x`` to ``end`` that meets the budget: the nearest to
        ``x`` when ``x`` is over it, the nearest to ``end`` otherwise (``end`` on the other side
        of the budget from ``x``), rounded to 6 decimals on the side under the budget."""
        over = self._predicted_fraction(x) > self.budget
        lo, hi = 0.0, 1.0  # fractions of the way from x to end; the answer lies between them
        for _ in range(40):
            mid = (lo + hi) / 2
            meets = self._predicted_fraction(x + mid * (end - x)) <= self.budget
            if meets == over:  # over budget: shrink towards x; filling: go further while under
                hi = mid
            else:
                lo = mid
        t = hi if over else lo  # the end of the bracket that is under the budget
        y = x + t * (end - x)
        # Round towards the compressed side so that rounding cannot push the point over budget.
        ceil_compresses = (end >= x) if over else (end <= x)  # per coordinate: rounding up compresses
        y = np.where(ceil_compresses, np.ceil(y * 10**DECIMALS), np.floor(y * 10**DECIMALS)) / 10**DECIMALS
        return self.ada.box.clip(y)

    def repair(self, batch: np.ndarray) -> np.ndarray:
        """Round a proposed batch (n, d) to 6 decimals and, with a budget, move every
        over-budget point towards the most compressed corner of the box until it meets it
        (and, with ``fill_budget``, every under-budget point towards the original model until
        it spends it)."""
        batch = np.round(batch, DECIMALS)
        if self.budget is None:
            return batch
        box = self.ada.box
        far = np.where(box.identity == 0.0, box.upper, box.lower)
        if self._predicted_fraction(far) > self.budget:
            raise ValueError(
                f"budget {self.budget} cannot be met inside the search box: its most compressed point costs "
                f"{self._predicted_fraction(far):.4f} of the original; lower the accuracy threshold or raise the budget"
            )
        out = batch.copy()
        identity = np.asarray(self.space.identity, dtype=float)
        for k, x in enumerate(batch):
            if self._predicted_fraction(x) > self.budget:
                out[k] = self._towards(x, far)
            elif self.fill_budget and self._predicted_fraction(identity) > self.budget:
                out[k] = self._towards(x, identity)
        return out

    # --- ask / tell -------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.phase == "done"

    def _next_batch(self) -> list[np.ndarray]:
        while True:
            if self.phase == "reference":
                return [self.space.identity]
            if self.phase == "boundary":
                assert self.boundary is not None
                if not self.boundary.done:
                    return list(np.round(self.boundary.ask(), DECIMALS))
                self.ada.box = self.boundary.box()
                self.phase = "search"
                continue
            if self.phase == "search":
                if self.ada.iteration >= self.iterations:
                    self.phase = "done"
                    continue
                return list(self.ada.ask())
            return []

    def ask(self) -> list[np.ndarray]:
        """The points to evaluate now (distinct, not evaluated before); empty when done.

        Asking again before ``tell`` returns the same points.
        """
        while True:
            if self.batch is None:
                self.batch = self._next_batch()
            if self.done:
                return []
            todo: dict[tuple[float, ...], np.ndarray] = {}
            for x in self.batch:
                k = _key(x)
                if k not in self.cache and k not in todo:
                    todo[k] = np.asarray(k)
            if todo:
                return list(todo.values())
            self._finish_batch()  # everything was evaluated before: no launch needed

    def tell(self, results: Sequence[dict[str, Any]]) -> None:
        """Results (``{"accuracy": percent, "cost": number, ...}``) of the points of the last ``ask``."""
        points = self.ask()
        if not points:
            raise RuntimeError("tell() after the search is done")
        if len(results) != len(points):
            raise ValueError(f"results must have {len(points)} entries (one per asked point), got {len(results)}")
        checked = [_check_result(r) for r in results]
        for x, r in zip(points, checked):
            self.cache[_key(x)] = r
            self.log.append({"phase": self.phase, "iteration": self.ada.iteration, "x": [float(v) for v in x], "result": r})
        self._finish_batch()

    def _finish_batch(self) -> None:
        assert self.batch is not None
        results = [self.cache[_key(x)] for x in self.batch]
        if self.phase == "reference":
            self.reference = results[0]
            if self.reference["cost"] <= 0:
                raise ValueError(f"the original model's cost must be positive, got {self.reference['cost']}")
            if self.threshold >= self.reference["accuracy"]:
                raise ValueError(
                    f"threshold ({self.threshold} %) must be below the original model's accuracy "
                    f"({self.reference['accuracy']:.2f} %) on the evaluation images"
                )
            self.phase = "boundary" if self.boundary is not None else "search"
        elif self.phase == "boundary":
            assert self.boundary is not None
            self.boundary.tell([r["accuracy"] for r in results])
        elif self.phase == "search":
            scorer = self.scorer
            scores = [scorer(r["accuracy"], r["cost"]) for r in results]
            infos = [{"accuracy": r["accuracy"], "cost": r["cost"], "cost_fraction": r["cost"] / scorer.base_cost}
                     for r in results]
            self.ada.tell(scores, infos)
        self.batch = None

    def run(self, evaluate: Callable[[list[np.ndarray]], Sequence[dict[str, Any]]],
            callback: Callable[[CompressionSearch], None] | None = None) -> dict[str, Any]:
        """Run to the end in this process: ``evaluate(points) -> results``; ``callback(self)``
        after every batch. Returns :meth:`best`."""
        while True:
            points = self.ask()
            if not points:
                break
            self.tell(list(evaluate(points)))
            if callback is not None:
                callback(self)
        return self.best()

    # --- results ----------------------------------------------------------------------------
    @property
    def theta(self) -> np.ndarray | None:
        return None if self.boundary is None else self.boundary.theta

    def best(self) -> dict[str, Any]:
        """The best point of the AdaNS phase: x, score, accuracy, cost, cost fraction."""
        x, f, info = self.ada.best()
        return {"x": [float(v) for v in x], "score": f, **info}

    def top(self, k: int) -> list[dict[str, Any]]:
        """The ``k`` best distinct points of the AdaNS phase, best first (as :meth:`best`)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if len(self.ada.scores) == 0:
            raise RuntimeError("no point has been evaluated yet")
        out: list[dict[str, Any]] = []
        seen: set[tuple[float, ...]] = set()
        for i in np.argsort(-self.ada.scores, kind="stable"):
            key = _key(self.ada.xs[i])
            if key in seen:
                continue
            seen.add(key)
            out.append({"x": [float(v) for v in self.ada.xs[i]], "score": float(self.ada.scores[i]), **self.ada.infos[i]})
            if len(out) == k:
                break
        return out

    def status(self) -> dict[str, Any]:
        """Phase, iteration, evaluations, and (during the search) the best so far and alpha_t."""
        out: dict[str, Any] = {"phase": self.phase, "iteration": self.ada.iteration, "evaluations": len(self.log)}
        if len(self.ada.scores):
            best = self.best()
            out.update(best_score=best["score"], best_accuracy=best["accuracy"], best_cost_fraction=best["cost_fraction"],
                       alpha=self.ada.alphas[-1] if self.ada.alphas else 0.0)
        return out

    def trace(self) -> np.ndarray:
        """Best score so far after each AdaNS sample (cached repeats included), shape (N,)."""
        return self.ada.best_so_far()

    # --- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "iterations": self.iterations,
            "threshold": self.threshold,
            "budget": self.budget,
            "fill_budget": self.fill_budget,
            "space": self.space.names,
            "reference": self.reference,
            "boundary": None if self.boundary is None else self.boundary.state_dict(),
            "ada": self.ada.state_dict(),
            "log": self.log,
            "batch": None if self.batch is None else [list(map(float, x)) for x in self.batch],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"threshold": self.threshold, "budget": self.budget, "fill_budget": self.fill_budget, "space": self.space.names}
        theirs = {k: state.get(k, False) if k == "fill_budget" else state[k] for k in mine}  # saved before fill_budget: off
        if mine != theirs:
            diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
            raise ValueError(f"state: saved with different settings (saved, now): {diff}")
        if (self.boundary is None) != (state["boundary"] is None):
            raise ValueError("state: boundary characterisation was " + ("off" if state["boundary"] is None else "on"))
        if self.boundary is not None:
            self.boundary.load_state_dict(state["boundary"])
        self.ada.load_state_dict(state["ada"])
        self.phase = state["phase"]
        if self.phase not in PHASES:
            raise ValueError(f"state: unknown phase {self.phase!r}")
        if self.phase == "done" and self.ada.iteration < self.iterations:
            self.phase = "search"  # resumed with more iterations
        self.reference = state["reference"]
        self.log = [dict(e) for e in state["log"]]
        self.cache = {_key(e["x"]): e["result"] for e in self.log}
        self.batch = None if state["batch"] is None else [np.asarray(x, dtype=float) for x in state["batch"]]
