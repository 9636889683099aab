"""The AdaNS score (Javaheripi, Samragh, Javidi and Koushanfar, "AdaNS: Adaptive Non-Uniform
Sampling for Automated Design of Compact DNNs", IEEE JSTSP 2020, doi:10.1109/JSTSP.2020.2992384; Sec. IV-B,
eqs. 3-6).

    f(x) = exp(dC(M, x)) / PEN_A(x)                                            (6)

    PEN_A(x) = dA(M, x)                              if A(M_x) >= A_thr        (4)
             = dA(M, x) + exp(A_thr - A(M_x))        otherwise

with ``dC = 1 - C(M_x) / C(M)`` the normalised cost reduction (cost in any unit: MACs,
parameters, activation volume) and ``dA = A(M) - A(M_x)`` the accuracy drop.

Choices the paper leaves open, made here:

- Accuracies are in **percent** (0-100), as in the paper's Fig. 3 (A_thr = 80 %, A(M) = 93.5 %):
  with percent the exterior penalty ``exp(A_thr - A)`` grows by e per lost point below the
  threshold, which is what "greatly diminish" asks for. Above the threshold only the ratio of
  two drops matters, so the unit does not change which candidate wins there.
- The drop is floored at ``min_drop`` percentage points (default 0.1, one image in 1,000):
  ``log dA`` is undefined for a candidate as accurate as (or more accurate than) the original
  model, and differences below the resolution of the held-out set are noise.
- ``cost_weight`` (default 1, the paper) multiplies ``dC`` in the exponent; values above 1
  favour smaller models over the last fraction of a point of accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _check_accuracy(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number (percent), got {type(value).__name__}")
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{name} must be a percentage in [0, 100], got {value}")
    return float(value)


def accuracy_penalty(accuracy: float, base_accuracy: float, threshold: float, min_drop: float = 0.1) -> float:
    """``PEN_A`` of eq. 4; all accuracies in percent, ``min_drop`` in percentage points."""
    accuracy = _check_accuracy("accuracy", accuracy)
    base_accuracy = _check_accuracy("base_accuracy", base_accuracy)
    threshold = _check_accuracy("threshold", threshold)
    if not isinstance(min_drop, (int, float)) or not min_drop > 0:
        raise ValueError(f"min_drop must be a positive number of percentage points, got {min_drop!r}")
    drop = max(base_accuracy - accuracy, float(min_drop))
    if accuracy >= threshold:
        return drop
    return drop + math.exp(threshold - accuracy)


def score(
    cost_reduction: float,
    accuracy: float,
    base_accuracy: float,
    threshold: float,
    min_drop: float = 0.1,
    cost_weight: float = 1.0,
) -> float:
    """``f(x)`` of eq. 6: ``exp(cost_weight * cost_reduction) / PEN_A``.

    ``cost_reduction`` is ``1 - cost / base_cost`` (at most 1); accuracies in percent.
    """
    if isinstance(cost_reduction, bool) or not isinstance(cost_reduction, (int, float)) or not math.isfinite(cost_reduction):
        raise TypeError(f"cost_reduction must be a finite number, got {cost_reduction!r}")
    if cost_reduction > 1.0:
        raise ValueError(f"cost_reduction must be at most 1 (1 - cost / base_cost), got {cost_reduction}")
    if not isinstance(cost_weight, (int, float)) or not cost_weight > 0:
        raise ValueError(f"cost_weight must be a positive number, got {cost_weight!r}")
    return math.exp(cost_weight * cost_reduction) / accuracy_penalty(accuracy, base_accuracy, threshold, min_drop)


@dataclass(frozen=True)
class Scorer:
    """The score of eq. 6 for a fixed original model: ``Scorer(...)(accuracy, cost)``.

    ``base_accuracy`` and ``threshold`` in percent; ``base_cost`` in the unit of the costs
    passed later (e.g. MACs per sample).
    """

    base_accuracy: float
    base_cost: float
    threshold: float
    min_drop: float = 0.1
    cost_weight: float = 1.0

    def __post_init__(self) -> None:
        _check_accuracy("base_accuracy", self.base_accuracy)
        _check_accuracy("threshold", self.threshold)
        if isinstance(self.base_cost, bool) or not isinstance(self.base_cost, (int, float)) or not self.base_cost > 0:
            raise ValueError(f"base_cost must be a positive number, got {self.base_cost!r}")
        if self.threshold >= self.base_accuracy:
            raise ValueError(
                f"threshold must be below the original model's accuracy ({self.base_accuracy:.2f} %), "
                f"got {self.threshold}"
            )
        accuracy_penalty(self.base_accuracy, self.base_accuracy, self.threshold, self.min_drop)  # checks min_drop
        score(0.0, self.base_accuracy, self.base_accuracy, self.threshold, self.min_drop, self.cost_weight)

    def cost_reduction(self, cost: float) -> float:
        """``dC = 1 - cost / base_cost``."""
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not cost >= 0:
            raise ValueError(f"cost must be a non-negative number, got {cost!r}")
        return 1.0 - float(cost) / float(self.base_cost)

    def __call__(self, accuracy: float, cost: float) -> float:
        return score(self.cost_reduction(cost), accuracy, self.base_accuracy, self.threshold, self.min_drop, self.cost_weight)
