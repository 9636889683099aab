"""Inference export (lightning_prune.core.inference, core.deploy): batch norms folded into the layer
before them with the output unchanged, what cannot fold stays, ONNX files that ONNX Runtime runs
to PyTorch's output, ExportedPrograms, save_pruned(inference=True) -> load_pruned, bad input."""

from __future__ import annotations

import copy
import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import lightning_prune
from lightning_prune.classifier import ImageClassifier
from lightning_prune.core.folding import shrink_as_masked
from lightning_prune.core.gating import attach_gates
from lightning_prune.core.inference import fold_batchnorm, folded_layers
from lightning_prune.core.residual import RemovedLayer, is_scattered
from lightning_prune.core.surgery import shrink
from lightning_prune.core.trace import build_graph
from lightning_prune.models import CifarResNet
from tests.core_zoo import closed_gates, one_thread, random_group_masks, randomize_norms, zoo  # one_thread: autouse fixture
from tests.residual_helpers import INPUT, UserResNet

RESNET20 = {"_target_": "lightning_prune.models.CifarResNet", "depth": 20, "num_classes": 10}


def _norms(net: nn.Module) -> list[str]:
    return [name for name, m in net.named_modules() if isinstance(m, _BatchNorm)]


def _close(a: Tensor, b: Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def _shrunk(name: str, seed: int = 1) -> tuple[nn.Module, tuple[int, ...]]:
    net, graph, shape = zoo(name)
    shrink(net, random_group_masks(graph, seed), graph=graph)
    return net.eval(), shape


def _mixed_resnet(seed: int = 3) -> nn.Module:
    """A ResNet-20 shrunk with mixed-connectivity blocks: the first branch removed, the others
    keeping random channels (scattered into their streams)."""
    torch.manual_seed(0)
    net = randomize_norms(CifarResNet(20)).eval()
    graph = build_graph(net, torch.zeros(1, 3, 32, 32), residual="mixed")
    masks = random_group_masks(graph, seed)
    masks[graph.branch_names[0]] = torch.zeros(graph[graph.branch_names[0]].size, dtype=torch.bool)
    shrink_as_masked(net, masks, graph=graph)
    return net.eval()


# -- batch-norm folding --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "folds"), [("lenet5", 0), ("resnet20", 21), ("vgg16", 14), ("mobilenet_v2", 52)])
def test_export_for_inference_folds_every_batch_norm_of_the_zoo_and_keeps_the_output(name: str, folds: int) -> None:
    net, shape = _shrunk(name)
    norms = _norms(net)
    assert len(norms) == folds  # every batch norm of these follows a convolution or linear layer feeding only it
    small = lightning_prune.export(net, inference=True)
    assert not small.training and _norms(small) == []
    pairs = folded_layers(small)
    assert sorted(norm for _, norm in pairs) == sorted(norms)
    for layer, norm in pairs:
        assert isinstance(small.get_submodule(norm), nn.Identity)
        assert small.get_submodule(layer).bias is not None  # created where the convolution had none
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _close(small(x), net(x))
    assert _norms(net) == norms and net.training is False  # the module itself is unchanged
    assert lightning_prune.export(net).__dict__.get("_lightning_prune_inference") is None  # default: not folded


def test_mixed_blocks_fold_into_scattered_convolutions_and_removed_branches_stay_removed() -> None:
    net = _mixed_resnet()
    removed = [n for n, m in net.named_modules() if isinstance(m, RemovedLayer)]
    scattered_norms = [n for n, m in net.named_modules() if is_scattered(m)]
    assert removed and scattered_norms and all(n.endswith("bn2") for n in scattered_norms)
    small = lightning_prune.export(net, inference=True)
    assert _norms(small) == []
    # the scatter moved from each branch's last batch norm to the convolution before it
    for norm in scattered_norms:
        conv = small.get_submodule(norm[: -len("bn2")] + "conv2")
        assert is_scattered(conv) and torch.equal(conv.scatter_index, net.get_submodule(norm).scatter_index)
        assert isinstance(small.get_submodule(norm), nn.Identity)
    assert [n for n, m in small.named_modules() if isinstance(m, RemovedLayer)] == removed
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _close(small(x), net(x))


def test_a_user_sequential_folds_with_an_example_input() -> None:
    torch.manual_seed(0)
    seq = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(6),  # after an activation: stays
        nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10), nn.BatchNorm1d(10),
    )  # fmt: skip
    seq = randomize_norms(seq).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        before = seq(x)
    with pytest.raises(ValueError, match="example_input: the network records no input shapes"):
        fold_batchnorm(seq)
    with pytest.raises(ValueError, match="example_input: the network records no input shapes"):
        lightning_prune.export(seq, inference=True)
    pairs = fold_batchnorm(seq, x)
    assert pairs == [("0", "1"), ("6", "7"), ("9", "10")] and folded_layers(seq) == pairs
    assert isinstance(seq[5], nn.BatchNorm2d) and isinstance(seq[1], nn.Identity) and seq[6].bias is not None
    with torch.no_grad():
        _close(seq(x), before)
    assert fold_batchnorm(seq, x) == []  # nothing left to fold


class _Unfoldable(nn.Module):
    """One foldable pair (``b``/``bnb``) and a batch norm for every reason not to fold: a layer
    whose output also feeds an addition, a norm after an addition, a layer run twice, a norm
    without running statistics, a linear layer with a 3-D output, a layer output the network
    returns, a layer whose weight the forward code reads itself. ``dynamic`` branches on a tensor
    value (``torch.fx`` cannot trace it)."""

    def __init__(self, dynamic: bool) -> None:
        super().__init__()
        self.dynamic = dynamic
        self.a, self.bna = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.bnb = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.post = nn.BatchNorm2d(4)
        self.twice, self.bnt = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.batch_stats, self.bns = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.seq, self.bnq = nn.Linear(8, 8), nn.BatchNorm1d(4)
        self.out, self.bno = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.head, self.bnh = nn.Linear(4, 6), nn.BatchNorm1d(6)
        self.read, self.bnr = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y = self.a(x)
        z = self.bna(y) + y
        if self.dynamic and bool(z.abs().sum() >= 0):
            z = F.relu(z)
        w = self.post(self.bnb(self.b(z)) + z)
        w = self.bns(self.batch_stats(self.bnt(self.twice(self.twice(w)))))
        w = self.bnr(self.read(w)) * self.read.weight.mean()
        c = self.out(w)
        h = self.bnh(self.head(self.bno(c).mean((2, 3))))
        q = self.bnq(self.seq(w[:, :, 0, :]))  # (batch, 4, 8): BatchNorm1d normalizes dim 1, not the linear's features
        return h, q.sum(-1), c


@pytest.mark.parametrize("dynamic", [False, True], ids=["fx", "hooks"])
def test_batch_norms_that_cannot_fold_stay_with_fx_and_with_the_hook_trace(dynamic: bool) -> None:
    torch.manual_seed(0)
    net = randomize_norms(_Unfoldable(dynamic))
    net.bns.track_running_stats, net.bns.running_mean, net.bns.running_var = False, None, None
    net.eval()
    if dynamic:
        with pytest.raises(torch.fx.proxy.TraceError):
            torch.fx.symbolic_trace(net)
    else:
        torch.fx.symbolic_trace(net)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        before = net(x)
    assert fold_batchnorm(net, x) == [("b", "bnb"), ("head", "bnh")]
    assert _norms(net) == ["bna", "post", "bnt", "bns", "bnq", "bno", "bnr"]
    with torch.no_grad():
        for a, b in zip(net(x), before):
            _close(a, b)


def test_a_fold_that_changes_the_output_is_undone_and_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_prune.core.inference as inference

    net = _mixed_resnet(seed=4)
    before = copy.deepcopy(net.state_dict())
    classes = {name: type(m) for name, m in net.named_modules()}
    monkeypatch.setattr(inference, "_difference", lambda out, ref: "largest difference 1, allowed 1e-4")
    with pytest.raises(ValueError, match=r"network: folding the batch norms bn1, layer1\.\d\.bn\d, .*changed its output "
                       r"\(largest difference 1, allowed 1e-4\); nothing was folded"):
        fold_batchnorm(net)
    assert {name: type(m) for name, m in net.named_modules()} == classes and folded_layers(net) == []
    after = net.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) if isinstance(v, Tensor) else after[k] == v for k, v in before.items())


# -- ONNX and torch.export ------------------------------------------------------------------------


def _onnx_run(path, x: Tensor):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "resnet20-mixed"])
def test_onnx_runtime_computes_what_pytorch_computes(name: str, tmp_path) -> None:
    import onnx

    if name == "lenet5":  # gated: export_onnx shrinks it to what the gates keep
        net, graph, shape = zoo("lenet5")
        attach_gates(net, graph, closed_gates(graph, 2))
        module = net.eval()
    else:
        module, shape = _shrunk("resnet20") if name == "resnet20" else (_mixed_resnet(), (1, 3, 32, 32))
    path = lightning_prune.export_onnx(module, tmp_path / f"{name}.onnx", torch.randn(1, *shape[1:]))
    assert path == tmp_path / f"{name}.onnx" and path.is_file() and not list(tmp_path.glob("*.data"))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {node.op_type for node in model.graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops  # folded
    x = torch.randn(5, *shape[1:], generator=torch.Generator().manual_seed(3))  # another batch size: dynamic batch
    with torch.no_grad():
        expected = lightning_prune.export(module).eval()(x)
    _close(_onnx_run(path, x), expected, atol=1e-4)


def test_onnx_without_inference_and_with_a_fixed_batch(tmp_path) -> None:
    import onnx

    net, shape = _shrunk("resnet20", seed=4)
    x = torch.randn(2, *shape[1:])
    path = lightning_prune.export_onnx(net, tmp_path / "r20.onnx", x, inference=False, dynamic_batch=False)
    model = onnx.load(str(path))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 32, 32]
    with torch.no_grad():
        _close(_onnx_run(path, x), net(x), atol=1e-4)


def test_exported_program_from_a_gated_lightning_module() -> None:
    net, graph, shape = zoo("resnet20")
    module = ImageClassifier(net, 10, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    gates = attach_gates(net, graph, closed_gates(graph, 0), owner=module)
    module.eval()
    x = torch.randn(4, *shape[1:])
    with torch.no_grad():
        gated = module(x)
    program = lightning_prune.export_program(module, torch.randn(1, *shape[1:]))
    assert isinstance(program, torch.export.ExportedProgram)
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert any("conv" in t for t in targets) and not any("batch_norm" in t for t in targets)
    with torch.no_grad():
        _close(program.module()(x), gated)  # batch 4 from an example of 1
    assert gates.attached and net.conv1.out_channels == 16  # the module itself is unchanged
    gates.detach()


def test_channels_last_by_default_for_inference_only() -> None:
    net, shape = _shrunk("resnet20", seed=5)
    fast = lightning_prune.export(net, inference=True)
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last) and fast.conv1.weight.shape[1] == 3
    assert lightning_prune.export(net).conv1.weight.is_contiguous()
    plain = lightning_prune.export(net, inference=True, channels_last=False)
    assert plain.conv1.weight.is_contiguous() and not plain.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        _close(fast(x), plain(x))


# -- save / load ------------------------------------------------------------------------------------


def test_save_pruned_for_inference_round_trips_through_load_pruned(tmp_path) -> None:
    net, shape = _shrunk("resnet20", seed=6)
    path = tmp_path / "r20.pt"
    lightning_prune.save_pruned(net, path, architecture=RESNET20, inference=True)
    payload = torch.load(path, weights_only=True)
    assert payload["version"] == 3 and len(payload["inference"]["folded"]) == 21
    assert not any(k.endswith("running_mean") for k in payload["state_dict"])
    loaded = lightning_prune.load_pruned(path)
    assert not loaded.training and _norms(loaded) == [] and folded_layers(loaded) == folded_layers(
        lightning_prune.export(net, inference=True))
    x = torch.randn(3, *shape[1:])
    with torch.no_grad():
        _close(loaded(x), net(x))
    # a file without folding is written and read as before (version 2, no "inference")
    lightning_prune.save_pruned(net, tmp_path / "plain.pt", architecture=RESNET20)
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert plain["version"] == 2 and "inference" not in plain
    with torch.no_grad():
        _close(lightning_prune.load_pruned(tmp_path / "plain.pt")(x), net(x))


def test_a_folded_user_network_with_mixed_blocks_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    net = randomize_norms(UserResNet()).eval()
    graph = build_graph(net, torch.zeros(1, *INPUT), residual="mixed")
    shrink_as_masked(net, random_group_masks(graph, 3), graph=graph)
    assert is_scattered(net.features[4].body[4])  # the last block's batch norm, scattered into its stream
    folded = lightning_prune.export(net, inference=True)
    assert is_scattered(folded.features[4].body[3]) and isinstance(folded.features[4].body[4], nn.Identity)
    # the network folded earlier is saved with its folding by a plain save_pruned
    lightning_prune.save_pruned(folded, tmp_path / "user.pt")
    loaded = lightning_prune.load_pruned(tmp_path / "user.pt", model=UserResNet())
    assert folded_layers(loaded) == folded_layers(folded) and _norms(loaded) == _norms(folded)
    x = torch.randn(3, *INPUT)
    with torch.no_grad():
        _close(loaded(x), net(x))


# -- bad input --------------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    net, shape = _shrunk("lenet5")
    x = torch.randn(1, *shape[1:])
    path = tmp_path / "n.onnx"
    cases = [
        (lambda: lightning_prune.export(net, inference="yes"), TypeError, "inference must be a bool"),
        (lambda: lightning_prune.export(net, example_input=x), ValueError, "example_input is used only with inference=True"),
        (lambda: lightning_prune.export(net, inference=True, channels_last=1), TypeError, "channels_last must be a bool or None"),
        (lambda: lightning_prune.export(net, inference=True, example_input="x"), TypeError, "example_input must be a tensor"),
        (lambda: fold_batchnorm("net"), TypeError, "network must be an nn.Module"),
        (lambda: lightning_prune.export_onnx("net", path, x), TypeError, "module must be an nn.Module"),
        (lambda: lightning_prune.export_onnx(net, 3, x), TypeError, "path must be a str or os.PathLike"),
        (lambda: lightning_prune.export_onnx(net, tmp_path / "missing" / "n.onnx", x), FileNotFoundError,
         f"the directory {tmp_path / 'missing'} of 'n.onnx' does not exist"),
        (lambda: lightning_prune.export_onnx(net, tmp_path, x), ValueError, "which is a directory"),
        (lambda: lightning_prune.export_onnx(net, path, None), TypeError, "example_input must be a tensor"),
        (lambda: lightning_prune.export_onnx(net, path, [x, "y"]), TypeError, "example_input must be a tensor"),
        (lambda: lightning_prune.export_onnx(net, path, x, opset_version=13), ValueError, "opset_version must be an int >= 18"),
        (lambda: lightning_prune.export_onnx(net, path, x, opset_version="18"), TypeError, "opset_version must be an int"),
        (lambda: lightning_prune.export_onnx(net, path, x, dynamic_batch="no"), TypeError, "dynamic_batch must be a bool"),
        (lambda: lightning_prune.export_onnx(net, path, x, check=1), TypeError, "check must be a bool"),
        (lambda: lightning_prune.export_onnx(net, path, x, inference=None), TypeError, "inference must be a bool"),
        (lambda: lightning_prune.export_program("net", x), TypeError, "module must be an nn.Module"),
        (lambda: lightning_prune.export_program(net, "x"), TypeError, "example_input must be a tensor"),
        (lambda: lightning_prune.save_pruned(net, tmp_path / "a.pt", inference=1), TypeError, "inference must be a bool"),
    ]
    for call, error, words in cases:
        with pytest.raises(error) as info:
            call()
        assert type(info.value) is error and words in str(info.value), (words, str(info.value))
    assert list(tmp_path.iterdir()) == []  # nothing written

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"export_onnx needs the package 'onnxscript'.*lightning-prune\[deploy\]"):
        lightning_prune.export_onnx(net, path, x)
    assert not path.exists()


def test_load_pruned_refuses_a_bad_inference_record_naming_the_file(tmp_path) -> None:
    net, _ = _shrunk("resnet20", seed=7)
    path = tmp_path / "r20.pt"
    lightning_prune.save_pruned(net, path, architecture=RESNET20, inference=True)
    payload = torch.load(path, weights_only=True)
    bad = [
        ({"folded": "conv1"}, "'inference' must be a mapping"),
        ({"folded": [["conv1"]]}, r"'inference'\['folded'\]\[0\] must be a \[layer, batch norm\] pair"),
        ({"folded": [["conv1", "nope"]]}, "its folded batch norms do not fit CifarResNet: pairs: the network has no module 'nope'"),
        ({"folded": [["bn1", "conv1"]]}, "cannot fold 'conv1' into 'bn1'"),
        ({"folded": [["conv1", "bn1"], ["conv1", "bn1"]]}, "'conv1' appears in more than one pair"),
    ]
    for record, message in bad:
        torch.save({**payload, "inference": record}, path)
        with pytest.raises(ValueError, match=message) as info:
            lightning_prune.load_pruned(path)
        assert str(path) in str(info.value)
