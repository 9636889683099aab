"""Tests of lightning_prune.core.gates: Hard Concrete gates, Dirichlet switches, fixed masks."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Dirichlet, kl_divergence

from lightning_prune.core.gates import ChannelGate, DirichletSwitch, FixedMask, HardConcreteGate, dirichlet_kl

LN11 = math.log(11.0)


def _hc(log_alpha: list[float] | torch.Tensor, **kwargs) -> HardConcreteGate:
    values = torch.as_tensor(log_alpha, dtype=torch.float64)
    gate = HardConcreteGate(values.numel(), **kwargs).double()
    with torch.no_grad():
        gate.log_alpha.copy_(values)
    return gate


# ----------------------------------------------------------------------------- Hard Concrete


def test_hard_concrete_init_and_protocol():
    torch.manual_seed(0)
    gate = HardConcreteGate(1000)
    assert isinstance(gate, ChannelGate)
    assert gate.num_channels == 1000
    assert [n for n, _ in gate.named_parameters()] == ["log_alpha"]
    la = gate.log_alpha.detach()
    assert la.shape == (1000,)
    assert la.min() >= 0.0 and la.max() <= 0.01 and la.std() > 0  # U(0, 0.01): log_alpha, not alpha
    assert gate().shape == (1000,)
    assert gate.open_probability().shape == (1000,)
    assert gate.alive().dtype == torch.bool and gate.alive().all()


def test_hard_concrete_golden_deterministic_values():
    # z_hat = clamp(sigmoid(la) * 1.2 - 0.1, 0, 1): sigmoid(0) = 1/2 -> 0.5; sigmoid(ln 3) = 3/4 -> 0.8;
    # sigmoid(-ln 11) = 1/12 -> 0; sigmoid(ln 11) = 11/12 -> 1; far below/above clamp to 0/1.
    gate = _hc([0.0, math.log(3.0), -LN11, LN11, -10.0, 10.0]).eval()
    expected = torch.tensor([0.5, 0.8, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(gate(), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(gate.deterministic(), expected, atol=1e-12, rtol=0)


def test_hard_concrete_golden_open_probability():
    # P(z > 0) = sigmoid(la + (2/3) ln 11): 1/2 at la = -(2/3) ln 11, 3/4 at la = ln 3 - (2/3) ln 11,
    # and at la = 0: 1 / (1 + 11^(-2/3)).
    c = 2.0 / 3.0 * LN11
    gate = _hc([-c, math.log(3.0) - c, 0.0])
    expected = torch.tensor([0.5, 0.75, 1.0 / (1.0 + 11.0 ** (-2.0 / 3.0))], dtype=torch.float64)
    torch.testing.assert_close(gate.open_probability(), expected, atol=1e-12, rtol=0)
    assert expected[2].item() == pytest.approx(0.831822, abs=1e-6)


def test_hard_concrete_golden_samples_with_given_noise():
    # eps = 1/2 gives logit 0: z = sigmoid(la / beta) * 1.2 - 0.1. eps = 1/4, la = 0:
    # sigmoid(-1.5 ln 3) = 1 / (1 + 3^1.5), z = 1.2 / (1 + 3 sqrt 3) - 0.1.
    gate = _hc([0.0, 0.0, math.log(2.0) * 2.0 / 3.0])
    z = gate.sample(torch.tensor([0.5, 0.25, 0.5], dtype=torch.float64))
    expected = torch.tensor(
        [0.5, 1.2 / (1.0 + 3.0 * math.sqrt(3.0)) - 0.1, 1.2 * 2.0 / 3.0 - 0.1], dtype=torch.float64
    )
    torch.testing.assert_close(z, expected, atol=1e-12, rtol=0)


def test_hard_concrete_extreme_noise_is_finite_and_clamped():
    gate = _hc([0.0, 0.0])
    z = gate.sample(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert z.tolist() == [0.0, 1.0]
    (z.sum()).backward()
    assert torch.isfinite(gate.log_alpha.grad).all()


def test_hard_concrete_alive_threshold_is_minus_ln_11():
    gate = _hc([-LN11 - 1e-6, -LN11 + 1e-6, -3.0, -2.0])
    assert gate.log_alpha_threshold == pytest.approx(-LN11, abs=1e-12)
    assert gate.alive().tolist() == [False, True, False, True]
    # alive agrees with the eval gate being non-zero
    assert torch.equal(gate.alive(), gate.eval()() > 0)


def test_hard_concrete_samples_range_exact_zeros_ones_and_open_probability():
    torch.manual_seed(1)
    n = 20000
    for la in (0.0, -1.5, 1.0):
        gate = _hc([la] * n)
        z = gate.train()()
        assert z.min() == 0.0 and z.max() == 1.0  # exact zeros and ones occur
        assert ((z >= 0) & (z <= 1)).all()
        assert ((z > 0) & (z < 1)).any()
        p = gate.open_probability()[0].item()
        empirical = (z > 0).double().mean().item()
        assert abs(empirical - p) < 4 * math.sqrt(p * (1 - p) / n), (la, empirical, p)


def test_hard_concrete_training_samples_differ_eval_is_deterministic():
    torch.manual_seed(2)
    gate = HardConcreteGate(64)
    assert not torch.equal(gate(), gate())
    gate.eval()
    first = gate()
    assert torch.equal(first, gate())
    torch.testing.assert_close(first, gate.deterministic())


def test_hard_concrete_gradients_reach_log_alpha():
    torch.manual_seed(3)
    gate = HardConcreteGate(8)
    (gate().sum() + gate.open_probability().sum()).backward()
    assert gate.log_alpha.grad is not None and torch.isfinite(gate.log_alpha.grad).all()
    assert (gate.log_alpha.grad != 0).any()


def test_hard_concrete_to_fixed_mask():
    gate = _hc([-5.0, 0.0, -2.0, 3.0])
    mask = gate.to_fixed_mask()
    assert isinstance(mask, FixedMask)
    assert mask.alive().tolist() == [False, True, True, True]
    assert mask().tolist() == [0.0, 1.0, 1.0, 1.0]
    with torch.no_grad():
        gate.log_alpha.fill_(-10.0)  # the mask is a copy: later changes to the gate do not leak in
    assert mask.alive().tolist() == [False, True, True, True]


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"num_channels": 0}, ValueError, "num_channels"),
        ({"num_channels": 2.0}, TypeError, "num_channels"),
        ({"num_channels": True}, TypeError, "num_channels"),
        ({"num_channels": 3, "beta": 0.0}, ValueError, "beta"),
        ({"num_channels": 3, "gamma": 0.0}, ValueError, "gamma"),
        ({"num_channels": 3, "zeta": 1.0}, ValueError, "zeta"),
        ({"num_channels": 3, "zeta": float("nan")}, ValueError, "zeta"),
        ({"num_channels": 3, "beta": "2/3"}, TypeError, "beta"),
        ({"num_channels": 3, "init_log_alpha": (0.1, 0.0)}, ValueError, "init_log_alpha"),
        ({"num_channels": 3, "init_log_alpha": 0.0}, TypeError, "init_log_alpha"),
    ],
)
def test_hard_concrete_validation(kwargs, error, name):
    with pytest.raises(error, match=name):
        HardConcreteGate(**kwargs)


def test_hard_concrete_noise_validation():
    gate = HardConcreteGate(3)
    with pytest.raises(ValueError, match="noise"):
        gate.sample(torch.rand(4))
    with pytest.raises(TypeError, match="noise"):
        gate.sample([0.5, 0.5, 0.5])


# ----------------------------------------------------------------------------- Dirichlet


@pytest.mark.parametrize("k", [1, 3, 7, 10, 64, 100, 513])
@pytest.mark.parametrize("init", [1.0, 0.37, 25.0])
def test_uniform_switch_is_exactly_identity(k, init):
    for estimator in ("mean", "gamma"):
        switch = DirichletSwitch(k, estimator=estimator, init=init).eval()
        out = switch()
        assert out.shape == (k,)
        assert torch.equal(out, torch.ones(k))
    switch = DirichletSwitch(k, init=init).train()  # "mean" estimator: identity in training too
    assert torch.equal(switch(), torch.ones(k))
    torch.testing.assert_close(switch.concentration(), torch.full((k,), init))
    assert torch.equal(switch.open_probability(), torch.ones(k))


def test_switch_mean_multiplier_and_posterior_mean():
    switch = DirichletSwitch(4, alpha0=0.5).double()
    phi = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    with torch.no_grad():
        switch.theta.copy_(phi + torch.log(-torch.expm1(-phi)))  # inverse softplus
    torch.testing.assert_close(switch.concentration(), phi)
    torch.testing.assert_close(switch.posterior_mean(), phi / 10)
    torch.testing.assert_close(switch(), 4 * phi / 10)
    torch.testing.assert_close(switch.open_probability(), phi / 4)
    assert switch.alive().tolist() == [True] * 4
    assert switch.keep_top(2).tolist() == [False, False, True, True]
    assert switch.keep_top(0).tolist() == [False] * 4
    assert switch.to_fixed_mask().alive().all()  # a switch prunes nothing until a mask is chosen


def test_switch_keep_top_ties_lower_index_first():
    switch = DirichletSwitch(5)
    with torch.no_grad():
        switch.theta.copy_(torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0]))
    assert switch.keep_top(3).tolist() == [True, True, False, True, False]
    with pytest.raises(ValueError, match="k"):
        switch.keep_top(6)
    with pytest.raises(TypeError, match="k"):
        switch.keep_top(2.0)


def test_dirichlet_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(4)
    for k in (1, 2, 5, 33):
        for _ in range(5):
            phi = torch.rand(k, generator=gen, dtype=torch.float64) * 5 + 0.01
            alpha0 = float(torch.rand((), generator=gen, dtype=torch.float64)) * 2 + 0.01
            expected = kl_divergence(Dirichlet(phi), Dirichlet(torch.full((k,), alpha0, dtype=torch.float64)))
            torch.testing.assert_close(dirichlet_kl(phi, alpha0), expected, rtol=1e-10, atol=1e-10)


def test_dirichlet_kl_batched_and_zero_at_prior():
    phi = torch.tensor([[0.5, 0.5, 0.5], [1.0, 2.0, 3.0]], dtype=torch.float64)
    kl = dirichlet_kl(phi, 0.5)
    assert kl.shape == (2,)
    assert kl[0].item() == pytest.approx(0.0, abs=1e-12)
    assert kl[1].item() > 0


def test_switch_kl_divergence_and_its_gradient():
    torch.manual_seed(5)
    switch = DirichletSwitch(6, alpha0=0.3).double()
    with torch.no_grad():
        switch.theta.normal_()
    kl = switch.kl_divergence()
    expected = kl_divergence(Dirichlet(switch.concentration()), Dirichlet(torch.full((6,), 0.3, dtype=torch.float64)))
    torch.testing.assert_close(kl, expected)
    kl.backward()
    assert torch.isfinite(switch.theta.grad).all() and (switch.theta.grad != 0).any()


def test_gamma_estimator_sample_gradients_are_finite():
    torch.manual_seed(6)
    switch = DirichletSwitch(16, estimator="gamma", init=0.05).train()  # small phi: the hard regime
    weights = torch.randn(16)
    for _ in range(20):
        switch.zero_grad()
        out = switch()
        assert out.shape == (16,) and torch.isfinite(out).all() and (out >= 0).all()
        assert out.sum().item() == pytest.approx(16.0, rel=1e-5)
        (weights * out).sum().backward()
        assert torch.isfinite(switch.theta.grad).all()


def test_gamma_estimator_mean_and_gradient_converge_to_analytic():
    torch.manual_seed(7)
    k = 5
    switch = DirichletSwitch(k, estimator="gamma").double().train()
    phi = torch.tensor([0.5, 1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    with torch.no_grad():
        switch.theta.copy_(phi + torch.log(-torch.expm1(-phi)))
    mean = k * phi / phi.sum()
    # Var(K s_k) = K^2 m_k (1 - m_k) / (sum(phi) + 1) with m = phi / sum(phi)
    m = phi / phi.sum()
    std = k * torch.sqrt(m * (1 - m) / (phi.sum() + 1))
    errors = []
    for n in (100, 40000):
        samples = switch.rsample((n,))
        assert samples.shape == (n, k)
        err = (samples.detach().mean(0) - mean).abs()
        assert (err < 4 * std / math.sqrt(n)).all(), (n, err)
        errors.append(err.max().item())
    assert errors[1] < errors[0]

    # reparameterised gradient of E[w . K s] is unbiased: compare with the analytic mean's gradient
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
    switch.zero_grad()
    (switch.rsample((40000,)) @ weights).mean().backward()
    mc_grad = switch.theta.grad.clone()
    switch.zero_grad()
    (switch.eval()() @ weights).backward()
    torch.testing.assert_close(mc_grad, switch.theta.grad, rtol=0.02, atol=0.005)


def test_gamma_estimator_only_samples_in_training():
    torch.manual_seed(8)
    switch = DirichletSwitch(8, estimator="gamma")
    with torch.no_grad():
        switch.theta.normal_()
    assert not torch.equal(switch.train()(), switch())
    switch.eval()
    torch.testing.assert_close(switch(), 8 * switch.posterior_mean())
    assert torch.equal(switch(), switch())


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"num_channels": 0}, ValueError, "num_channels"),
        ({"num_channels": 3, "alpha0": 0.0}, ValueError, "alpha0"),
        ({"num_channels": 3, "alpha0": float("inf")}, ValueError, "alpha0"),
        ({"num_channels": 3, "estimator": "mc"}, ValueError, "estimator"),
        ({"num_channels": 3, "init": -1.0}, ValueError, "init"),
        ({"num_channels": 3, "init": None}, TypeError, "init"),
    ],
)
def test_switch_validation(kwargs, error, name):
    with pytest.raises(error, match=name):
        DirichletSwitch(**kwargs)


def test_dirichlet_kl_validation():
    with pytest.raises(ValueError, match="alpha0"):
        dirichlet_kl(torch.ones(3), 0.0)
    with pytest.raises(TypeError, match="phi"):
        dirichlet_kl([1.0, 2.0], 0.5)


# ----------------------------------------------------------------------------- fixed mask


def test_fixed_mask_protocol_and_state_dict():
    mask = FixedMask(torch.tensor([True, False, True]))
    assert mask.num_channels == 3
    assert list(mask.parameters()) == []
    assert mask().tolist() == [1.0, 0.0, 1.0] and mask().dtype == torch.float32
    assert mask.open_probability().tolist() == [1.0, 0.0, 1.0]
    assert mask.alive().tolist() == [True, False, True]
    assert mask.train()().tolist() == mask.eval()().tolist()
    # a checkpointed mask restores into a fresh one of the same size
    other = FixedMask(torch.ones(3, dtype=torch.bool))
    other.load_state_dict(mask.state_dict())
    assert other.alive().tolist() == [True, False, True]
    # all channels pruned is allowed (a branch that disappears)
    assert FixedMask(torch.zeros(2, dtype=torch.bool))().tolist() == [0.0, 0.0]


def test_fixed_mask_copies_its_input():
    source = torch.tensor([True, True])
    mask = FixedMask(source)
    source[0] = False
    assert mask.alive().tolist() == [True, True]


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ([True, False], TypeError),
        (torch.tensor([1.0, 0.0]), TypeError),
        (torch.ones(2, 2, dtype=torch.bool), ValueError),
        (torch.ones(0, dtype=torch.bool), ValueError),
    ],
)
def test_fixed_mask_validation(value, error):
    with pytest.raises(error, match="mask"):
        FixedMask(value)


def test_channel_gate_is_abstract():
    with pytest.raises(TypeError):
        ChannelGate(3)
