"""Export, save and load (lightning_prune.export): plain shrunk modules, weights_only files."""

from __future__ import annotations

import functools

import pytest
import torch

import lightning_prune
from lightning_prune.classifier import ImageClassifier
from lightning_prune.cost import count_cost
from lightning_prune.gates import HardConcreteGate
from lightning_prune.gating import GateSet, attach_gates
from lightning_prune.surgery import pruning_history, shrink
from tests.core_zoo import FunctionalNet, one_thread, random_group_masks, zoo  # one_thread: autouse fixture


def _closed_gates(graph, seed: int) -> dict[str, HardConcreteGate]:
    """Hard Concrete gates whose deterministic value is exactly 0 or 1 (log_alpha = -6 or 6)."""
    gates = {}
    for name, mask in random_group_masks(graph, seed).items():
        gate = HardConcreteGate(mask.numel())
        with torch.no_grad():
            gate.log_alpha.copy_(torch.where(mask, 6.0, -6.0))
        gates[name] = gate
    return gates


def test_export_from_a_gated_lightning_module() -> None:
    net, graph, shape = zoo("resnet20")
    module = ImageClassifier(net, 10, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    gates = attach_gates(net, graph, _closed_gates(graph, 0), owner=module)
    module.eval()
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        gated = module(x)
    small = lightning_prune.export(module)
    assert type(small).__name__ == "CifarResNet"
    assert not any(isinstance(m, GateSet) for m in small.modules())
    assert not small._forward_hooks and all(not m._forward_hooks for m in small.modules())
    with torch.no_grad():
        torch.testing.assert_close(small(x), gated, atol=1e-5, rtol=1e-5)
    assert count_cost(small, x).macs < count_cost(net, x).macs
    masks = gates.alive()
    assert small.conv1.out_channels == int(masks["conv1"].sum())
    assert gates.attached and net.conv1.out_channels == 16  # the module itself is unchanged
    assert len(pruning_history(small)["steps"]) == 1
    gates.detach()


def test_export_owner_is_the_net_and_already_shrunk_networks() -> None:
    net, graph, shape = zoo("functional")
    attach_gates(net, graph, _closed_gates(graph, 1), owner=net)  # registered under the net itself
    small = lightning_prune.export(net)
    assert "prune_gates" not in dict(small.named_children()) and "prune_gates" in dict(net.named_children())
    # a LightningModule whose net was shrunk (no gates): export returns that net
    module = ImageClassifier(small, 10, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    again = lightning_prune.export(module)
    assert type(again) is FunctionalNet and again is not small
    assert again.state_dict().keys() == small.state_dict().keys()
    with pytest.raises(ValueError, match="has no attached gates and no shrunk network; pass the network"):
        lightning_prune.export(ImageClassifier(zoo("lenet5")[0], 10, optimizer=functools.partial(torch.optim.SGD)))


def test_save_and_load_zoo_model_from_its_architecture(tmp_path) -> None:
    net, graph, shape = zoo("resnet20")
    shrink(net, random_group_masks(graph, 2), graph=graph)
    path = tmp_path / "small.pt"
    arch = {"_target_": "lightning_prune.models.CifarResNet", "depth": 20, "num_classes": 10}
    lightning_prune.save_pruned(net, path, architecture=arch)
    payload = torch.load(path, weights_only=True)  # no pickled modules
    assert payload["architecture"] == arch and payload["format"] == "lightning-prune"
    loaded = lightning_prune.load_pruned(path)
    assert not loaded.training
    x = torch.randn(2, *shape[1:])
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    assert count_cost(loaded, x).macs == count_cost(net, x).macs


def test_save_and_load_torchvision_and_user_models(tmp_path) -> None:
    net, graph, shape = zoo("mobilenet_v2")
    attach_gates(net, graph, _closed_gates(graph, 3))
    path = tmp_path / "mbv2.pt"
    lightning_prune.save_pruned(net, path, architecture={"_target_": "torchvision.models.mobilenet_v2", "num_classes": 10})
    loaded = lightning_prune.load_pruned(path)
    x = torch.randn(2, *shape[1:])
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), atol=1e-5, rtol=1e-5)  # net is still gated

    user, ugraph, ushape = zoo("functional")
    shrink(user, random_group_masks(ugraph, 4), graph=ugraph)
    upath = tmp_path / "user.pt"
    lightning_prune.save_pruned(user, upath)
    with pytest.raises(ValueError, match="records no architecture; pass model="):
        lightning_prune.load_pruned(upath)
    loaded = lightning_prune.load_pruned(upath, model=FunctionalNet())
    x = torch.randn(2, *ushape[1:])
    user.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), user(x))


def test_errors(tmp_path) -> None:
    net, _, _ = zoo("lenet5")
    with pytest.raises(ValueError, match="architecture must be a mapping with a '_target_'"):
        lightning_prune.save_pruned(net, tmp_path / "a.pt", architecture={"depth": 3})
    with pytest.raises(TypeError, match=r"architecture\['width'\] must hold only"):
        lightning_prune.save_pruned(net, tmp_path / "a.pt", architecture={"_target_": "x", "width": object()})
    path = tmp_path / "evil.pt"
    lightning_prune.save_pruned(net, path, architecture={"_target_": "os.system", "command": "true"})
    with pytest.raises(ValueError, match="target 'os.system' is not in"):
        lightning_prune.load_pruned(path)
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a lightning-prune file"):
        lightning_prune.load_pruned(tmp_path / "other.pt")
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        lightning_prune.export("net")  # type: ignore[arg-type]
