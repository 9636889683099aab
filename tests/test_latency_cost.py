"""Latency as a cost: the latency model's interpolation (golden values), its measurement and
disk cache (hit, miss, key, corrupt file), the checks that refuse a table measured elsewhere,
and a latency budget through the session, BAR and random pruning, HardPruning and export."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_prune.core.cost.latency_measure as latency_module
from lightning_prune import PruningSession, build_graph, export, random_masks
from lightning_prune.callbacks import BudgetAwareRegularization, HardPruning, RandomPruning
from lightning_prune.core.cost import CostModel, LatencyTable, LayerTiming
from lightning_prune.core.cost.latency_measure import CALIBRATION_FRACTIONS, measure_latency
from lightning_prune.methods import RandomChoice
from lightning_prune.models import CifarResNet
from tests.core_zoo import TEST_KEY, macs_table, one_thread  # noqa: F401  (one_thread: autouse, one intra-op thread)

INPUT = (3, 16, 16)


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10),
    )


@pytest.mark.parametrize("residual", ["tied", "mixed"])
def test_a_bilinear_timing_is_reproduced_exactly(residual: str) -> None:
    """Timings equal to each layer's MACs (bilinear in its kept widths) make the latency equal
    the MAC count, exactly for masks (including emptied mixed branches) and for expectations."""
    graph = build_graph(CifarResNet(20), torch.zeros(1, 3, 32, 32), residual=residual)
    model = CostModel(graph, latency=macs_table(graph))
    generator = torch.Generator().manual_seed(0)
    emptied = 0
    for seed in range(6):
        masks = random_masks(graph, 0.3 + 0.1 * seed, generator=generator)
        if residual == "mixed" and seed % 2:
            branch = graph.branch_names[seed % len(graph.branch_names)]
            masks[branch] = torch.zeros_like(masks[branch])
            emptied += 1
        assert model.exact(masks, "latency") == model.exact(masks, "macs")
    probs = {n: torch.rand(g.size, dtype=torch.float64, generator=generator) for n, g in graph.groups.items()}
    assert float(model.expected(probs, "latency")) == pytest.approx(float(model.expected(probs, "macs")), rel=1e-12)
    assert model.full("latency") == model.full("macs")
    assert emptied == (3 if residual == "mixed" else 0)


def test_scatter_volume_counts_the_pruned_mixed_blocks_only() -> None:
    """The scattered volume of a mixed network: 0 with every channel kept (nothing is
    scattered); with one block's branch pruned, that block's stream channels x positions."""
    graph = build_graph(CifarResNet(20), torch.zeros(1, 3, 32, 32), residual="mixed")
    model = CostModel(graph)
    assert model.scatter_volume({}) == 0
    branch = graph.groups[graph.branch_names[0]]
    stream_size = graph.groups[branch.stream].size
    positions = max(graph.layers[m.module].spatial for m in branch.members)
    masks = {branch.name: torch.arange(branch.size) > 0}
    assert model.scatter_volume(masks) == stream_size * positions
    assert model.scatter_volume({branch.stream: torch.arange(stream_size) > 0}) > 0  # every block of that stream


def test_interpolation_golden_values_and_volume_term() -> None:
    """Between grid points the timing is interpolated bilinearly (golden values by hand), and
    the fitted rest adds offset + per_volume x volume."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 16, 10))
    graph = build_graph(net, torch.zeros(1, 3, 4, 4))
    (group,) = [n for n, g in graph.groups.items() if g.size == 8]
    first = LayerTiming((3,), (0, 1, 4, 8), ((0.0, 10.0, 40.0, 100.0),))  # out 8 -> 100 ns, not linear
    second = LayerTiming((0, 1, 4, 8), (4,), ((0.0,), (7.0,), (16.0,), (40.0,)))
    # the linear layer reads the other group's channels x 16 positions: give it a flat timing
    names = [n for n, layer in graph.layers.items() if layer.kind != "norm"]
    last = LayerTiming((0, 64), (10,), ((0.0,), (50.0,)))
    table = LatencyTable(TEST_KEY, dict(zip(names, (first, second, last))), 1000.0, 0.5, 0.0, {}, {})
    model = CostModel(graph, latency=table)
    keep = {group: torch.arange(8) < 6}  # 6 channels: halfway between the grid points 4 and 8
    volume = model.exact(keep, "volume")
    expected = 1000.0 + (40.0 + 0.5 * 60.0) + (16.0 + 0.5 * 24.0) + 50.0 + 0.5 * volume
    assert model.exact(keep, "latency") == int(expected)
    timed_only = CostModel(graph, latency=LatencyTable(TEST_KEY, table.layers, 0.0, 0.0, 0.0, {}, {}))
    per_layer = timed_only.per_layer(keep, "latency")
    assert per_layer[names[0]] == 70 and per_layer[names[1]] == 28 and per_layer[names[2]] == 50


def test_a_cost_model_refuses_latency_without_a_table_and_a_table_of_another_network() -> None:
    graph = build_graph(small_net(), torch.zeros(1, *INPUT))
    with pytest.raises(ValueError, match="cost 'latency' needs a latency model"):
        CostModel(graph).full("latency")
    other = build_graph(CifarResNet(20), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="latency: the latency model has no timing of layer"):
        CostModel(graph, latency=macs_table(other))
    with pytest.raises(TypeError, match="latency must be a LatencyTable"):
        CostModel(graph, latency={"batch_size": 4})


def test_measure_latency_caches_by_key(tmp_path, monkeypatch) -> None:
    """The first measurement writes one cache file named by its key; the same network and key
    read it back without timing anything; another batch size is a miss (a new file)."""
    net = small_net()
    graph = build_graph(net, torch.zeros(1, *INPUT))
    table = measure_latency(net, graph, batch_size=4, threads=1, grid=3, repeats=2, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("*.json")
    stored = json.loads(cache_file.read_text())
    assert stored["key"] == {
        "device": latency_module.device_name("cpu"), "device_type": "cpu", "torch": torch.__version__, "dtype": "float32",
        "threads": 1, "batch_size": 4, "channels_last": True,
    }
    assert set(table.layers) == {"0", "3", "8"}
    assert table.layers["3"].cin == (0, 1, 4, 8) and table.layers["3"].out == (0, 1, 6, 12)
    assert all(v > 0 for row in table.layers["3"].ns[1:] for v in row[1:])
    assert set(table.measured) == {f"{f:g}" for f in CALIBRATION_FRACTIONS} and all(v > 0 for v in table.measured.values())
    assert table.per_volume >= 0 and table.per_scatter == 0

    def no_timing(*args, **kwargs):
        raise AssertionError("measured although cached")

    monkeypatch.setattr(latency_module, "_time_layer", no_timing)
    monkeypatch.setattr(latency_module, "_calibrate", no_timing)
    again = measure_latency(copy.deepcopy(net), graph, batch_size=4, threads=1, grid=3, repeats=2, cache_dir=tmp_path)
    assert again == table
    with pytest.raises(AssertionError, match="measured although cached"):
        measure_latency(net, graph, batch_size=8, threads=1, grid=3, repeats=2, cache_dir=tmp_path)
    assert LatencyTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table


def test_a_corrupt_cache_file_and_a_bad_table_are_clear_errors(tmp_path) -> None:
    net = small_net()
    graph = build_graph(net, torch.zeros(1, *INPUT))
    measure_latency(net, graph, batch_size=2, threads=1, grid=2, repeats=1, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("*.json")
    cache_file.write_text("{not json")
    with pytest.raises(ValueError, match=f"latency cache {cache_file}: unreadable"):
        measure_latency(net, graph, batch_size=2, threads=1, grid=2, repeats=1, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="latency: not a latency table"):
        LatencyTable.from_dict({"key": {}, "layers": {}})
    with pytest.raises(ValueError, match="batch_size"):
        measure_latency(net, graph, batch_size=0, cache_dir=tmp_path)


def test_a_table_measured_in_another_dtype_is_refused(tmp_path) -> None:
    net = small_net()
    graph = build_graph(net, torch.zeros(1, *INPUT))
    table = measure_latency(net, graph, batch_size=2, threads=1, grid=2, repeats=1, cache_dir=tmp_path)
    session = PruningSession(net.double(), RandomChoice(), factor=2, cost="latency", latency=table, register=False)
    with pytest.raises(ValueError, match=r"latency: the latency model was measured on cpu .*float32.*the network is on cpu, float64"):
        session.trace(torch.zeros(1, *INPUT, dtype=torch.float64))


def test_a_table_measured_on_another_device_is_refused() -> None:
    net = small_net()
    graph = build_graph(net, torch.zeros(1, *INPUT))
    table = macs_table(graph)
    on_gpu = LatencyTable(
        dataclasses.replace(table.key, device="cuda: some GPU", device_type="cuda"), table.layers, 0.0, 0.0, 0.0, {}, {}
    )
    session = PruningSession(net, RandomChoice(), factor=2, cost="latency", latency=on_gpu, register=False)
    with pytest.raises(ValueError, match=r"latency: the latency model was measured on cuda \(cuda: some GPU\).*the network is on cpu"):
        session.trace(torch.zeros(1, *INPUT))


def test_latency_options_are_checked_at_the_boundary() -> None:
    with pytest.raises(ValueError, match="latency: cost='latency' needs the batch size"):
        PruningSession(small_net(), RandomChoice(), factor=2, cost="latency", register=False)
    with pytest.raises(ValueError, match="latency: a latency model is used only with cost='latency'"):
        PruningSession(small_net(), RandomChoice(), factor=2, cost="macs", latency={"batch_size": 4}, register=False)
    with pytest.raises(ValueError, match="latency: unknown option 'batch'"):
        RandomPruning(factor=2, cost="latency", latency={"batch": 4})
    with pytest.raises(ValueError, match="cost must be one of 'volume', 'macs', 'params', 'latency'"):
        RandomPruning(factor=2, cost="time")


def test_trace_measures_the_table_with_the_given_options(monkeypatch) -> None:
    """With options, trace measures the latency model with them (here a stand-in measurement, so
    that the budget does not depend on this machine's noise) and budgets its prediction."""
    import lightning_prune.core.session as session_module

    calls = []

    def stand_in(network, graph, **options):
        calls.append(options)
        return macs_table(graph)

    monkeypatch.setattr(session_module, "measure_latency", stand_in)
    options = {"batch_size": 4, "threads": 1, "grid": 2, "repeats": 1}
    session = PruningSession(small_net(), RandomChoice(seed=1), factor=4, cost="latency", register=False, latency=options)
    session.trace(torch.zeros(1, *INPUT))
    assert calls == [options]
    assert session.budget.full == session.cost_model.full("latency") == session.cost_model.full("macs")
    assert session.cost_model.exact(session.keep_masks(), "latency") <= session.budget.full / 4


def test_measured_layer_timings_do_not_fall_as_widths_grow(tmp_path) -> None:
    net = small_net()
    table = measure_latency(net, build_graph(net, torch.zeros(1, *INPUT)), batch_size=4, threads=1, grid=3, repeats=1,
                            cache_dir=tmp_path)
    for timing in table.layers.values():
        ns = torch.tensor(timing.ns)
        assert bool((ns.diff(dim=0) >= 0).all()) and bool((ns.diff(dim=1) >= 0).all())


def test_session_prunes_under_a_latency_budget_and_resumes_with_its_table() -> None:
    net = small_net()
    graph = build_graph(net, torch.zeros(1, *INPUT))
    table = macs_table(graph, per_volume=3.0)
    session = PruningSession(net, RandomChoice(seed=1), factor=3, cost="latency", latency=table, register=False)
    session.trace(torch.zeros(1, *INPUT))
    full = session.budget.full
    assert full == CostModel(graph, latency=table).full("latency")
    state = session.state_dict()
    masks = session.keep_masks()
    predicted = session.cost_model.exact(masks, "latency")
    assert predicted <= session.budget.target
    with pytest.raises(ValueError, match="it was not hard-pruned"):
        export(net)
    session.harden(masks)
    assert session.current_cost() == predicted  # the shrunk graph, same prediction
    assert export(net) is not None  # hardened: the recorded prediction is under the budget
    # a resumed run uses the table in its checkpoint, not one measured again
    other_table = macs_table(graph, per_volume=5.0)
    other = PruningSession(small_net(), RandomChoice(seed=1), factor=3, cost="latency", latency=other_table, register=False)
    other.trace(torch.zeros(1, *INPUT))
    assert other.budget.full != full
    other.load_state_dict(state)
    assert other.latency == table and other.budget.full == full
    assert other.cost_model.exact(masks, "latency") == predicted


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = small_net()
        self.example_input_array = torch.zeros(1, *INPUT)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("method", ["bar", "random"])
def test_a_latency_budget_through_the_callbacks(tmp_path, method: str) -> None:
    """BAR and random pruning with cost='latency' (a table whose timings are MACs, so the budget
    does not depend on this machine's noise): HardPruning keeps the predicted latency under
    the budget and reports the exported network's measured latency next to it."""
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, *INPUT), torch.randint(0, 10, (32,)))
    # a worker process: its iterator cannot be copied, so HardPruning's timing of the exported
    # network must not copy anything that reaches the trainer (BAR's distillation hook did)
    loader = torch.utils.data.DataLoader(data, batch_size=8, num_workers=1)
    table = macs_table(build_graph(small_net(), torch.zeros(1, *INPUT)), per_volume=2.0)
    extra = {"distillation": True} if method == "bar" else {}
    pruning = (BudgetAwareRegularization if method == "bar" else RandomPruning)(
        factor=2, cost="latency", latency=table, verbose=False, **extra
    )
    hard = HardPruning(at_epoch=1, plot=False, verbose=False)
    trainer = L.Trainer(
        max_epochs=2, callbacks=[pruning, hard], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    module = Classifier()
    trainer.fit(module, loader)
    report = hard.latency
    assert report is not None and report["predicted_ms"] <= report["budget_ms"]
    assert report["measured_ms"] > 0
    assert f"measured {report['measured_ms']:.2f} ms" in hard.summary["line"]
    dense_ms = pruning.session.budget.full / 1e6
    assert report["budget_ms"] == pytest.approx(dense_ms / 2)
    exported = export(module.net)
    assert sum(p.numel() for p in exported.parameters()) < sum(p.numel() for p in small_net().parameters())
    assert not exported._forward_hooks  # BAR's distillation hook ends with the soft phase


def _fit_with_measured_ratios(tmp_path, monkeypatch, ratios: list[float], **hard_args) -> tuple[HardPruning, RandomPruning, list]:
    """Random pruning at a latency budget of 1/2 whose measurements (pruned / dense) are
    ``ratios``, one per timing: HardPruning narrows the masks while they are over 0.5."""
    import lightning_prune.callbacks.hard_pruning as hard_module

    timed_sizes = []

    def scripted(networks, table, example, repeats=7):
        assert set(networks) == {"dense", "pruned"}  # timed together, in their inference form
        timed_sizes.append(sum(p.numel() for p in networks["pruned"].parameters()))
        return {"dense": 1e6, "pruned": 1e6 * ratios[min(len(timed_sizes), len(ratios)) - 1]}

    monkeypatch.setattr(hard_module, "time_network", scripted)
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, *INPUT), torch.randint(0, 10, (16,)))
    table = macs_table(build_graph(small_net(), torch.zeros(1, *INPUT)))
    pruning = RandomPruning(factor=2, cost="latency", latency=table, verbose=False)
    hard = HardPruning(at_epoch=1, plot=False, **{"verbose": True, **hard_args})
    trainer = L.Trainer(max_epochs=2, callbacks=[pruning, hard], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=8))
    return hard, pruning, timed_sizes


def test_hard_pruning_narrows_the_masks_until_the_measured_latency_meets_the_budget(tmp_path, monkeypatch) -> None:
    hard, pruning, sizes = _fit_with_measured_ratios(tmp_path, monkeypatch, [0.9, 0.45])
    rounds = hard.latency["rounds"]
    assert [r["ratio"] for r in rounds] == [0.9, 0.45] and len(sizes) == 2 and sizes[1] < sizes[0]
    assert rounds[0]["fraction"] == 0.5 and rounds[1]["fraction"] == pytest.approx(0.5 * 0.5 / 0.9)
    full = pruning.session.budget.full
    assert hard.latency["predicted_ms"] * 1e6 <= 0.5 * 0.5 / 0.9 * full  # chosen under the narrowed target
    assert pruning.session.budget.fraction == 0.5 and hard.latency["budget_ms"] == pytest.approx(full / 2e6)  # the budget is back
    assert hard.latency["measured_ratio"] == 0.45 and "chosen again 1 time(s)" in hard.summary["line"]


def test_a_measurement_still_over_the_budget_after_every_round_is_a_warning(tmp_path, monkeypatch) -> None:
    with pytest.warns(UserWarning, match=r"measured 0.600 of the dense network's latency, over the budget's 0.500, after 2 narrowed"):
        hard, _, sizes = _fit_with_measured_ratios(tmp_path, monkeypatch, [0.6], latency_rounds=2)
    assert len(hard.latency["rounds"]) == 3 and len(sizes) == 3
    hard, _, sizes = _fit_with_measured_ratios(tmp_path, monkeypatch, [0.6], latency_rounds=0, verbose=False)
    assert len(hard.latency["rounds"]) == 1 and hard.latency["measured_ratio"] == 0.6  # measured and reported only
    with pytest.raises(ValueError, match="latency_rounds"):
        HardPruning(at_epoch=1, latency_rounds=-1)


@pytest.mark.slow
def test_ddp_ranks_share_the_latency_model_rank_0_measured(tmp_path) -> None:
    """Two gloo processes, the latency model measured at trace time: one cache file (rank 0's
    measurement), the same table and the same pruned tensors on both ranks."""
    script = Path(__file__).parent / "scripts" / "ddp_latency.py"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["table"] == ranks[1]["table"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    assert ranks[0]["tensors"].keys() == ranks[1]["tensors"].keys()
    for key, value in ranks[0]["tensors"].items():
        assert torch.equal(value, ranks[1]["tensors"][key]), key
