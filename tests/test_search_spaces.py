"""AdaNS compression spaces (Javaheripi, Samragh, Javidi and Koushanfar, "AdaNS: Adaptive
Non-Uniform Sampling for Automated Design of Compact DNNs", IEEE JSTSP 2020, doi:10.1109/JSTSP.2020.2992384;
Appendix A) and the candidate job.

For every space: the real compressed model's cost, measured with ``count_cost`` (non-zero
weights for unstructured pruning), equals the predicted cost, and it computes what the
in-place masked / low-rank model computes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F

import lightning_prune
from lightning_prune import count_cost
from lightning_prune.models import CifarResNet, LeNet5
from lightning_prune.search.spaces import KINDS, CompressionSpace, recalibrated_batch_norm, sparse_cost, top1
from tests.core_zoo import macs_table


def _perturbed(model: nn.Module) -> nn.Module:
    """Random weights with non-trivial batch-norm statistics, in eval mode."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _measured(space: CompressionSpace, model: nn.Module) -> int:
    ex = space.example_input
    return sparse_cost(model, ex)[space.cost] if space.unstructured else count_cost(model, ex)[space.cost]


CASES = [(kind, cost) for kind in KINDS for cost in ("macs", "params")] + [("structured", "volume")]


@pytest.mark.parametrize(("kind", "cost"), CASES)
def test_measured_cost_of_the_compressed_lenet5_matches_the_prediction(kind: str, cost: str) -> None:
    torch.manual_seed(0)
    model = LeNet5(num_classes=10).eval()
    inputs = torch.randn(8, 1, 28, 28)
    space = CompressionSpace(model, inputs[:1], kind, cost)
    if space.structured:
        space.rank_channels([(inputs, torch.randint(0, 10, (8,)))])
    rng = np.random.default_rng(1)
    for x in [rng.random(space.search_space.d), rng.random(space.search_space.d), space.search_space.most_compressed]:
        small = space.compress(x)
        assert _measured(space, small) == space.predict_cost(x)
        with torch.no_grad():
            np.testing.assert_allclose(small(inputs).numpy(), model(inputs).numpy(), atol=1e-4)  # model has x applied
    assert space.predict_cost(space.search_space.most_compressed) < space.base_cost
    # The identity point costs what the original model costs.
    space.reset()
    reference = count_cost(LeNet5(num_classes=10), inputs[:1])
    if space.unstructured:
        assert space.base_cost == sparse_cost(model, inputs[:1])[cost]
    else:
        assert space.base_cost == reference[cost]


@pytest.mark.parametrize("kind", ["structured", "decomposition+structured"])
def test_residual_network_spaces(kind: str) -> None:
    torch.manual_seed(0)
    model = _perturbed(CifarResNet(8, num_classes=10))
    inputs = torch.randn(4, 3, 32, 32)
    space = CompressionSpace(model, inputs[:1], kind, "macs")
    # ResNet-8: 3 residual streams + 3 inner groups; the head is never pruned
    assert len(space.groups) == 6
    space.rank_channels([(inputs, torch.randint(0, 10, (4,)))])
    x = np.random.default_rng(0).random(space.search_space.d) * 0.8
    small = space.compress(x)
    assert count_cost(small, inputs[:1]).macs == space.predict_cost(x)
    with torch.no_grad():
        np.testing.assert_allclose(small(inputs).numpy(), model(inputs).numpy(), atol=1e-4)
    kept = space.settings(x)["kept_channels"]
    stem = small.conv1[-1] if isinstance(small.conv1, nn.Sequential) else small.conv1  # decomposed or not
    assert stem.out_channels == kept["conv1"]  # the first residual stream


def test_channel_ranking_and_in_place_masks() -> None:
    torch.manual_seed(0)
    model = LeNet5(num_classes=10).eval()
    with torch.no_grad():
        model.features[2].weight[:, 7] = 0  # conv2 never reads conv1's channel 7
    inputs, targets = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    space = CompressionSpace(model, inputs[:1], "structured")
    group = space.groups[0]
    assert space.graph.groups[group].size == 20
    importance = space.rank_channels([(inputs[:8], targets[:8]), (inputs[8:], targets[8:])])
    assert importance[group][7] == 0 and bool((importance[group][torch.arange(20) != 7] > 0).all())
    # Pruning one channel of 20 (rate 1/20) removes the useless one: the outputs do not change.
    with torch.no_grad():
        before = model(inputs)
    x = space.search_space.identity.copy()
    x[0] = 1 / 20
    assert not space.masks(x)[group][7] and int(space.masks(x)[group].sum()) == 19
    space.apply(x)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), before)
    # Other settings change them; reset restores the original network.
    x[1] = 0.5
    space.apply(x)
    with torch.no_grad():
        assert not torch.allclose(model(inputs), before)
    space.reset()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), before)
    assert space.gates is None


def test_recalibrated_batch_norm_uses_the_statistics_of_the_images_and_restores_them() -> None:
    torch.manual_seed(0)
    model = _perturbed(CifarResNet(8, num_classes=10))
    images = torch.randn(24, 3, 32, 32) * 2 + 0.5
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with recalibrated_batch_norm(model, images, batch_size=8):  # 3 equal batches, averaged cumulatively
        assert not model.training and not model.bn1.training
        with torch.no_grad():
            stem = model.conv1(images)  # the first batch norm's input
        torch.testing.assert_close(model.bn1.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
        per_batch = [stem[i : i + 8].var(dim=(0, 2, 3), unbiased=True) for i in range(0, 24, 8)]
        torch.testing.assert_close(model.bn1.running_var, torch.stack(per_batch).mean(0), atol=1e-5, rtol=1e-5)
        assert model.bn1.momentum is None
    assert model.bn1.momentum == 0.1 and not model.bn1.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k  # running statistics and counters restored


def test_a_calibrated_accuracy_leaves_the_loaded_model_as_it_was() -> None:
    torch.manual_seed(0)
    model = _perturbed(CifarResNet(8, num_classes=10))
    inputs, targets = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    space = CompressionSpace(model, inputs[:1], "structured")
    space.rank_channels([(inputs[:32], targets[:32])])
    x = np.full(space.search_space.d, 0.5)
    plain = space.accuracy(x, inputs, targets)
    with torch.no_grad():
        space.apply(x)
        masked = model(inputs)
    calibrated = space.accuracy(x, inputs, targets, calibration=inputs[32:])
    with recalibrated_batch_norm(model, inputs[32:]):
        assert calibrated == top1(model, inputs, targets)  # the same re-estimated statistics
        with torch.no_grad():
            assert not torch.allclose(model(inputs), masked)  # ... which change the outputs
    assert space.accuracy(x, inputs, targets) == plain
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), masked)


def test_unstructured_keeps_the_largest_weights() -> None:
    torch.manual_seed(0)
    model = LeNet5(num_classes=10).eval()
    original = model.features[0].weight.detach().clone()
    space = CompressionSpace(model, torch.zeros(1, 1, 28, 28), "unstructured", "params")
    names = space.search_space.names
    assert names[0] == "sparse:features.0" and space.search_space.dims[0].levels == original.numel() == 500
    x = space.search_space.identity.copy()
    x[0] = 0.3  # floor(0.3 * 500) = 150 smallest weights removed
    space.apply(x)
    w = model.features[0].weight.detach()
    assert int(torch.count_nonzero(w)) == 350
    assert w[w != 0].abs().min() >= original.abs().flatten().sort().values[150]
    assert space.predict_cost(x) == space.base_cost - 150


def test_decomposition_shapes_and_skipping() -> None:
    torch.manual_seed(0)
    model = LeNet5(num_classes=10).eval()
    space = CompressionSpace(model, torch.zeros(1, 1, 28, 28), "decomposition", "macs")
    names = space.search_space.names
    assert names == ["svd:classifier.1", "svd:classifier.3", "tucker_in:features.0", "tucker_out:features.0",
                     "tucker_in:features.2", "tucker_out:features.2"]
    # The identity point decomposes nothing (full ranks would cost more): same model, same cost.
    same = space.compress(space.search_space.identity)
    assert [type(m) for m in same.modules()] == [type(m) for m in LeNet5().modules()]
    x = space.search_space.identity.copy()
    x[0] = 0.1  # fc1: 800 -> 500, R = 500, rank 50: 50 * 1300 < 400000 MACs
    x[4], x[5] = 0.5, 0.25  # conv2 (20 -> 50, 5x5): ranks 10 in, 12 out
    small = space.compress(x)
    fc1 = small.classifier[1]
    assert isinstance(fc1, nn.Sequential) and fc1[0].out_features == 50 and fc1[1].in_features == 50
    conv2 = small.features[2]
    assert [c.out_channels for c in conv2] == [10, 12, 50] and conv2[1].kernel_size == (5, 5)
    assert not isinstance(small.classifier[3], nn.Sequential)  # untouched (rank 1.0)
    assert count_cost(small, torch.zeros(1, 1, 28, 28)).macs == space.predict_cost(x)


WINNERS = [(arch, kind) for arch in ("lenet5", "resnet8")
           for kind in ("structured", "svd", "tucker2", "decomposition+structured", "unstructured")]


@pytest.mark.parametrize(("arch", "kind"), WINNERS)
def test_winners_round_trip_through_save_pruned_and_load_pruned(arch: str, kind: str, tmp_path: Path) -> None:
    """The compressed model of every space saves in the one lightning-prune format (architecture,
    pruning history, decompositions, weights) and loads back, also with plain ``torch.load``."""
    torch.manual_seed(0)
    if arch == "lenet5":
        model, shape = LeNet5(num_classes=10).eval(), (1, 28, 28)
        architecture = {"_target_": "lightning_prune.models.LeNet5", "num_classes": 10}
    else:
        model, shape = _perturbed(CifarResNet(8, num_classes=10)), (3, 32, 32)
        architecture = {"_target_": "lightning_prune.models.CifarResNet", "depth": 8, "num_classes": 10}
    inputs = torch.randn(4, *shape)
    space = CompressionSpace(model, inputs[:1], kind, "macs")
    if space.structured:
        space.rank_channels([(inputs, torch.randint(0, 10, (4,)))])
    x = np.random.default_rng(3).random(space.search_space.d) * 0.8
    small = space.compress(x)
    path = tmp_path / "compressed.pt"
    lightning_prune.save_pruned(small, path, architecture=architecture)
    payload = torch.load(path, weights_only=True)  # plain data and tensors only
    assert payload["format"] == "lightning-prune" and payload["version"] == 2
    kinds = {step["kind"] for step in payload["decompositions"]}
    allowed = {"svd": {"svd"}, "tucker2": {"tucker2"}, "decomposition+structured": {"svd", "tucker2"}}.get(kind, set())
    assert kinds <= allowed and bool(kinds) == bool(allowed)  # the winner has decomposed layers when it can
    assert (payload["history"] is not None) == space.structured
    loaded = lightning_prune.load_pruned(path)
    assert count_cost(loaded, inputs[:1]).macs == count_cost(small, inputs[:1]).macs
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), small(inputs), atol=1e-5, rtol=1e-5)


def test_a_structured_space_predicts_latency_with_a_latency_model() -> None:
    """With a table whose timings are the layers' MACs, the predicted latency of every candidate
    is the compressed model's measured MACs; decompositions have no latency model."""
    torch.manual_seed(0)
    model = LeNet5(num_classes=10).eval()
    inputs = torch.randn(8, 1, 28, 28)
    graph = lightning_prune.build_graph(model, inputs[:1])
    space = CompressionSpace(model, inputs[:1], "structured", "latency", latency=macs_table(graph))
    space.rank_channels([(inputs, torch.randint(0, 10, (8,)))])
    rng = np.random.default_rng(2)
    for x in [rng.random(space.search_space.d), space.search_space.most_compressed, space.search_space.identity]:
        assert count_cost(space.compress(x), inputs[:1]).macs == space.predict_cost(x)
    with pytest.raises(ValueError, match="cost='latency' is supported for kind='structured' only"):
        CompressionSpace(model, inputs[:1], "svd", "latency", latency=macs_table(graph))
    with pytest.raises(ValueError, match="latency: cost='latency' needs the batch size"):
        CompressionSpace(model, inputs[:1], "structured", "latency")


def test_space_validation() -> None:
    model = LeNet5(num_classes=10)
    with pytest.raises(ValueError, match="kind"):
        CompressionSpace(model, torch.zeros(1, 1, 28, 28), "channels")
    with pytest.raises(ValueError, match="volume"):
        CompressionSpace(model, torch.zeros(1, 1, 28, 28), "svd", "volume")
    space = CompressionSpace(model, torch.zeros(1, 1, 28, 28), "structured")
    with pytest.raises(RuntimeError, match="rank_channels"):
        space.apply(space.search_space.identity)
    with pytest.raises(ValueError, match="3 entries"):
        space.predict_cost([0.1, 0.2])


# --- the candidate job, on a LeNet-5 trained briefly on real MNIST ------------------------------
@pytest.fixture(scope="module")
def lenet_checkpoint(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lightning_prune.data import MNISTDataModule

    torch.manual_seed(0)
    dm = MNISTDataModule(data_dir=data_dir, batch_size=100, val_size=5000, subset=1500, augment=False)
    dm.setup("fit")
    net = LeNet5(num_classes=10)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    for x, y in dm.train_dataloader():
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    path = tmp_path_factory.mktemp("lenet") / "lenet.pt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)  # Lightning-style keys
    return path


def _job_cfg(checkpoint: Path, data_dir: Path, **search: object):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lightning_prune.configs import config_dir

    GlobalHydra.instance().clear()
    overrides = [f"search.checkpoint={checkpoint}", f"data.data_dir={data_dir}", "search.eval_size=300",
                 "search.rank_size=100", "search.final.test=false"] + [f"search.{k}={v}" for k, v in search.items()]
    with initialize_config_dir(config_dir=str(config_dir("search")), version_base="1.3"):
        return compose("adans", overrides=overrides)


def test_candidate_job_evaluates_and_builds_the_winner(lenet_checkpoint: Path, data_dir: Path, tmp_path: Path) -> None:
    from lightning_prune.search import job

    identity = "[0.0,0.0,0.0]"
    cfg = _job_cfg(lenet_checkpoint, data_dir, x=identity)
    ref = job.run(cfg)
    ev = job.evaluator(cfg)
    with torch.no_grad():
        direct = 100.0 * float((ev.space.model(ev.inputs).argmax(-1) == ev.targets).float().mean())
    assert ref["accuracy"] == pytest.approx(direct) and ref["accuracy"] > 60.0
    assert ref["accuracy"] == top1(ev.space.model, ev.inputs, ev.targets, 7)
    assert ref["cost"] == ref["base_cost"] == count_cost(LeNet5(num_classes=10), torch.zeros(1, 1, 28, 28)).macs
    cfg = _job_cfg(lenet_checkpoint, data_dir, x="[0.5,0.5,0.5]")
    half = job.run(cfg)
    assert job.evaluator(cfg) is ev  # cached: nothing reloaded
    assert half["cost"] < 0.5 * ref["cost"]
    # The final job builds the real model; measured cost and accuracy agree with the search.
    OmegaConf.update(cfg, "search.mode", "final")
    out = job.final(cfg, ev, np.array([0.5, 0.5, 0.5]), tmp_path)
    assert out["measured_cost"] == out["cost"] == half["cost"]
    assert out["accuracy"] == pytest.approx(half["accuracy"])
    rebuilt = lightning_prune.load_pruned(out["path"])
    assert top1(rebuilt, ev.inputs, ev.targets) == pytest.approx(half["accuracy"])
    # For sweepers that maximise one number (Optuna): x per dimension, the score as a float.
    record = tmp_path / "record.jsonl"
    cfg = _job_cfg(lenet_checkpoint, data_dir, mode="score", reference_accuracy=ref["accuracy"], threshold=50.0,
                   record=record)
    OmegaConf.update(cfg, "search.x", {"x0": 0.5, "x1": 0.5, "x2": 0.5}, force_add=True)
    value = job.run(cfg)
    from lightning_prune.search import Scorer

    assert value == pytest.approx(Scorer(ref["accuracy"], ref["base_cost"], 50.0)(half["accuracy"], half["cost"]))
    assert [json.loads(line)["score"] for line in record.read_text().splitlines()] == [value]
    with pytest.raises(ValueError, match="x0..x2"):
        OmegaConf.update(cfg, "search.x", {"x0": 0.5}, force_add=True, merge=False)
        job.run(cfg)
    with pytest.raises(ValueError, match="reference_accuracy"):
        job.run(_job_cfg(lenet_checkpoint, data_dir, x=identity, mode="score"))
    with pytest.raises(ValueError, match="search.x"):
        job.run(_job_cfg(lenet_checkpoint, data_dir))
    with pytest.raises(ValueError, match="mode"):
        job.run(_job_cfg(lenet_checkpoint, data_dir, x=identity, mode="export"))
    calibrated = job.evaluator(_job_cfg(lenet_checkpoint, data_dir, x=identity, calibration_size=50))
    assert len(calibrated.calibration) == 50 and len(calibrated.inputs) == 300
    assert not torch.equal(calibrated.calibration[:1], calibrated.inputs[:1])  # images after the ranked ones
    with pytest.raises(ValueError, match="search.calibration_size must be a non-negative int"):
        job.evaluator(_job_cfg(lenet_checkpoint, data_dir, x=identity, calibration_size=-1))
    with pytest.raises(ValueError, match=r"search.calibration_size = 100400 images"):
        job.evaluator(_job_cfg(lenet_checkpoint, data_dir, x=identity, calibration_size=100000))


def test_candidate_job_with_a_latency_cost(lenet_checkpoint: Path, data_dir: Path, tmp_path: Path) -> None:
    """search.cost=latency: the job measures the latency model (into the cache folder given),
    predicts every candidate's latency with it, and the final job times the built model."""
    from lightning_prune.search import job

    cache = tmp_path / "latency"
    cfg = _job_cfg(lenet_checkpoint, data_dir, x="[0.0,0.0,0.0]", cost="latency",
                   latency=f"{{batch_size:8,threads:1,grid:2,repeats:2,cache_dir:'{cache}'}}")
    ref = job.run(cfg)
    ev = job.evaluator(cfg)
    assert ref["cost"] == ref["base_cost"] == ev.space.cost_model.full("latency") > 0
    assert len(list(cache.glob("*.json"))) == 1
    out = job.final(cfg, ev, np.array([0.6, 0.6, 0.6]), tmp_path)
    assert 0 < out["cost"] < ref["cost"] and out["measured_cost"] > 0


def test_adans_lenet5_sweep_end_to_end(lenet_checkpoint: Path, data_dir: Path, tmp_path: Path) -> None:
    """The shipped entry point and hparams_search config, one short sweep with the real job."""
    cmd = [sys.executable, "-m", "lightning_prune.search.evaluate", "-m", "hparams_search=adans_lenet5",
           f"search.checkpoint={lenet_checkpoint}", f"data.data_dir={data_dir}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           "search.eval_size=300", "search.rank_size=100", "search.final.test=false", "hydra.sweeper.batch_size=4",
           "hydra.sweeper.iterations=2", "hydra.sweeper.boundary_steps=2", "hydra.sweeper.threshold=50",
           "hydra.sweeper.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["names"] == ["prune:features.0", "prune:features.2", "prune:classifier.1"]
    assert results["final"]["measured_cost"] == results["best_cost"]
    assert results["final"]["accuracy"] == pytest.approx(results["best_accuracy"])
    assert results["best_cost_fraction"] < 1.0
