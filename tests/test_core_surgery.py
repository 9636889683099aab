"""Surgery (lightning_prune.core.surgery): masked == shrunk on the zoo, optimizer state sliced with the
weights, replayable history for checkpoints, clear errors."""

from __future__ import annotations

import functools
import io

import pytest
import torch
from torch import nn

from lightning_prune.classifier import ImageClassifier
from lightning_prune.core.gates import FixedMask
from lightning_prune.core.gating import attach_gates
from lightning_prune.core.surgery import enable_pruned_loading, pruning_history, replay, shrink
from tests.core_zoo import ZOO, one_thread, random_group_masks, zoo  # one_thread: autouse fixture


@pytest.mark.parametrize("name", list(ZOO))
def test_masked_equals_shrunk_in_eval_mode(name: str) -> None:
    model, graph, shape = zoo(name)
    x = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(0))
    masks = random_group_masks(graph, 7)
    with torch.no_grad():
        dense = model(x)
        gates = attach_gates(model, graph, {n: FixedMask(m) for n, m in masks.items()})
        masked = model(x)
        gates.detach()
        shrink(model, masks, graph=graph)
        shrunk = model(x)
    assert not torch.allclose(masked, dense, atol=1e-3)  # the masks change the function...
    torch.testing.assert_close(shrunk, masked, atol=1e-5, rtol=1e-5)  # ...exactly as removing the channels does


def _masks(graph, seed=5):
    return random_group_masks(graph, seed)


def test_sgd_momentum_is_sliced_and_training_continues() -> None:
    model, graph, shape = zoo("resnet20")
    model.train()
    frozen = model.layer1[0].bn1.weight
    frozen.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    x = torch.randn(4, *shape[1:])
    model(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        for p in model.parameters():
            if p in opt.state:
                opt.state[p]["momentum_buffer"] = 3 * p.detach().clone()  # known relation to the weights
    kept_alive = model(x).square().mean()  # a graph from before the shrink, still referenced
    shrink(model, _masks(graph), graph=graph, optimizer=opt)
    # the optimizer now holds exactly the model's (new) trainable parameters
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    assert not model.layer1[0].bn1.weight.requires_grad
    n_checked = 0
    for p in model.parameters():
        if p in opt.state:
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], 3 * p.detach())  # same indices as the weights
            n_checked += 1
    assert n_checked == sum(p.requires_grad for p in model.parameters())
    # one more step uses the sliced momentum: p <- p - lr * (0.9 * buf + grad)
    conv = model.layer2[0].conv1.weight
    before, buf = conv.detach().clone(), opt.state[conv]["momentum_buffer"].clone()
    opt.zero_grad()
    model(x).square().mean().backward()
    grad = conv.grad.clone()
    opt.step()
    torch.testing.assert_close(conv.detach(), before - 0.1 * (0.9 * buf + grad))
    del kept_alive


def test_adam_moments_are_sliced() -> None:
    model, graph, shape = zoo("mobilenet_v2")
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(2, *shape[1:])
    model(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        for p in model.parameters():
            opt.state[p]["exp_avg"] = 2 * p.detach().clone()
            opt.state[p]["exp_avg_sq"] = p.detach().square()
    steps = [opt.state[p]["step"].clone() for p in model.parameters()]
    shrink(model, _masks(graph), graph=graph, optimizer=[opt])
    for p, step in zip(model.parameters(), steps):  # parameter order is unchanged
        torch.testing.assert_close(opt.state[p]["exp_avg"], 2 * p.detach())
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], p.detach().square())
        assert torch.equal(opt.state[p]["step"], step)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()  # shapes agree: no error
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_history_replays_onto_a_fresh_instance() -> None:
    model, graph, shape = zoo("densenet121")
    graph2 = shrink(model, _masks(graph, 1), graph=graph)
    shrink(model, _masks(graph2, 2), graph=graph2)  # a second step, on the shrunk model
    history = pruning_history(model)
    assert len(history["steps"]) == 2 and history["input_shapes"] == [list(shape)]
    state = model.state_dict()
    assert state["lightning_prune_history._extra_state"] == history
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain data only

    fresh, _, _ = zoo("densenet121")
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(state)
    replay(fresh, history)
    fresh.load_state_dict(state)
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_checkpoint_of_a_lightning_module_with_a_shrunk_net_loads() -> None:
    net, graph, shape = zoo("resnet20")
    module = ImageClassifier(net, 10, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    shrink(module.net, _masks(graph), graph=graph)
    checkpoint = module.state_dict()
    fresh = ImageClassifier(zoo("resnet20")[0], 10, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    handle = enable_pruned_loading(fresh)
    fresh.load_state_dict(checkpoint)  # replays the history on fresh.net, then loads the tensors
    fresh.load_state_dict(checkpoint)  # already replayed: a second load is a plain load
    handle.remove()
    x = torch.randn(2, *shape[1:])
    module.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), module(x))
    assert pruning_history(fresh.net) == pruning_history(module.net)


def test_errors() -> None:
    model, graph, shape = zoo("lenet5")
    empty = {"features.2": torch.zeros(50, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"keeps no channel of group 'features.2'; keep at least one channel"):
        shrink(model, empty, graph=graph)
    with pytest.raises(ValueError, match="needs graph= .* or example_input="):
        shrink(model, {})
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        shrink(model, {}, graph=graph, optimizer="sgd")
    gates = attach_gates(model, graph, {"features.0": FixedMask(torch.ones(20, dtype=torch.bool))})
    with pytest.raises(ValueError, match="model has gates attached"):
        shrink(model, {}, graph=graph)
    gates.detach()
    new_graph = shrink(model, {"features.0": torch.arange(20) < 10}, graph=graph)
    with pytest.raises(ValueError, match="graph is stale"):
        shrink(model, {}, graph=graph)
    assert new_graph["features.0"].size == 10
    history = pruning_history(model)
    other, _, _ = zoo("lenet5")
    shrink(other, {"features.0": torch.arange(20) >= 10}, example_input=torch.zeros(shape))
    with pytest.raises(ValueError, match="not a prefix of history"):
        replay(other, history)
    bad = dict(history, steps=[{"nope": [0]}])
    with pytest.raises(ValueError, match="step 0: the model has no channel group 'nope'"):
        replay(zoo("lenet5")[0], bad)
    with pytest.raises(ValueError, match="history must be a pruning history"):
        replay(zoo("lenet5")[0], {"steps": []})
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        shrink(nn.Linear(2, 2).weight, {})  # type: ignore[arg-type]
