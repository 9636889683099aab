"""Real models and real training set-ups: an ``nn.Sequential`` network, no example input, DDP
(``ddp`` and ``ddp_spawn``) through hard pruning, a run that ends before hard pruning, the
generators of the gates, fp16 with a real GradScaler."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_prune
from lightning_prune import attach_gates, build_graph, export, load_pruned, save_pruned, shrink
from lightning_prune.callbacks import (
    BudgetAwareRegularization,
    DirichletImportance,
    HardPruning,
    RandomPruning,
    SigmoidalBudgetAnnealing,
)
from lightning_prune.core.session import generator_states, restore_generators
from lightning_prune.core.cost import count_cost
from lightning_prune.core.gates import FixedMask, HardConcreteGate
from lightning_prune.core.graph import random_masks
from lightning_prune.train import run
from tests.bar_helpers import TINY, ForeignModule, tensor_state, tiny_data, tiny_loader, trainer


def sequential_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4),
    )


class DictBatches(Dataset):
    """Batches that are dicts, the labels first: the example must be found by trying."""

    def __init__(self) -> None:
        self.data = tiny_data(64)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {"label": y, "image": x}


class SequentialModule(L.LightningModule):
    """Like lightning-hydra-template's MNISTLitModule: the network is an nn.Sequential, no
    example_input_array, plain DataLoaders, dict batches."""

    def __init__(self) -> None:
        super().__init__()
        self.net = sequential_net()

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch["image"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


# -- nn.Sequential networks: every public entry point --------------------------------------------

def test_core_entry_points_on_a_sequential_network(tmp_path: Path) -> None:
    net = sequential_net().eval()
    x = torch.randn(3, *TINY)
    graph = build_graph(net, x[:1])
    masks = random_masks(graph, 0.5, torch.Generator().manual_seed(0))
    gates = attach_gates(net, graph, {n: FixedMask(m) for n, m in masks.items()})
    assert not any(isinstance(m, type(gates)) for m in net)  # nothing registered where Sequential.forward looks
    with torch.no_grad():
        masked = net(x)
        small = export(net)
        torch.testing.assert_close(small(x), masked, atol=1e-5, rtol=1e-5)
        save_pruned(net, tmp_path / "small.pt")
        loaded = load_pruned(tmp_path / "small.pt", model=sequential_net())
        torch.testing.assert_close(loaded(x), masked, atol=1e-5, rtol=1e-5)
    assert list(torch.load(tmp_path / "small.pt", weights_only=True)["state_dict"])  # plain tensors
    gates.detach()
    shrink(net, masks, graph=graph)
    assert len(net) == 9 and all(not isinstance(m, nn.Sequential) for m in net)  # no extra child
    with torch.no_grad():
        torch.testing.assert_close(net(x), masked, atol=1e-5, rtol=1e-5)
    fresh = sequential_net()
    lightning_prune.enable_pruned_loading(fresh)
    fresh.load_state_dict(net.state_dict())  # replays the history, then loads
    assert count_cost(fresh.eval(), x[:1]).macs == count_cost(net, x[:1]).macs


def _callbacks(method: str) -> list[Callback]:
    hard = HardPruning(at_epoch=1, plot=False, verbose=False)
    if method == "bar":
        return [BudgetAwareRegularization(factor=3, cost="macs", verbose=False), SigmoidalBudgetAnnealing(until_epoch=1), hard]
    if method == "dirichlet":
        return [DirichletImportance(factor=3, cost="macs", verbose=False), hard]
    return [RandomPruning(factor=3, cost="macs", verbose=False), hard]


@pytest.mark.parametrize("method", ["bar", "dirichlet", "random"])
def test_each_callback_fits_a_sequential_network_without_an_example_input(method: str, tmp_path: Path) -> None:
    L.seed_everything(0)
    module = SequentialModule()
    full = count_cost(sequential_net(), torch.zeros(1, *TINY)).macs
    t = trainer(max_epochs=2, callbacks=_callbacks(method))
    t.fit(module, DataLoader(DictBatches(), batch_size=16, shuffle=True))
    small = export(module)
    assert isinstance(small, nn.Sequential) and len(small) == 9
    assert count_cost(small, torch.zeros(1, *TINY)).macs <= full / 3  # the budget, counted on the shrunk network
    x = torch.randn(4, *TINY)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), module.net.eval()(x))
    save_pruned(module, tmp_path / "small.pt")
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path / "small.pt", model=sequential_net())(x), small(x))


def test_the_first_tensor_the_network_accepts_is_the_example() -> None:
    """A tuple batch whose first tensor is not the input: the example is found by trying."""

    class LabelsFirst(ForeignModule):
        def training_step(self, batch, batch_idx):
            labels, images = batch
            return super().training_step((images, labels), batch_idx)

    data = tiny_data(64)
    loader = DataLoader(list(zip(data.tensors[1], data.tensors[0])), batch_size=16)
    bar = BudgetAwareRegularization(factor=2, verbose=False)
    trainer(max_steps=2, callbacks=[bar]).fit(LabelsFirst(), loader)
    assert bar.graph.input_shapes == ((1, *TINY),) and bar.session.budget.full == 708


# -- DDP through hard pruning --------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "method"), [("ddp", "bar"), ("ddp_spawn", "bar"), ("ddp", "dirichlet")])
def test_ddp_runs_the_whole_schedule_and_resumes(strategy: str, method: str, tmp_path: Path) -> None:
    """2 gloo processes, soft phase -> hard pruning -> shrink -> fine-tuning, no
    find_unused_parameters; resumed from a soft and from a shrunk checkpoint: every rank (and
    the main process of ddp_spawn) ends with the same tensors as the uninterrupted run."""
    script = Path(__file__).parent / "scripts" / "ddp_schedule.py"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, str(script), str(tmp_path), strategy, method], env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    ref = torch.load(tmp_path / "straight-rank0.pt", weights_only=True)
    assert ref["backbone_and_head.conv1.weight"].shape[0] < 8 or ref["backbone_and_head.conv2.weight"].shape[0] < 12
    assert not any("prune_gates" in k for k in ref)  # shrunk: no gates left
    who = ["rank0", "rank1"] + (["main"] if strategy == "ddp_spawn" else [])
    for run in ("straight", "from_soft", "from_shrunk"):
        for name in who:
            state = torch.load(tmp_path / f"{run}-{name}.pt", weights_only=True)
            assert state.keys() == ref.keys(), (run, name)
            for key in ref:
                assert torch.equal(state[key], ref[key]), (run, name, key)


# -- a run that ends before hard pruning ----------------------------------------------------------

class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True


def test_a_run_that_stops_before_hard_pruning_warns_and_export_refuses_it() -> None:
    module = ForeignModule()
    callbacks = [BudgetAwareRegularization(factor=4, cost="macs", example_input=TINY, verbose=False),
                 HardPruning(at_epoch=2, plot=False, verbose=False), StopAfterFirstEpoch()]
    with pytest.warns(UserWarning, match="fit ended in epoch 1 before hard pruning at epoch 2"):
        trainer(max_epochs=4, callbacks=callbacks).fit(module, tiny_loader())
    with pytest.raises(ValueError, match="over its budget .* allow_over_budget=True"):
        export(module)
    over = export(module, allow_over_budget=True)
    assert count_cost(over, torch.zeros(1, *TINY)).macs > callbacks[0].session.budget.target


def test_the_cli_fails_without_a_pruned_file_when_the_run_ends_before_pruning(tmp_path: Path, data_dir: Path) -> None:
    from tests.conftest import compose_train

    cfg = compose_train(["trainer.max_epochs=2", "pruning.prune_epoch=2", "data.subset=256"], tmp_path)  # found before pretraining
    with pytest.raises(ValueError, match="at_epoch: hard pruning at epoch 2 never happens in a run of max_epochs=2"):
        run(cfg)
    assert not list(tmp_path.rglob("pruned_model.pt"))


def test_the_cli_fails_without_a_pruned_file_when_the_run_stops_early(tmp_path: Path, data_dir: Path) -> None:
    from tests.conftest import compose_train

    cfg = compose_train(["trainer.max_epochs=3", "pruning.prune_epoch=2", "data.subset=256", "test=false", "pretrain_epochs=0",
                         "+callbacks.stop._target_=tests.test_reliability.StopAfterFirstEpoch"], tmp_path)
    with pytest.raises(RuntimeError, match="ended in epoch 1 before hard pruning at epoch 2 .* no pruned_model.pt"):
        run(cfg)
    assert not list(tmp_path.rglob("pruned_model.pt"))


# -- the generators the gates draw from ------------------------------------------------------------

def test_generator_states_cover_the_gates_device(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    saved = generator_states(torch.device("cpu"))
    first = torch.rand(4)
    restore_generators(saved)
    torch.testing.assert_close(torch.rand(4), first)
    # Gates on a CUDA device draw from that device's generator: it is saved and restored too.
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.tensor([7]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device, int(state[0]))))
    states = generator_states(torch.device("cuda", 1))
    assert states["cuda"][0] == 1 and calls == [("get", torch.device("cuda", 1))]
    restore_generators(states)
    assert calls[-1] == ("set", 1, 7)
    restore_generators(saved["cpu"])  # checkpoints of earlier versions hold the bare CPU state


# -- fp16 mixed precision with a real GradScaler ----------------------------------------------------

def _gates_after(precision: str | MixedPrecision) -> tuple[dict[str, torch.Tensor], BudgetAwareRegularization]:
    L.seed_everything(0)
    module = ForeignModule(batch_norm=False)
    torch.manual_seed(1)
    bar = BudgetAwareRegularization(factor=4, cost="macs", example_input=TINY, gate_lr=0.05, verbose=False)
    kwargs = {"plugins": [precision]} if isinstance(precision, MixedPrecision) else {"precision": precision}
    trainer(max_steps=6, callbacks=[bar], **kwargs).fit(module, tiny_loader(32, n=256))
    return {k: v.detach().clone() for k, v in module.state_dict().items() if "log_alpha" in k}, bar


def test_fp16_with_a_grad_scaler_trains_the_gates_like_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(HardConcreteGate, "sample", lambda self, noise=None: self.deterministic())
    full, _ = _gates_after("32-true")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows at first: those steps are skipped
    half, bar = _gates_after(MixedPrecision("16-mixed", "cpu", scaler=scaler))
    assert scaler.get_scale() < 2.0**40 and bar.session.skipped_steps >= 1  # the scaler's skips are the gates' skips
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    half2, bar2 = _gates_after(MixedPrecision("16-mixed", "cpu", scaler=scaler2))
    assert bar2.session.skipped_steps == 0
    for key in full:
        assert torch.isfinite(half[key]).all() and torch.isfinite(half2[key]).all()
        torch.testing.assert_close(half2[key], full[key], atol=2e-2, rtol=0)  # unscaled: same steps as fp32


# -- loading checkpoints of a shrunk network ------------------------------------------------------

def test_checkpoints_of_a_shrunk_network_load(tmp_path: Path) -> None:
    from lightning_prune.classifier import ImageClassifier
    from tests.bar_helpers import TinyCNN

    L.seed_everything(0)
    module = ImageClassifier(TinyCNN(), 4, optimizer=torch.optim.Adam)
    callbacks = [RandomPruning(factor=3, cost="macs", example_input=TINY, verbose=False),
                 HardPruning(at_epoch=1, plot=False, verbose=False)]
    t = trainer(max_epochs=2, callbacks=callbacks, enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(module, tiny_loader(16, n=64))
    ckpt = t.checkpoint_callback.best_model_path
    loaded = ImageClassifier.load_from_checkpoint(ckpt, net=TinyCNN(), num_classes=4, optimizer=torch.optim.Adam)
    x = torch.randn(4, *TINY)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), module.eval()(x))
    foreign = lightning_prune.load_checkpoint(ForeignModule(), ckpt_of_foreign(tmp_path))
    assert foreign.backbone_and_head.conv1.out_channels < 8 or foreign.backbone_and_head.conv2.out_channels < 12
    with pytest.raises(RuntimeError, match="size mismatch"):  # what Lightning's own loading does with it
        ForeignModule.load_from_checkpoint(ckpt_of_foreign(tmp_path))


def ckpt_of_foreign(folder: Path) -> str:
    """A checkpoint of ForeignModule taken after shrinking (made once per folder)."""
    path = folder / "foreign.ckpt"
    if not path.exists():
        L.seed_everything(0)
        callbacks = [RandomPruning(factor=3, cost="macs", example_input=TINY, verbose=False),
                     HardPruning(at_epoch=1, plot=False, verbose=False)]
        t = trainer(max_epochs=2, callbacks=callbacks)
        t.fit(ForeignModule(), tiny_loader(16, n=64))
        t.save_checkpoint(path)
    return str(path)


def test_resume_of_a_masked_hard_phase_reaches_the_same_end_state(tmp_path: Path) -> None:
    """HardPruning(shrink=False): the checkpoint holds fixed masks; resuming re-attaches them."""
    from tests.bar_helpers import assert_resumes_to_the_same_state

    def callbacks():
        return [BudgetAwareRegularization(factor=3, cost="volume", example_input=TINY, verbose=False),
                HardPruning(at_epoch=2, shrink=False, plot=False, verbose=False)]

    straight = assert_resumes_to_the_same_state(tmp_path, callbacks)
    masks = {k: v for k, v in straight.state_dict().items() if k.endswith(".mask")}
    assert masks and any(not bool(m.all()) for m in masks.values())  # masked, not shrunk
    assert straight.backbone_and_head.conv1.out_channels == 8
