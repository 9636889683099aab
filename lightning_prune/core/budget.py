"""Budget arithmetic for the pruning methods: pure functions, no Lightning.

- :func:`resolve_budget`: ``budget`` (fraction of the full cost kept) or ``factor`` (= 1 / budget).
- :func:`sigmoidal_transition` / :func:`budget_at`: the budget schedule of BAR as a pure function of
  progress ``t`` in [0, 1] (Lemaire et al., CVPR 2019, Sec. 3.4 and supplementary eq. 1), in the style of fvcore's ``ParamScheduler``.
- :func:`barrier`: BAR's barrier multiplier ``f(V, a, b)`` (Lemaire et al. 2019, Sec. 3), finite and flagged when capped.
- :func:`distillation_loss`: knowledge-distillation data loss ``L_D`` of BAR (Lemaire et al. 2019, Sec. 3).

Costs ``V``, ``a``, ``b``, ``start``, ``target`` are in whatever unit the caller counts (activation
volume, MACs or parameters); these functions only need them to be consistent.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from numbers import Real

from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "Budget",
    "SigmoidalTransition",
    "BarrierValue",
    "barrier",
    "budget_at",
    "distillation_loss",
    "resolve_budget",
    "sigmoidal_transition",
]

# Below this hardness the sigmoidal transition differs from the linear one by O(d^2) < 1e-16.
_LINEAR_HARDNESS = 1e-8


def finite_real(name: str, value: object) -> float:
    """``value`` as a float; ``TypeError``/``ValueError`` naming ``name`` unless it is a finite real (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def resolve_budget(budget: float | None = None, factor: float | None = None) -> float:
    """The fraction of the full cost to keep, in (0, 1].

    Give exactly one of ``budget`` (0 < budget <= 1, the fraction kept) or ``factor``
    (>= 1, the papers' pruning factor; budget = 1 / factor).
    """
    if budget is None and factor is None:
        raise ValueError("give exactly one of budget (0 < budget <= 1) or factor (>= 1); got neither")
    if budget is not None and factor is not None:
        raise ValueError(f"give exactly one of budget or factor, not both (got budget={budget}, factor={factor})")
    if budget is not None:
        value = finite_real("budget", budget)
        if not 0 < value <= 1:
            raise ValueError(f"budget must be in (0, 1] (fraction of the full cost kept), got {budget}")
        return value
    value = finite_real("factor", factor)
    if value < 1:
        raise ValueError(f"factor must be >= 1 (pruning factor = 1 / budget), got {factor}")
    return 1.0 / value


def sigmoidal_transition(t: float, hardness: float = 10.0) -> float:
    """BAR's sigmoidal transition ``T(t, d)`` from 0 at ``t = 0`` to 1 at ``t = 1`` (Lemaire et al. 2019, supplementary eq. 1).

    ``T(t, d) = (sigmoid(d (t - 0.5)) - delta) / (1 - 2 delta)``, ``delta = sigmoid(-0.5 d)``, d = ``hardness``.
    Evaluated in the equivalent form ``(tanh(d (t - 0.5) / 2) + tanh(d / 4)) / (2 tanh(d / 4))``, which
    has no cancellation for small ``d`` and gives T(0) = 0, T(0.5) = 0.5, T(1) = 1 exactly.
    ``d -> 0`` is the linear transition (returned as ``t`` when ``d < 1e-8``); large ``d`` a hard step.

    ``t`` outside [0, 1] raises ``ValueError`` rather than being clamped: progress past the end of
    the schedule is the caller's decision (clamp it to 1 explicitly).
    """
    t = finite_real("t", t)
    d = finite_real("hardness", hardness)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1] (progress through the schedule), got {t}")
    if d < 0:
        raise ValueError(f"hardness must be >= 0, got {hardness}")
    half = math.tanh(d / 4.0)
    if d < _LINEAR_HARDNESS or half == 0.0:
        return t
    return (math.tanh(d * (t - 0.5) / 2.0) + half) / (2.0 * half)


def budget_at(t: float, start: float, target: float, hardness: float = 10.0) -> float:
    """Budget at progress ``t``: ``(1 - T) * start + T * target`` with ``T = sigmoidal_transition(t, hardness)``."""
    start = finite_real("start", start)
    target = finite_real("target", target)
    transition = sigmoidal_transition(t, hardness)
    return (1.0 - transition) * start + transition * target


@dataclass(frozen=True)
class BarrierValue:
    """Result of :func:`barrier`: the multiplier ``value`` and whether it was ``capped``."""

    value: float
    capped: bool


def barrier(cost: float, a: float, b: float, cap: float = 1e3) -> BarrierValue:
    """BAR's barrier multiplier ``f(V, a, b)`` (Lemaire et al. 2019, Sec. 3); a plain float, no gradient through ``V``.

    With ``g = (V - a) / (b - a)``: ``f = 0`` if ``V <= a``; ``f = g^2 / (1 - g)`` if ``a < V < b``.
    ``f`` grows without bound as ``V -> b``; here it is capped: whenever ``g^2 / (1 - g) >= cap``
    or ``V >= b`` the result is ``BarrierValue(cap, capped=True)`` (so callers can count and log
    it). ``f`` stays continuous and non-decreasing in ``V``; the default cap 1e3 is reached at
    ``g ~= 0.999``.

    Args:
        cost: current cost ``V`` (a hard count: alive channels weighted by their cost).
        a: lower margin, below which the budget is comfortably met (``f = 0``).
        b: current budget, ``b > a``.
        cap: the largest value returned, > 0.
    """
    v = finite_real("cost", cost)
    a = finite_real("a", a)
    b = finite_real("b", b)
    cap = finite_real("cap", cap)
    if not a < b:
        raise ValueError(f"a must be < b, got a={a}, b={b}")
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    if v <= a:
        return BarrierValue(0.0, False)
    g = (v - a) / (b - a)
    if g >= 1.0:
        return BarrierValue(cap, True)
    value = g * g / (1.0 - g)
    if value >= cap:
        return BarrierValue(cap, True)
    return BarrierValue(value, False)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> Tensor:
    """Knowledge-distillation loss ``alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE``.

    ``p = softmax(logits / T)``; the KL is averaged over the batch, the cross-entropy (on the
    student's logits at temperature 1 against the integer ``targets``) is the batch mean.
    ``teacher_logits`` are detached: the teacher is frozen. Defaults T = 4, alpha = 0.9 (Lemaire et al. 2019, Sec. 3).

    Args:
        student_logits: ``(N, C)`` logits of the network being pruned.
        teacher_logits: ``(N, C)`` logits of the frozen unpruned network.
        targets: ``(N,)`` class indices.
        temperature: softmax temperature ``T`` > 0.
        alpha: weight of the distillation term, in [0, 1].
    """
    for name, value in (("student_logits", student_logits), ("teacher_logits", teacher_logits), ("targets", targets)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must have shape (N, C), got {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    if targets.shape != student_logits.shape[:1] or targets.is_floating_point() or targets.is_complex():
        raise ValueError(
            f"targets must be integer class indices of shape ({student_logits.shape[0]},), "
            f"got dtype {targets.dtype} and shape {tuple(targets.shape)}"
        )
    temp = finite_real("temperature", temperature)
    if temp <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    alpha = finite_real("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    ce = F.cross_entropy(student_logits, targets)
    if alpha == 0.0:
        return ce
    kl = F.kl_div(
        F.log_softmax(student_logits / temp, dim=1),
        F.log_softmax(teacher_logits.detach() / temp, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temp * temp * kl + (1.0 - alpha) * ce


class SigmoidalTransition:
    """The schedule ``t -> T(t, d)`` of :func:`sigmoidal_transition` with a fixed hardness ``d``
    (Lemaire et al. 2019, Sec. 3.4, supplementary eq. 1): a pure function of progress ``t`` in [0, 1]; ``t`` outside
    is clamped (before the transition: 0, after it: 1)."""

    def __init__(self, hardness: float = 10.0) -> None:
        self.hardness = finite_real("hardness", hardness)
        if self.hardness < 0:
            raise ValueError(f"hardness must be >= 0, got {hardness}")

    def __call__(self, t: float) -> float:
        return sigmoidal_transition(min(1.0, max(0.0, finite_real("t", t))), self.hardness)

    def __repr__(self) -> str:
        return f"SigmoidalTransition(hardness={self.hardness:g})"


@dataclass
class Budget:
    """A network's budget: everything the methods, the schedule and the final check read.

    Args:
        fraction: the fraction of the full cost to keep, in (0, 1] (``1 / factor``).
        cost: what is counted: ``"volume"``, ``"macs"`` or ``"params"``.
        full: the unpruned network's cost.
        floor: the cost with one channel left in every prunable group (no budget can go lower).
        schedule: ``None`` (the budget is the target from the start) or a function of progress
            ``t`` in [0, 1] giving the transition ``T(t)`` from the start budget to the target
            (:class:`SigmoidalTransition`); the current budget is
            ``(1 - T(t)) * start_factor * full + T(t) * target`` (``interpolation="linear"``) or
            ``(start_factor * full) ** (1 - T(t)) * target ** T(t)`` (``"geometric"``).
        start_factor: the start budget over the full cost (> 1; 1.01 in Lemaire et al. 2019).
        interpolation: ``"linear"`` (Lemaire et al. 2019) moves the budget by equal amounts of
            cost, so at a large factor most of the relative reduction comes at the end of the
            schedule (factor 32, hardness 10: from 1.36x the target to 1x in its last tenth);
            ``"geometric"`` moves it by equal ratios.
    """

    fraction: float
    cost: str
    full: float
    floor: int
    schedule: Callable[[float], float] | None = None
    start_factor: float = 1.01
    interpolation: str = "linear"

    INTERPOLATIONS = ("linear", "geometric")

    @classmethod
    def of(cls, fraction: float, cost: str, full: float, floor: int) -> Budget:
        """The budget, checked: ``ValueError`` when the target lies below the floor."""
        budget = cls(fraction, cost, float(full), int(floor))
        if floor > budget.target:
            raise ValueError(
                f"budget: {fraction:.4g} of the full {cost} ({full:,.0f}) is {budget.target:,.0f}, "
                f"below the {floor:,} that remains with one channel per prunable group (and every removable "
                "residual branch removed); raise the budget"
            )
        return budget

    @property
    def target(self) -> float:
        return self.fraction * self.full

    @contextlib.contextmanager
    def narrowed(self, fraction: float) -> Iterator[None]:
        """Temporarily a smaller target, ``fraction`` of the full cost (at most the budget's own
        fraction, at least the floor's), e.g. to choose masks again after a measurement showed
        the budget's prediction to be optimistic; the budget's own fraction is back on exit."""
        fraction = finite_real("fraction", fraction)
        if not self.floor / self.full <= fraction <= self.fraction:
            raise ValueError(f"fraction: a narrowed budget lies between the floor's {self.floor / self.full:.4g} "
                             f"and the budget's {self.fraction:.4g} of the full cost, got {fraction:.4g}")
        own = self.fraction
        self.fraction = fraction
        try:
            yield
        finally:
            self.fraction = own

    def anneal(self, schedule: Callable[[float], float], start_factor: float = 1.01, interpolation: str = "linear") -> None:
        """Move the budget from ``start_factor * full`` to the target along ``schedule``, by
        equal amounts (``interpolation="linear"``) or equal ratios (``"geometric"``) of cost."""
        if not callable(schedule):
            raise TypeError(f"schedule must be a function of progress in [0, 1], got {type(schedule).__name__}")
        self.schedule = schedule
        self.start_factor, self.interpolation = self.checked_annealing(start_factor, interpolation)

    @classmethod
    def checked_annealing(cls, start_factor: float, interpolation: str) -> tuple[float, str]:
        """``(start_factor, interpolation)`` of :meth:`anneal`, checked: ``TypeError`` /
        ``ValueError`` naming the argument."""
        start_factor = finite_real("start_factor", start_factor)
        if start_factor <= 1:
            raise ValueError(f"start_factor must be > 1 (the start budget lies just above the full cost), got {start_factor}")
        if interpolation not in cls.INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {cls.INTERPOLATIONS}, got {interpolation!r}")
        return start_factor, interpolation

    def current(self, t: float) -> float:
        """The budget ``b`` at progress ``t`` of the schedule (never below the target)."""
        if self.schedule is None:
            return self.target
        transition = self.schedule(t)
        start = self.start_factor * self.full
        if self.interpolation == "geometric":
            return max(self.target, start ** (1.0 - transition) * self.target ** transition)
        return max(self.target, (1.0 - transition) * start + transition * self.target)

    MARGINS_OF = ("target", "current")

    def barrier(self, cost: float, t: float, margin: float, cap: float = 1e3, margin_of: str = "target") -> BarrierValue:
        """The barrier ``f(V, a, b)`` with ``b`` the current budget and ``a = (1 - margin) * target``
        (``margin_of="target"``) or ``a = (1 - margin) * b`` (``margin_of="current"``: the band
        where ``f = 0`` moves down with the annealed budget, so the barrier pushes only while the
        network is above the schedule)."""
        if margin_of not in self.MARGINS_OF:
            raise ValueError(f"margin_of must be one of {self.MARGINS_OF}, got {margin_of!r}")
        b = self.current(t)
        return barrier(cost, (1.0 - margin) * (self.target if margin_of == "target" else b), b, cap)

    def check(self, cost: float, what: str = "the network") -> None:
        """``ValueError`` unless ``cost`` is at or under the target."""
        if cost > self.target:
            raise ValueError(
                f"{what} costs {self.cost} {cost:,.0f}, over the budget {self.target:,.0f} "
                f"({self.fraction:.4g} of {self.full:,.0f})"
            )
