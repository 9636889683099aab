"""Export, save and load (lightning_prune.core.export): plain shrunk modules, weights_only files."""

from __future__ import annotations

import functools

import pytest
import torch

import lightning_prune
from lightning_prune.classifier import ImageClassifier
from lightning_prune.core.cost import count_cost
from lightning_prune.core.gating import GateSet, attach_gates
from lightning_prune.core.surgery import pruning_history, shrink
from tests.core_zoo import FunctionalNet, closed_gates, one_thread, random_group_masks, zoo  # one_thread: autouse fixture


def test_export_from_a_gated_lightning_module() -> None:
    net, graph, shape = zoo("resnet20")
    module = ImageClassifier(net, 10, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    gates = attach_gates(net, graph, closed_gates(graph, 0), owner=module)
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
    attach_gates(net, graph, closed_gates(graph, 1), owner=net)  # registered under the net itself
    small = lightning_prune.export(net)
    assert "prune_gates" not in dict(small.named_children()) and "prune_gates" in dict(net.named_children())
    # a LightningModule whose net was shrunk (no gates): export returns that net
    module = ImageClassifier(small, 10, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    again = lightning_prune.export(module)
    assert type(again) is FunctionalNet and again is not small
    assert again.state_dict().keys() == small.state_dict().keys()
    # nothing shrunk, no gates: the module itself (the rule knows nothing about Lightning)
    unpruned = ImageClassifier(zoo("lenet5")[0], 10, optimizer=functools.partial(torch.optim.SGD))
    copied = lightning_prune.export(unpruned)
    assert type(copied) is ImageClassifier and copied is not unpruned


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
    attach_gates(net, graph, closed_gates(graph, 3))
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


def test_architecture_compression_winner_round_trips(tmp_path) -> None:
    """An Architecture Compression network (built from tokens) saves with its token list as the
    architecture (lightning_prune.archcomp.models.build) and loads back without model=."""
    from lightning_prune.archcomp import ConvK, plan, to_tokens
    from lightning_prune.archcomp.compress import architecture
    from lightning_prune.archcomp.models import build

    shape = (1, 28, 28)
    tokens = list(plan(to_tokens(ConvK(depth=3, channels=6, input_shape=shape), shape), shape).tokens)
    torch.manual_seed(0)
    net = build(tokens, shape)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    net.eval()
    path = tmp_path / "winner.pt"
    lightning_prune.save_pruned(net, path, architecture=architecture(tokens, shape))
    payload = torch.load(path, weights_only=True)  # plain data and tensors only
    assert payload["architecture"]["_target_"] == "lightning_prune.archcomp.models.build"
    assert payload["architecture"]["tokens"] == [list(t) for t in tokens]
    loaded = lightning_prune.load_pruned(path)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), atol=1e-5, rtol=1e-5)
    # Only the builders of lightning_prune.archcomp.models are allowed, not what that module imports.
    for target, message in [("lightning_prune.archcomp.models.check_input_shape", "is defined in"),
                            ("lightning_prune.archcomp.tokens.build", "is not in")]:
        torch.save({**payload, "architecture": {"_target_": target}}, path)
        with pytest.raises(ValueError, match=message):
            lightning_prune.load_pruned(path)


def test_version_1_files_still_load(tmp_path) -> None:
    net, graph, shape = zoo("resnet20")
    shrink(net, random_group_masks(graph, 5), graph=graph)
    path = tmp_path / "v1.pt"
    lightning_prune.save_pruned(net, path, architecture={"_target_": "lightning_prune.models.CifarResNet", "depth": 20})
    payload = torch.load(path, weights_only=True)
    del payload["decompositions"]
    torch.save({**payload, "version": 1}, path)  # the layout of version 1
    loaded = lightning_prune.load_pruned(path)
    x = torch.randn(2, *shape[1:])
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))


def test_decompositions_are_saved_checked_and_replayed_in_order(tmp_path) -> None:
    """Channel pruning and decompositions interleaved: each decomposition replays after the
    pruning steps that preceded it."""
    from lightning_prune.core.decomposition import decompose, decompositions

    torch.manual_seed(0)
    net, graph, shape = zoo("lenet5")
    net.eval()
    example = torch.zeros(shape)
    graph = shrink(net, random_group_masks(graph, 6), graph=graph)
    conv2 = net.features[2]
    tucker = [max(1, conv2.in_channels // 2), max(1, conv2.out_channels // 2)]
    decompose(net, "features.2", tuple(tucker))  # tucker2 of the second conv
    graph = lightning_prune.build_graph(net, example)
    shrink(net, random_group_masks(graph, 7), graph=graph)
    fc1 = net.classifier[1]
    rank = max(1, min(fc1.in_features, fc1.out_features) // 2)
    decompose(net, "classifier.1", [rank])  # svd of fc1
    assert decompositions(net) == [{"kind": "tucker2", "layer": "features.2", "ranks": tucker, "after_steps": 1},
                                   {"kind": "svd", "layer": "classifier.1", "ranks": [rank], "after_steps": 2}]
    path = tmp_path / "mixed.pt"
    lightning_prune.save_pruned(net, path, architecture={"_target_": "lightning_prune.models.LeNet5", "num_classes": 10})
    loaded = lightning_prune.load_pruned(path)
    x = torch.randn(3, *shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), atol=1e-5, rtol=1e-5)
    payload = torch.load(path, weights_only=True)
    bad_steps = [
        ([{"kind": "cp", "layer": "features.2", "ranks": [5], "after_steps": 0}], "'kind' must be one of"),
        ([{"kind": "svd", "layer": "features.2", "ranks": [5, 7], "after_steps": 0}], "'ranks' of svd must be 1"),
        ([{"kind": "svd", "layer": "classifier.1", "ranks": [rank], "after_steps": 3}], "'after_steps' must be"),
        ([{"kind": "svd", "layer": "nope", "ranks": [rank], "after_steps": 0}], "has no layer 'nope'"),
        ([{"kind": "svd", "layer": "features.0", "ranks": [2], "after_steps": 0}], "svd decomposes a linear layer"),
        ("svd", "'decompositions' must be a list"),
    ]
    for steps, message in bad_steps:
        torch.save({**payload, "decompositions": steps}, path)
        with pytest.raises(ValueError, match=message):
            lightning_prune.load_pruned(path)
