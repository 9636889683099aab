"""Gates on channel groups (lightning_prune.core.gating): one sample per forward, registration under a
LightningModule (checkpoints, optimizer, DDP), detaching, clear errors."""

from __future__ import annotations

import copy
import functools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from lightning_prune.classifier import ImageClassifier
from lightning_prune.core.gates import ChannelGate, DirichletSwitch, FixedMask, HardConcreteGate
from lightning_prune.core.gating import GateSet, attach_gates, attached_gates
from lightning_prune.core.trace import build_graph
from tests.core_zoo import one_thread, random_group_masks, zoo  # one_thread: autouse fixture


class CountingGate(ChannelGate):
    """Returns a fresh random vector on every call and counts the calls."""

    def __init__(self, num_channels: int) -> None:
        super().__init__(num_channels)
        self.calls = 0

    def forward(self) -> Tensor:
        self.calls += 1
        return torch.rand(self.num_channels)

    def open_probability(self) -> Tensor:
        return torch.ones(self.num_channels)

    def alive(self) -> Tensor:
        return torch.ones(self.num_channels, dtype=torch.bool)


def test_one_sample_per_forward() -> None:
    model, graph, shape = zoo("resnet20")
    gates = attach_gates(model, graph, lambda group: CountingGate(group.size))
    assert len(graph["conv1"].gate_sites) == 4  # the residual stream is gated at four layers...
    with torch.no_grad():
        model(torch.randn(2, *shape[1:]))
        model(torch.randn(2, *shape[1:]))
    assert [gate.calls for _, gate in gates.items()] == [2] * len(graph)  # ...but sampled once per forward
    gates.detach()


def test_sites_of_a_group_use_the_same_values() -> None:
    model, graph, shape = zoo("resnet20")
    values = {}

    class Recording(CountingGate):
        def forward(self) -> Tensor:
            v = super().forward()
            values.setdefault(self.num_channels, []).append(v)
            return v

    gates = attach_gates(model, graph, {"conv1": Recording(16)})
    modules = dict(model.named_modules())
    out_by_site = {}
    inputs_by_site = {}
    for s in graph["conv1"].gate_sites:
        modules[s].register_forward_hook(lambda m, i, o, s=s: out_by_site.__setitem__(s, o.clone()))
        modules[s].register_forward_pre_hook(lambda m, i, s=s: inputs_by_site.__setitem__(s, i[0]))
    with torch.no_grad():
        model(torch.randn(1, *shape[1:]))
    (z,) = values[16]
    for s in graph["conv1"].gate_sites:
        bn = modules[s]
        expected = nn.functional.batch_norm(
            inputs_by_site[s], bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        ) * z.view(1, -1, 1, 1)
        torch.testing.assert_close(out_by_site[s], expected)
    gates.detach()


def test_registered_under_a_lightning_module() -> None:
    net, graph, shape = zoo("lenet5")
    module = ImageClassifier(net, 10, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    gates = attach_gates(net, graph, lambda group: HardConcreteGate(group.size), owner=module)
    assert attached_gates(net) is gates and module.prune_gates is gates
    keys = [k for k in module.state_dict() if k.startswith("prune_gates.")]
    assert keys == [
        "prune_gates._extra_state",  # the example input's shapes: a checkpoint can rebuild the graph
        "prune_gates.gates.features/0.log_alpha",
        "prune_gates.gates.features/2.log_alpha",
        "prune_gates.gates.classifier/1.log_alpha",
    ]
    assert module.state_dict()["prune_gates._extra_state"] == {"input_shapes": [list(shape)], "input_dtypes": ["float32"]}
    params = {id(p) for p in module.parameters()}
    assert all(id(gate.log_alpha) in params for _, gate in gates.items())
    # gradients reach the gates through the training forward
    module.train()
    loss = module(torch.randn(4, *shape[1:])).square().mean()
    loss.backward()
    assert all(gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0 for _, gate in gates.items())
    # a checkpoint of the LightningModule restores the gates
    state = copy.deepcopy(module.state_dict())
    with torch.no_grad():
        gates["features.0"].log_alpha.fill_(-5.0)
    module.load_state_dict(state)
    assert bool((gates["features.0"].log_alpha > -1).all())
    # gates follow the owner's mode: eval -> deterministic output
    module.eval()
    x = torch.randn(2, *shape[1:])
    torch.testing.assert_close(module(x), module(x))
    copied = copy.deepcopy(module)  # after a training forward too: the last sample is not copied
    assert isinstance(copied.prune_gates, GateSet) and not copied.prune_gates.attached
    torch.testing.assert_close(copied.prune_gates["features.0"].log_alpha, gates["features.0"].log_alpha)
    gates.detach()
    assert not hasattr(module, "prune_gates") and attached_gates(net) is None
    assert not any(k.startswith("prune_gates.") for k in module.state_dict())


def test_detach_restores_the_ungated_model() -> None:
    model, graph, shape = zoo("mobilenet_v2")
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        reference = model(x)
        gates = attach_gates(
            model, graph, {n: FixedMask(m) for n, m in random_group_masks(graph, 0).items()}, owner=model
        )
        masked = model(x)
        assert not torch.allclose(masked, reference, atol=1e-3)
        assert "prune_gates" in dict(model.named_children())
        with gates.suspended():
            torch.testing.assert_close(model(x), reference)
        torch.testing.assert_close(model(x), masked)
        gates.detach()
        torch.testing.assert_close(model(x), reference)
    assert not gates.attached and "prune_gates" not in dict(model.named_children())
    assert set(gates.alive()) == set(graph.names)  # the gates keep their values


def test_all_three_gate_types_attach() -> None:
    model, graph, shape = zoo("wrn16_4")
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        reference = model(x)
        # a uniform Dirichlet switch multiplies by K * (1/K) = 1: the network is unchanged
        gates = attach_gates(model, graph, lambda group: DirichletSwitch(group.size))
        torch.testing.assert_close(model(x), reference)
        gates.detach()
        gates = attach_gates(model, graph, lambda group: FixedMask(torch.ones(group.size, dtype=torch.bool)))
        torch.testing.assert_close(model(x), reference)
        gates.detach()
        hard = attach_gates(model, graph, lambda group: HardConcreteGate(group.size))
        for _, gate in hard.items():
            gate.log_alpha.fill_(-6.0)  # every gate closed
        model.eval()
        closed = model(x)
        hard.detach()
    # with every prunable channel closed only the head's bias is left
    torch.testing.assert_close(closed, model.fc.bias.expand_as(closed))


def test_open_probabilities_and_alive() -> None:
    model, graph, _ = zoo("lenet5")
    masks = random_group_masks(graph, 4)
    gates = attach_gates(model, graph, {n: FixedMask(m) for n, m in masks.items()})
    assert all(torch.equal(gates.alive()[n], masks[n]) for n in masks)
    assert all(torch.equal(gates.open_probabilities()[n], masks[n].float()) for n in masks)
    assert list(gates) == list(graph.names) and len(gates) == 3 and "features.0" in gates
    gates.detach()


def test_errors() -> None:
    model, graph, _ = zoo("lenet5")
    with pytest.raises(ValueError, match=r"gates\['features.0'\] has 3 channels, group 'features.0' has 20"):
        attach_gates(model, graph, {"features.0": FixedMask(torch.ones(3, dtype=torch.bool))})
    with pytest.raises(ValueError, match="unknown channel group 'classifier.3' .it is not pruned"):
        attach_gates(model, graph, {"classifier.3": FixedMask(torch.ones(10, dtype=torch.bool))})
    with pytest.raises(TypeError, match=r"gates\['features.0'\] must be a ChannelGate, got Linear"):
        attach_gates(model, graph, {"features.0": nn.Linear(1, 1)})
    with pytest.raises(TypeError, match="gates factory returned int"):
        attach_gates(model, graph, lambda group: 3)
    taken = nn.Module()
    taken.prune_gates = nn.Linear(1, 1)
    with pytest.raises(ValueError, match="already has an attribute 'prune_gates'"):
        attach_gates(model, graph, lambda group: HardConcreteGate(group.size), owner=taken)
    with pytest.raises(ValueError, match="owner: an nn.Sequential calls every child"):
        attach_gates(model, graph, lambda group: HardConcreteGate(group.size), owner=nn.Sequential())
    gates = attach_gates(model, graph, lambda group: HardConcreteGate(group.size))
    with pytest.raises(ValueError, match="model already has gates attached"):
        attach_gates(model, graph, lambda group: HardConcreteGate(group.size), name="more_gates")
    with pytest.raises(ValueError, match="model has gates attached; detach them"):
        build_graph(model, torch.zeros(1, 1, 28, 28))
    gates.detach()
    other, _, _ = zoo("resnet20")
    with pytest.raises(ValueError, match="has no layer 'features.0'"):
        attach_gates(other, graph, lambda group: HardConcreteGate(group.size))
    with pytest.raises(KeyError, match="no gate for group 'x'"):
        GateSet({})["x"]


# -- DDP: two CPU processes (gloo); gate gradients must be averaged across ranks ---------------


class _Owner(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _ddp_run(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net, graph, shape = zoo("lenet5")
        owner = _Owner(net)
        gates = attach_gates(net, graph, lambda group: HardConcreteGate(group.size), owner=owner)
        ddp = nn.parallel.DistributedDataParallel(owner)
        log_alpha = gates["features.0"].log_alpha
        grads = []
        for sync in (False, True):
            torch.manual_seed(100 + rank)  # different data and gate noise on each rank, same in both passes
            x = torch.randn(4, *shape[1:])
            log_alpha.grad = None
            if sync:
                ddp(x).square().mean().backward()
            else:
                with ddp.no_sync():
                    ddp(x).square().mean().backward()
            grads.append(log_alpha.grad.clone())
        # plain lists: a tensor would travel as a shared file descriptor, which the parent cannot
        # open once this process has exited (a race that failed under load)
        queue.put((rank, [g.tolist() for g in grads]))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned processes: mostly the time to import torch and lightning twice
def test_ddp_synchronises_gate_gradients() -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_run, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    grads = {rank: [torch.tensor(g) for g in values] for rank, values in (queue.get() for _ in procs)}
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    (local0, synced0), (local1, synced1) = grads[0], grads[1]
    assert not torch.allclose(local0, local1)  # the ranks disagree locally...
    torch.testing.assert_close(synced0, (local0 + local1) / 2)  # ...and DDP averages the gate gradients
    torch.testing.assert_close(synced1, synced0)
