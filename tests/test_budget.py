"""Tests of lightning_prune.core.budget: transition schedule, barrier, budget/factor, distillation loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from lightning_prune.core.budget import (
    BarrierValue,
    Budget,
    barrier,
    budget_at,
    distillation_loss,
    finite_real,
    resolve_budget,
    sigmoidal_transition,
)


def _paper_transition(t: float, d: float) -> float:
    """Lemaire et al. 2019, supplementary eq. (1), written literally (independent of the implementation's tanh form)."""
    sigmoid = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    delta = sigmoid(-0.5 * d)
    return (sigmoid(d * (t - 0.5)) - delta) / (1.0 - 2.0 * delta)


# ----------------------------------------------------------------------------- transition


@pytest.mark.parametrize("d", [1e-6, 0.1, 1.0, 10.0, 50.0, 1e4])
def test_transition_golden_endpoints_and_midpoint(d):
    assert sigmoidal_transition(0.0, d) == 0.0
    assert sigmoidal_transition(0.5, d) == 0.5
    assert sigmoidal_transition(1.0, d) == 1.0


def test_transition_golden_values():
    # d = 10, t = 0.25: (sigmoid(-2.5) - sigmoid(-5)) / (1 - 2 sigmoid(-5)) = 0.0701037...
    assert sigmoidal_transition(0.25) == pytest.approx(0.0701037, abs=1e-7)
    assert sigmoidal_transition(0.75) == pytest.approx(1 - 0.0701037, abs=1e-7)
    for d in (0.5, 3.0, 10.0, 30.0):
        for t in (0.0, 0.1, 0.3, 0.45, 0.6, 0.9, 1.0):
            assert sigmoidal_transition(t, d) == pytest.approx(_paper_transition(t, d), abs=1e-12)


def test_transition_symmetric_and_monotone():
    grid = [i / 200 for i in range(201)]
    for d in (0.01, 2.0, 10.0, 100.0):
        values = [sigmoidal_transition(t, d) for t in grid]
        assert all(b >= a for a, b in zip(values, values[1:]))
        assert values[-1] > values[0]
        for t, v in zip(grid, values):
            assert sigmoidal_transition(1.0 - t, d) == pytest.approx(1.0 - v, abs=1e-12)


def test_transition_small_hardness_is_linear():
    for t in (0.0, 0.1, 0.33, 0.5, 0.9, 1.0):
        assert sigmoidal_transition(t, 0.0) == t
        assert sigmoidal_transition(t, 1e-12) == t
        # just above the fallback threshold the exact formula is still linear to ~1e-16
        assert sigmoidal_transition(t, 2e-8) == pytest.approx(t, abs=1e-14)
        assert sigmoidal_transition(t, 1e-3) == pytest.approx(t, abs=1e-7)


def test_transition_large_hardness_is_a_step():
    assert sigmoidal_transition(0.45, 1e3) < 1e-20
    assert sigmoidal_transition(0.55, 1e3) > 1 - 1e-15
    assert sigmoidal_transition(0.3, 1e6) == 0.0


@pytest.mark.parametrize(
    ("t", "hardness", "error", "name"),
    [
        (-0.01, 10.0, ValueError, "t must"),
        (1.01, 10.0, ValueError, "t must"),
        (float("nan"), 10.0, ValueError, "t must"),
        (True, 10.0, TypeError, "t must"),
        ("0.5", 10.0, TypeError, "t must"),
        (0.5, -1.0, ValueError, "hardness"),
        (0.5, float("inf"), ValueError, "hardness"),
    ],
)
def test_transition_validation(t, hardness, error, name):
    with pytest.raises(error, match=name):
        sigmoidal_transition(t, hardness)


def test_budget_at_interpolates_along_the_transition():
    assert budget_at(0.0, start=101.0, target=12.5) == 101.0
    assert budget_at(1.0, start=101.0, target=12.5) == 12.5
    assert budget_at(0.5, start=100.0, target=20.0) == pytest.approx(60.0)
    assert budget_at(0.25, 100.0, 20.0) == pytest.approx(100.0 - 80.0 * 0.0701037, abs=1e-5)
    assert budget_at(0.25, 100.0, 20.0, hardness=0.0) == pytest.approx(80.0)
    with pytest.raises(ValueError, match="start"):
        budget_at(0.5, float("nan"), 1.0)
    with pytest.raises(TypeError, match="target"):
        budget_at(0.5, 1.0, None)


# ----------------------------------------------------------------------------- barrier


def test_barrier_golden_values():
    # a = 2, b = 6: g = (V - 2) / 4; f = g^2 / (1 - g)
    assert barrier(1.0, 2.0, 6.0) == BarrierValue(0.0, False)
    assert barrier(2.0, 2.0, 6.0) == BarrierValue(0.0, False)
    assert barrier(3.0, 2.0, 6.0).value == pytest.approx(1.0 / 12.0)  # g = 1/4
    assert barrier(4.0, 2.0, 6.0).value == pytest.approx(0.5)  # g = 1/2
    assert barrier(5.0, 2.0, 6.0) == BarrierValue(pytest.approx(2.25), False)  # g = 3/4


def test_barrier_is_finite_and_capped_at_and_beyond_b():
    for v in (6.0, 6.0 + 1e-9, 100.0, 1e300):
        result = barrier(v, 2.0, 6.0)
        assert result == BarrierValue(1e3, True)
    near = barrier(6.0 - 1e-9, 2.0, 6.0)  # g^2 / (1 - g) ~ 4e9 would exceed the cap
    assert near == BarrierValue(1e3, True)
    assert barrier(5.8, 2.0, 6.0, cap=10.0) == BarrierValue(10.0, True)  # f(0.95) = 18.05 > 10
    assert barrier(5.6, 2.0, 6.0, cap=10.0) == BarrierValue(pytest.approx(8.1), False)  # f(0.9) = 8.1


def test_barrier_monotone_and_continuous_into_the_cap():
    volumes = [2.0 + 4.0 * i / 10000 for i in range(10001)] + [7.0]
    values = [barrier(v, 2.0, 6.0, cap=50.0).value for v in volumes]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert max(b - a for a, b in zip(values, values[1:])) < 1.0  # no jump at the cap
    assert values[-1] == 50.0


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "name"),
    [
        ((1.0, 6.0, 6.0), {}, ValueError, "a must be < b"),
        ((1.0, 7.0, 6.0), {}, ValueError, "a must be < b"),
        ((1.0, 2.0, 6.0), {"cap": 0.0}, ValueError, "cap"),
        ((float("nan"), 2.0, 6.0), {}, ValueError, "cost"),
        ((1.0, None, 6.0), {}, TypeError, "a must"),
        ((1.0, 2.0, float("inf")), {}, ValueError, "b must"),
    ],
)
def test_barrier_validation(args, kwargs, error, name):
    with pytest.raises(error, match=name):
        barrier(*args, **kwargs)


# ----------------------------------------------------------------------------- budget / factor


def test_resolve_budget_values():
    assert resolve_budget(budget=0.25) == 0.25
    assert resolve_budget(budget=1) == 1.0
    assert resolve_budget(factor=4) == 0.25
    assert resolve_budget(factor=1.0) == 1.0
    assert resolve_budget(factor=16) == 1 / 16
    assert resolve_budget(budget=0.5, factor=None) == 0.5


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({}, ValueError, "got neither"),
        ({"budget": 0.5, "factor": 2.0}, ValueError, "not both"),
        ({"budget": 0.0}, ValueError, "budget must"),
        ({"budget": -0.5}, ValueError, "budget must"),
        ({"budget": 1.5}, ValueError, "budget must"),
        ({"budget": float("nan")}, ValueError, "budget must"),
        ({"budget": "0.5"}, TypeError, "budget must"),
        ({"factor": 0.5}, ValueError, "factor must"),
        ({"factor": 0.0}, ValueError, "factor must"),
        ({"factor": float("inf")}, ValueError, "factor must"),
        ({"factor": True}, TypeError, "factor must"),
    ],
)
def test_resolve_budget_validation(kwargs, error, name):
    with pytest.raises(error, match=name):
        resolve_budget(**kwargs)


def test_finite_real():
    assert finite_real("x", 3) == 3.0 and isinstance(finite_real("x", 3), float)
    with pytest.raises(ValueError, match="x must be finite"):
        finite_real("x", float("-inf"))
    with pytest.raises(TypeError, match="x must be a real number"):
        finite_real("x", torch.tensor(1.0))


def test_a_narrowed_budget_is_a_smaller_target_until_the_block_ends():
    budget = Budget.of(0.5, "macs", 1000, 100)
    with budget.narrowed(0.3):
        assert budget.target == 300.0
    assert budget.fraction == 0.5 and budget.target == 500.0
    with pytest.raises(RuntimeError), budget.narrowed(0.2):
        raise RuntimeError("the caller failed")
    assert budget.fraction == 0.5  # back even when the block raised
    for outside in (0.6, 0.05):  # above the budget, below the floor's 0.1
        with pytest.raises(ValueError, match="fraction: a narrowed budget lies between the floor's 0.1 and the budget's 0.5"):
            with budget.narrowed(outside):
                pass


# ----------------------------------------------------------------------------- distillation


def test_distillation_alpha_zero_is_cross_entropy():
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    targets = torch.randint(0, 10, (8,))
    loss = distillation_loss(student, teacher, targets, alpha=0.0)
    assert torch.equal(loss, F.cross_entropy(student, targets))


def test_distillation_golden_value():
    # T = 2: teacher logits [2 ln 3, 0] -> softmax(logits / 2) = [3/4, 1/4]; student [0, 0] -> [1/2, 1/2].
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2); CE(target 0) = ln 2; loss = 0.5 * 2^2 * KL + 0.5 * ln 2.
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    expected = 0.5 * 4.0 * kl + 0.5 * math.log(2.0)
    student = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[2 * math.log(3.0), 0.0]] * 2, dtype=torch.float64, requires_grad=True)
    loss = distillation_loss(student, teacher, torch.tensor([0, 0]), temperature=2.0, alpha=0.5)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.608198, abs=1e-6)
    loss.backward()
    assert teacher.grad is None  # the teacher is frozen
    assert student.grad is not None and (student.grad != 0).any()


def test_distillation_alpha_one_is_scaled_kl_and_zero_for_equal_logits():
    torch.manual_seed(1)
    logits = torch.randn(4, 5)
    targets = torch.randint(0, 5, (4,))
    assert distillation_loss(logits, logits.clone(), targets, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)
    teacher = torch.randn(4, 5)
    p_t = F.softmax(teacher / 4.0, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(logits / 4.0, dim=1))).sum(1).mean()
    torch.testing.assert_close(distillation_loss(logits, teacher, targets, alpha=1.0), 16.0 * kl)


_Z, _T = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)


@pytest.mark.parametrize(
    ("student", "teacher", "targets", "kwargs", "error", "name"),
    [
        (_Z, torch.zeros(2, 4), _T, {}, ValueError, "teacher_logits"),
        (torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), _T, {}, ValueError, "student_logits"),
        (_Z, _Z, torch.zeros(2), {}, ValueError, "targets"),
        (_Z, _Z, torch.zeros(3, dtype=torch.long), {}, ValueError, "targets"),
        (_Z, _Z, [0, 1], {}, TypeError, "targets"),
        ("logits", _Z, _T, {}, TypeError, "student_logits"),
        (_Z, _Z, _T, {"temperature": 0.0}, ValueError, "temperature"),
        (_Z, _Z, _T, {"alpha": 1.5}, ValueError, "alpha"),
    ],
)
def test_distillation_validation(student, teacher, targets, kwargs, error, name):
    with pytest.raises(error, match=name):
        distillation_loss(student, teacher, targets, **kwargs)
