"""The pruning session and each method's strategy in plain PyTorch, without a Trainer: the
barrier, the budget schedule, the choice of keep-masks, a whole soft -> hard -> shrunk loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_prune.core.budget import Budget, SigmoidalTransition
from lightning_prune.core.cost import count_cost
from lightning_prune.core.session import PruningSession, session_of
from lightning_prune.methods import BarrierPenalty, DirichletSwitches, RandomChoice
from tests.bar_helpers import TINY, TinyCNN, tiny_loader


def set_current_budget(session: PruningSession, b: float) -> None:
    """Anneal the session's budget with a constant schedule that puts it at ``b``."""
    budget = session.budget
    start = budget.start_factor * budget.full
    budget.anneal(lambda t: (start - b) / (start - budget.target), budget.start_factor)
    assert budget.current(0.3) == pytest.approx(b, rel=1e-12)


def traced(method, **kwargs) -> PruningSession:
    torch.manual_seed(0)
    session = PruningSession(TinyCNN(), method, **{"factor": 2, "cost": "volume", **kwargs})
    session.trace(torch.zeros(1, *TINY))
    return session


def test_penalty_matches_hand_computed_barrier_and_expected_cost():
    session = PruningSession(TinyCNN(), BarrierPenalty(lambda_=0.5, margin=0.05), factor=2, cost="volume")
    session.trace(torch.zeros(1, *TINY))
    bar = session.method
    # volume per sample: conv1 8 maps of 8x8, conv2 12 maps of 4x4, head 4 outputs
    assert session.budget.full == 64 * 8 + 16 * 12 + 4 == 708
    with torch.no_grad():
        session.gates["conv1"].log_alpha.fill_(0.0)
        session.gates["conv2"].log_alpha.copy_(torch.tensor([0.0] * 6 + [-5.0] * 6))
    p_open = lambda la: 1 / (1 + math.exp(-(la - (2 / 3) * math.log(0.1 / 1.1))))
    expected = 64 * 8 * p_open(0) + 16 * (6 * p_open(0) + 6 * p_open(-5)) + 4
    v = 64 * 8 + 16 * 6 + 4  # z_hat(0) = 0.5 > 0 is alive, z_hat(-5) < 0 is not
    target = 708 / 2
    a = 0.95 * target
    set_current_budget(session, 700.0)
    g = (v - a) / (700.0 - a)
    value = bar.regularizer(session)
    assert bar.last["V"] == v
    assert bar.last["expected_V"] == pytest.approx(expected, rel=1e-6)
    assert bar.last["f"] == pytest.approx(g * g / (1 - g), rel=1e-9)
    assert float(value) == pytest.approx(0.5 * g * g / (1 - g) * expected / 708, rel=1e-6)
    # penalty="channels": L_S is the expected share of open channels; f still from the cost
    bar.penalty = "channels"
    channels = (8 * p_open(0) + 6 * p_open(0) + 6 * p_open(-5)) / 20
    assert float(bar.regularizer(session)) == pytest.approx(0.5 * g * g / (1 - g) * channels, rel=1e-6)
    assert bar.last["L_S"] == pytest.approx(channels, rel=1e-6) and bar.last["V"] == v
    bar.penalty = "cost"
    # at or over the budget the barrier is capped, counted and still finite
    set_current_budget(session, 600.0)
    value = bar.regularizer(session)
    assert math.isfinite(float(value)) and bar.last["f"] == 1e3 and bar.capped_steps == 1
    # under the margin there is no penalty at all
    with torch.no_grad():
        session.gates["conv1"].log_alpha.fill_(-5.0)
        session.gates["conv1"].log_alpha[0] = 0.0
    assert bar.regularizer(session) is None and bar.last["f"] == 0.0



@pytest.mark.parametrize("power", [0.0, 0.5, 1.0, 2.0])
def test_cost_power_spreads_the_cost_penalty_push_by_marginal_cost_to_the_power(power):
    """The push on each gate is its marginal cost to ``cost_power``, and the pushes sum to the
    expected cost's (p = 1: the expected cost's own gradient; p = 0: every gate alike)."""
    session = traced(BarrierPenalty(cost_power=power), cost="macs")
    probs = {n: torch.linspace(0.3, 0.9, p.numel()).requires_grad_(True) for n, p in session.gates.open_probabilities().items()}
    marginal = session.cost_model.channel_weights("macs", probs)
    surrogate = session.method._powered_cost(session, probs) if power != 1.0 else session.cost_model.expected(probs, "macs")
    grads = torch.autograd.grad(surrogate, list(probs.values()))
    push = torch.cat([g.double() for g in grads])
    m = torch.cat([marginal[n] for n in probs])
    assert float(push.sum()) == pytest.approx(float(m.sum()), rel=1e-6)
    torch.testing.assert_close(push / push.sum(), m**power / (m**power).sum())
    if power == 0.0:
        assert torch.allclose(push, push[:1].expand_as(push))
    # the regularizer uses it: lambda * f * surrogate / full
    set_current_budget(session, session.budget.full * 0.99)
    value = session.method.regularizer(session)
    assert value is not None and bar_l_s_matches(session)


def bar_l_s_matches(session: PruningSession) -> bool:
    bar = session.method
    probs = session.gates.open_probabilities()
    l_s = (bar._powered_cost(session, probs) if bar.cost_power != 1.0 else session.cost_model.expected(probs, "macs")) / session.budget.full
    return bar.last["L_S"] == pytest.approx(float(l_s), rel=1e-6)


def test_cost_power_is_checked():
    with pytest.raises(ValueError, match="cost_power must be in"):
        BarrierPenalty(cost_power=3.5)
    with pytest.raises(ValueError, match="cost_power must be in"):
        BarrierPenalty(cost_power=-0.5)
    with pytest.raises(ValueError, match="cost_power: only penalty='cost'"):
        BarrierPenalty(penalty="channels", cost_power=0.5)


def test_budget_schedule_and_final_check_golden_values() -> None:
    budget = Budget.of(0.25, "macs", 1000.0, 10)
    assert budget.target == 250.0 and budget.current(0.0) == 250.0  # no schedule: the target from the start
    budget.anneal(SigmoidalTransition(10.0))
    assert budget.current(0.0) == pytest.approx(1010.0)
    assert budget.current(0.5) == pytest.approx((1010.0 + 250.0) / 2)
    assert budget.current(1.0) == pytest.approx(250.0)
    # T(0.25, 10) = (tanh(-1.25) + tanh(2.5)) / (2 tanh(2.5))
    t = (math.tanh(-1.25) + math.tanh(2.5)) / (2 * math.tanh(2.5))
    assert budget.current(0.25) == pytest.approx((1 - t) * 1010.0 + t * 250.0, rel=1e-12)
    f = budget.barrier(600.0, 0.5, margin=0.05)  # a = 237.5, b = 630
    g = (600.0 - 237.5) / (630.0 - 237.5)
    assert f.value == pytest.approx(g * g / (1 - g)) and not f.capped
    assert budget.barrier(700.0, 0.5, margin=0.05).capped
    # margin_of="current": a = 0.95 b = 598.5, so 598 is inside the band and 610 is not
    assert budget.barrier(598.0, 0.5, margin=0.05, margin_of="current").value == 0.0
    g = (610.0 - 598.5) / (630.0 - 598.5)
    assert budget.barrier(610.0, 0.5, margin=0.05, margin_of="current").value == pytest.approx(g * g / (1 - g))
    with pytest.raises(ValueError, match="margin_of must be one of"):
        budget.barrier(600.0, 0.5, margin=0.05, margin_of="final")
    budget.check(250)
    with pytest.raises(ValueError, match="costs macs 251, over the budget 250"):
        budget.check(251)
    with pytest.raises(ValueError, match="below the 300 that remains with one channel per prunable group"):
        Budget.of(0.25, "macs", 1000.0, 300)


def test_bar_repairs_alive_channels_over_the_budget_least_open_first() -> None:
    session = traced(BarrierPenalty(), factor=4)
    with torch.no_grad():
        session.gates["conv1"].log_alpha.copy_(torch.linspace(-1.0, 3.0, 8))  # all alive, increasingly open
        session.gates["conv2"].log_alpha.fill_(2.0)
    masks = session.keep_masks()
    assert session.cost_model.exact(masks, "volume") <= session.budget.target
    assert session.method.dropped  # the alive channels were over the budget
    kept1 = masks["conv1"].nonzero().flatten().tolist()
    assert kept1 == list(range(8 - len(kept1), 8))  # the most open conv1 channels stay
    # least open first, whatever it saves: conv1 0-5 (log_alpha <= 1.86), then ten conv2 maps (2.0);
    # conv1 6 and 7 (2.43, 3.0; 64 each) stay although four conv2 maps would save as much
    assert kept1 == [6, 7] and int(masks["conv2"].sum()) == 2


def test_bar_repair_by_share_thins_every_layer_where_least_open_empties_one() -> None:
    """Every alive gate open, conv2's a little less than conv1's; the volume budget (factor 4:
    177 of 708; conv1 maps 64, conv2 maps 16, head 4) needs most of them gone."""
    widths = {}
    for repair in ("least_open", "share"):
        session = traced(BarrierPenalty(repair=repair, fill=False), factor=4)
        with torch.no_grad():
            session.gates["conv1"].log_alpha.fill_(2.0)
            session.gates["conv2"].log_alpha.fill_(1.9)
        masks = session.keep_masks()
        assert session.cost_model.exact(masks, "volume") <= session.budget.target == 177
        widths[repair] = (int(masks["conv1"].sum()), int(masks["conv2"].sum()))
    # least open first: conv2 down to one map (8*64 + 16 + 4 = 532 still over), then conv1 to 2 (148)
    assert widths["least_open"] == (2, 1)
    # share: equal open probabilities within a layer, so dropping one of k channels costs log(k / (k-1)),
    # divided by the volume it saves: conv1 8 -> 3 (log(4/3)/64 = 0.0045 < log(12/11)/16 = 0.0054),
    # conv2 12 -> 10, conv1 -> 2, conv2 -> 6 (log(6/5)/16 = 0.0114 > log(2)/64 = 0.0108), conv1 -> 1: 164
    assert widths["share"] == (1, 6)
    with pytest.raises(ValueError, match="repair must be one of"):
        BarrierPenalty(repair="cheapest")


def test_bar_spends_what_the_soft_phase_left_of_the_budget_on_the_most_open_closed_channels() -> None:
    for fill in (True, False):
        session = traced(BarrierPenalty(fill=fill), factor=4)  # volume: conv1 maps 64, conv2 maps 16, head 4; target 177
        with torch.no_grad():
            session.gates["conv1"].log_alpha.copy_(torch.tensor([2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0]))
            session.gates["conv2"].log_alpha.copy_(torch.tensor([2.0, 2.0, -2.5] + [-10.0] * 9))
        assert session.current_cost() == 64 + 2 * 16 + 4  # alive: conv1 0, conv2 0 and 1
        masks = session.keep_masks()
        kept = {n: m.nonzero().flatten().tolist() for n, m in masks.items()}
        if fill:  # conv2[2] is the most open closed channel; conv1[1] (64) no longer fits; then the other conv2 maps
            assert kept["conv1"] == [0] and kept["conv2"] == [0, 1, 2, 3, 4, 5]
            assert session.cost_model.exact(masks, "volume") == 64 + 6 * 16 + 4 <= session.budget.target
            assert session.method.refilled == {"conv2": [2, 3, 4, 5]}
        else:
            assert kept["conv1"] == [0] and kept["conv2"] == [0, 1] and session.method.refilled == {}


def test_random_choice_is_seeded_and_stops_at_the_budget() -> None:
    first = traced(RandomChoice(seed=3), factor=3).keep_masks()
    again = traced(RandomChoice(seed=3), factor=3).keep_masks()
    other = traced(RandomChoice(seed=4), factor=3).keep_masks()
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_dirichlet_allocation_follows_the_importance() -> None:
    session = traced(DirichletSwitches(kl_scale=0.1), factor=3, cost="macs")
    method = session.method
    method.learn(session)  # every switch acts
    with torch.no_grad():
        session.gates["conv1"].theta.copy_(torch.tensor([5.0, 5.0, 5.0, 5.0, 0.1, 0.1, 0.1, 0.1]).log())
    scores = method.scores(session)["conv1"]
    assert scores[:4].min() > scores[4:].max()  # the first half of conv1 matters more
    masks = session.keep_masks()
    assert session.cost_model.exact(masks, "macs") <= session.budget.target
    kept, dropped = scores[masks["conv1"]], scores[~masks["conv1"]]
    assert len(dropped) and kept.min() >= dropped.max()  # within a group: by importance
    kl = sum(session.gates[n].kl_divergence() for n in ("conv1", "conv2"))
    assert float(method.regularizer(session)) == pytest.approx(0.1 * float(kl), rel=1e-6)
    method.learn(session, ())
    assert method.regularizer(session) is None


def test_a_plain_pytorch_loop_prunes_under_the_budget() -> None:
    torch.manual_seed(0)
    net = TinyCNN()
    session = PruningSession(net, BarrierPenalty(lambda_=0.1, gate_lr=0.05), factor=3, cost="macs")
    assert session_of(net) is session and session.phase == "pending"
    session.trace(torch.zeros(1, *TINY))
    session.budget.anneal(SigmoidalTransition(5.0))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    steps = 0
    for epoch in range(3):
        for x, y in tiny_loader(16, n=128, shuffle=True):
            session.set_progress(steps / 16)
            F.cross_entropy(net(x), y).backward()
            assert session.gate_step()
            opt.step()
            opt.zero_grad()
            steps += 1
    masks = session.keep_masks()
    net.eval()
    x = torch.randn(4, *TINY)
    with torch.no_grad():
        from lightning_prune.core.gates import FixedMask
        from lightning_prune.core.gating import attach_gates

        session.gates.detach()
        probe = attach_gates(net, session.graph, {n: FixedMask(m) for n, m in masks.items()})
        masked = net(x)
        probe.detach()
        session._attach(session.method.make_gate)  # back to a soft session to harden it
    session.harden(masks, optimizers=[opt])
    assert session.phase == "hard" and session.gates is None
    macs = count_cost(net, x[:1]).macs
    assert macs <= session.budget.target == pytest.approx(session.budget.full / 3)
    with torch.no_grad():
        torch.testing.assert_close(net(x), masked, atol=1e-5, rtol=1e-5)
    for p in net.parameters():  # the optimizer follows the shrunk parameters
        assert p in opt.state and opt.state[p]["momentum_buffer"].shape == p.shape
    session.close()
    assert session_of(net) is None


def test_session_state_round_trip_and_errors() -> None:
    session = traced(BarrierPenalty(), factor=2)
    session.set_progress(0.4)
    session.method.capped_steps = 3
    state = session.state_dict()
    other = traced(BarrierPenalty(), factor=2)
    other.load_state_dict(state)
    assert other.progress == 0.4 and other.method.capped_steps == 3
    with pytest.raises(TypeError, match="method must be a lightning_prune.core.method.Method"):
        PruningSession(TinyCNN(), "bar", factor=2)
    with pytest.raises(ValueError, match="cost must be one of"):
        PruningSession(TinyCNN(), BarrierPenalty(), factor=2, cost="flops")
    net = TinyCNN()
    PruningSession(net, BarrierPenalty(), factor=2)
    with pytest.raises(ValueError, match="already has a pruning session"):
        PruningSession(net, RandomChoice(), factor=2)
    with pytest.raises(RuntimeError, match="is pending, not in the soft phase"):
        PruningSession(TinyCNN(), BarrierPenalty(), factor=2).keep_masks()


def test_bar_gate_optimizer_choice() -> None:
    assert isinstance(traced(BarrierPenalty()).optimizer, torch.optim.Adam)
    sgd = traced(BarrierPenalty(gate_optimizer="sgd", gate_lr=0.5)).optimizer
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["lr"] == 0.5 and sgd.defaults["momentum"] == 0.9
    with pytest.raises(ValueError, match="gate_optimizer must be one of"):
        BarrierPenalty(gate_optimizer="rmsprop")
    opened = traced(BarrierPenalty(init_log_alpha=3.0)).gates.open_probabilities()
    assert all(bool((p > 0.99).all()) for p in opened.values())  # starts from (almost) the trained network
