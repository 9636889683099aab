"""Bad input gives one clear exception: the callbacks, ``load_pruned``, the CLI and the AdaNS
sweeper state.

``CASES`` is the table: every row is ``pytest.param(make, error, words, id=...)`` where
``make(tmp_path)`` writes the bad input (if any) under ``tmp_path`` and returns the call that
must fail, ``error`` is the exact exception type and ``words`` are the strings its message
must contain (``{tmp}`` stands for ``tmp_path``). No message may advise ``weights_only=False``,
and nothing may touch the network (the ``no_network`` fixture fails the test if it does).
"""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

import lightning_prune
from lightning_prune.callbacks import (
    BudgetAwareRegularization,
    DirichletImportance,
    HardPruning,
    RandomPruning,
    SigmoidalBudgetAnnealing,
)
from lightning_prune.models import LeNet5
from lightning_prune.core.surgery import shrink
from lightning_prune.train import optimized_value, run
from tests.bar_helpers import TINY, ForeignModule, tiny_loader, trainer
from tests.conftest import compose_train

Call = Callable[[], Any]
Make = Callable[[Path], Call]


class NetworkTouched(BaseException):
    """Raised by the ``no_network`` fixture (a BaseException, so that no ``except Exception`` hides it)."""


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any download or connection attempt fails the test."""
    import torch.hub
    import torchvision.models._api

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise NetworkTouched(f"network access: {args[:2]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)


# --- load_pruned ----------------------------------------------------------------------------


def _pruned_file(tmp: Path, **entries: Any) -> Path:
    """A real lightning-prune file of a shrunk LeNet-5, with payload ``entries`` replaced."""
    net = LeNet5(num_classes=10)
    keep = torch.ones(net.features[0].out_channels, dtype=torch.bool)
    keep[:2] = False
    shrink(net, {"features.0": keep}, example_input=torch.zeros(1, 1, 28, 28))
    path = tmp / "pruned.pt"
    lightning_prune.save_pruned(net, path, architecture={"_target_": "lightning_prune.models.LeNet5", "num_classes": 10})
    if entries:
        payload = torch.load(path, weights_only=True)
        payload.update(entries)
        torch.save(payload, path)
    return path


def _load(path: Path) -> Call:
    return lambda: lightning_prune.load_pruned(path)


def _write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def _truncated(tmp: Path) -> Path:
    data = _pruned_file(tmp).read_bytes()
    return _write(tmp, "truncated.pt", data[: len(data) // 2])


class _Evil:
    pass


def _pickled_object(tmp: Path) -> Path:
    path = tmp / "object.pt"
    torch.save({"format": "lightning-prune", "version": 1, "payload": _Evil()}, path)
    return path


def _architecture(**architecture: Any) -> Make:
    return lambda tmp: _load(_pruned_file(tmp, architecture=architecture))


LOAD_PRUNED_CASES = [
    pytest.param(lambda tmp: _load(tmp / "missing.pt"), FileNotFoundError, ["load_pruned", "no file", "{tmp}/missing.pt"],
                 id="load_pruned-missing"),
    pytest.param(lambda tmp: _load(tmp), ValueError, ["cannot read {tmp}", "not a file"], id="load_pruned-directory"),
    pytest.param(lambda tmp: _load(_write(tmp, "empty.pt", b"")), ValueError,
                 ["cannot read {tmp}/empty.pt", "empty", "not a lightning-prune file"], id="load_pruned-empty"),
    pytest.param(lambda tmp: _load(_write(tmp, "random.pt", os.urandom(4096))), ValueError,
                 ["cannot read {tmp}/random.pt", "not a lightning-prune file"], id="load_pruned-random-bytes"),
    pytest.param(lambda tmp: _load(_write(tmp, "text.pt", b"hello, world\n")), ValueError,
                 ["cannot read {tmp}/text.pt", "not a lightning-prune file"], id="load_pruned-text"),
    pytest.param(lambda tmp: _load(_truncated(tmp)), ValueError,
                 ["cannot read {tmp}/truncated.pt", "not a lightning-prune file", "truncated"], id="load_pruned-truncated"),
    pytest.param(lambda tmp: _load(_write(tmp, "plain.pkl", pickle.dumps({"format": "lightning-prune"}))), ValueError,
                 ["cannot read {tmp}/plain.pkl", "not a lightning-prune file"], id="load_pruned-plain-pickle"),
    pytest.param(lambda tmp: _load(_pickled_object(tmp)), ValueError,
                 ["cannot read {tmp}/object.pt", "not a lightning-prune file", "other than tensors and plain data"],
                 id="load_pruned-pickled-object"),
    pytest.param(lambda tmp: (torch.save({"weight": torch.ones(2)}, tmp / "other.pt"), _load(tmp / "other.pt"))[1],
                 ValueError, ["cannot read {tmp}/other.pt", "not a lightning-prune file", "save_pruned"],
                 id="load_pruned-not-lightning-prune"),
    pytest.param(lambda tmp: _load(_pruned_file(tmp, version=99)), ValueError, ["{tmp}/pruned.pt", "version 99"],
                 id="load_pruned-version"),
    pytest.param(lambda tmp: _load(_pruned_file(tmp, state_dict=[1, 2])), ValueError,
                 ["{tmp}/pruned.pt", "'state_dict'", "list"], id="load_pruned-state-dict-not-a-mapping"),
    pytest.param(lambda tmp: _load(_pruned_file(tmp, state_dict={"features.0.weight": "zeros"})), ValueError,
                 ["{tmp}/pruned.pt", "'state_dict'['features.0.weight'] must be a tensor"], id="load_pruned-state-dict-values"),
    pytest.param(lambda tmp: _load(_pruned_file(tmp, history=[1])), ValueError,
                 ["{tmp}/pruned.pt", "'history' must be a pruning history"], id="load_pruned-history-type"),
    pytest.param(lambda tmp: _load(_pruned_file(tmp, history={"version": 1, "steps": [{"nope": [0]}],
                                                               "input_shapes": [[1, 1, 28, 28]]})),
                 ValueError, ["{tmp}/pruned.pt", "pruning history does not apply", "nope"], id="load_pruned-history-groups"),
    pytest.param(lambda tmp: _load(_pruned_file(tmp, architecture="LeNet5")), ValueError,
                 ["{tmp}/pruned.pt", "'architecture' must be a mapping"], id="load_pruned-architecture-type"),
    pytest.param(_architecture(_target_="os.system", command="true"), ValueError,
                 ["{tmp}/pruned.pt", "'os.system' is not in"], id="load_pruned-target-os-system"),
    pytest.param(_architecture(_target_="torchvision.models.resnet.partial"), ValueError,
                 ["{tmp}/pruned.pt", "defined in 'functools'"], id="load_pruned-target-reexported"),
    pytest.param(_architecture(_target_="torchvision.models._api.load_state_dict_from_url", url="http://x"), ValueError,
                 ["{tmp}/pruned.pt", "private"], id="load_pruned-target-private"),
    pytest.param(_architecture(_target_="lightning_prune.models.NoSuchNet"), ValueError,
                 ["{tmp}/pruned.pt", "does not name a callable"], id="load_pruned-target-missing"),
    pytest.param(_architecture(_target_="torchvision.models.resnet18", weights="IMAGENET1K_V1"), ValueError,
                 ["{tmp}/pruned.pt", "weights='IMAGENET1K_V1'", "never downloads"], id="load_pruned-weights"),
    pytest.param(_architecture(_target_="torchvision.models.get_model", name="resnet18", weights="DEFAULT"), ValueError,
                 ["{tmp}/pruned.pt", "weights='DEFAULT'", "never downloads"], id="load_pruned-get-model-weights"),
    pytest.param(_architecture(_target_="torchvision.models.resnet18", pretrained=True), ValueError,
                 ["{tmp}/pruned.pt", "pretrained=True", "never downloads"], id="load_pruned-pretrained"),
    pytest.param(_architecture(_target_="torchvision.models.detection.fasterrcnn_resnet50_fpn",
                               weights_backbone="IMAGENET1K_V1"),
                 ValueError, ["{tmp}/pruned.pt", "weights_backbone='IMAGENET1K_V1'"], id="load_pruned-weights-backbone"),
    pytest.param(_architecture(_target_="lightning_prune.models.torchvision_model", name="resnet18",
                               pretrained_backbone=True),
                 ValueError, ["{tmp}/pruned.pt", "pretrained_backbone=True"], id="load_pruned-pretrained-backbone"),
    pytest.param(_architecture(_target_="lightning_prune.models.LeNet5", num_classes=10, depth=3), ValueError,
                 ["{tmp}/pruned.pt", "cannot build", "depth"], id="load_pruned-bad-constructor-argument"),
    pytest.param(_architecture(_target_="lightning_prune.models.LeNet5", num_classes=7), ValueError,
                 ["{tmp}/pruned.pt", "weights do not fit"], id="load_pruned-weights-do-not-fit"),
]


# --- the AdaNS sweeper state --------------------------------------------------------------


def _resume(state_text: str) -> Make:
    """Write ``state_text`` as ``adans_state.json`` and resume a sweep from it (in this process)."""

    def make(tmp: Path) -> Call:
        from hydra_plugins.adans_sweeper.adans_sweeper import STATE_FILE, AdaNSSweeper
        from lightning_prune.search import CompressionSearch, SearchSpace

        path = tmp / STATE_FILE
        path.write_text(state_text)
        sweeper = AdaNSSweeper(sampler="gaussian", batch_size=4, iterations=2, progress=False)
        sweeper.state_path = path
        search = CompressionSearch(SearchSpace.of(kinds=["rate", "rank"]), "gaussian", **sweeper.settings)
        return lambda: sweeper._load(search)

    return make


_RECOVER = ["{tmp}/adans_state.json", "delete {tmp}/adans_state.json to recover", "adans_result.json"]

SWEEPER_CASES = [
    pytest.param(_resume('{"job_idx": 4, "sampler": "gaus'), ValueError, [*_RECOVER, "not valid JSON"],
                 id="adans-state-truncated-json"),
    pytest.param(_resume(""), ValueError, [*_RECOVER, "not valid JSON"], id="adans-state-empty"),
    pytest.param(_resume("[1, 2, 3]"), ValueError, [*_RECOVER, "JSON list, not an object"], id="adans-state-list"),
    pytest.param(_resume('{"job_idx": 4, "sampler": "gaussian", "sampler_options": {}}'), ValueError,
                 [*_RECOVER, "'search' must be an object, got nothing"], id="adans-state-missing-search"),
    pytest.param(_resume('{"job_idx": "4", "sampler": "gaussian", "sampler_options": {}, "search": {}}'), ValueError,
                 [*_RECOVER, "'job_idx' must be an int"], id="adans-state-job-idx-type"),
    pytest.param(_resume('{"job_idx": 4, "sampler": "gaussian", "sampler_options": {}, "search": {"phase": 3}}'),
                 ValueError, [*_RECOVER, "cannot be resumed", "'search' entry does not load"],
                 id="adans-state-search-structure"),
    pytest.param(_resume('{"job_idx": 4, "sampler": "zoom", "sampler_options": {}, "search": {}}'), ValueError,
                 ["{tmp}/adans_state.json", "sampler", "use a new hydra.sweep.dir"], id="adans-state-other-sampler"),
]


# --- the CLI (python -m lightning_prune.train) ------------------------------------------------


def _compose(*overrides: str) -> Make:
    return lambda tmp: lambda: compose_train(list(overrides), tmp)


def _metric(name: str) -> Make:
    return lambda tmp: lambda: optimized_value(compose_train([f"optimized_metric={name}"], tmp),
                                               {"val/acc": 0.9, "macs": 1.0, "params": 2.0})


def _init_from(write: Callable[[Path], None] | None) -> Make:
    """``run`` of the LeNet-5 experiment with ``init_from`` set: it fails before any training."""

    def make(tmp: Path) -> Call:
        path = tmp / "init.ckpt"
        if write is not None:
            write(path)
        cfg = compose_train(["experiment=lenet5_mnist", f"init_from={path}", "logger=csv"], tmp / "out")
        return lambda: run(cfg)

    return make


def _no_validation_split() -> Make:
    """``run`` asked to return ``val/acc`` without a validation split: it fails before any training."""
    return lambda tmp: (lambda cfg: lambda: run(cfg))(compose_train(["experiment=lenet5_mnist", "data.val_size=0"], tmp / "out"))


CLI_CASES = [
    pytest.param(_compose("model=resnet999"), MissingConfigException, ["model/resnet999", "lenet5"],
                 id="cli-unknown-group-option"),
    pytest.param(_compose("trainer.max_epochz=3"), ConfigCompositionException, ["trainer.max_epochz"],
                 id="cli-unknown-key"),
    pytest.param(_metric("val/accuracy"), ValueError, ["optimized_metric", "'val/accuracy' was not logged", "val/acc"],
                 id="cli-optimized-metric-not-logged"),
    pytest.param(_metric("[val/acc,macs]"), ValueError, ["optimized_metric", "a string"],
                 id="cli-optimized-metric-not-a-name"),
    pytest.param(_no_validation_split(), ValueError, ["optimized_metric", "'val/acc' needs a validation split", "data.val_size=0"],
                 id="cli-optimized-metric-without-validation"),
    pytest.param(_init_from(None), FileNotFoundError, ["init_from", "no file", "{tmp}/init.ckpt"], id="cli-init-from-missing"),
    pytest.param(_init_from(lambda p: p.write_bytes(os.urandom(2048))), ValueError,
                 ["init_from", "cannot read {tmp}/init.ckpt", "not a checkpoint or state_dict file"],
                 id="cli-init-from-random-bytes"),
    pytest.param(_init_from(lambda p: p.write_bytes(b"")), ValueError, ["init_from", "{tmp}/init.ckpt", "empty"],
                 id="cli-init-from-empty"),
    pytest.param(_init_from(lambda p: torch.save(torch.ones(3), p)), ValueError,
                 ["init_from", "{tmp}/init.ckpt", "holds a Tensor"], id="cli-init-from-a-tensor"),
    pytest.param(_init_from(lambda p: torch.save(LeNet5(num_classes=3).state_dict(), p)), ValueError,
                 ["init_from", "{tmp}/init.ckpt", "do not fit LeNet5"], id="cli-init-from-other-weights"),
]


# --- callbacks ---
# Constructor arguments are checked at once; what needs the network (widths, the budget, the
# schedule) is checked at setup, before the first training step.


def _construct(factory: Callable[..., Any], **kwargs: Any) -> Make:
    return lambda tmp: lambda: factory(**kwargs)


def _fit(*make_callbacks: Callable[[], Any], max_epochs: int = 3, **trainer_kwargs: Any) -> Make:
    """Fit the tiny foreign module with the callbacks; the table row says how it must fail."""

    def make(tmp: Path) -> Call:
        def call() -> None:
            t = trainer(max_epochs=max_epochs, callbacks=[m() for m in make_callbacks], **trainer_kwargs)
            t.fit(ForeignModule(), tiny_loader())

        return call

    return make


def _bar(**kwargs: Any) -> Callable[[], BudgetAwareRegularization]:
    return lambda: BudgetAwareRegularization(**{"factor": 2, "verbose": False, **kwargs})


def _hard(**kwargs: Any) -> Callable[[], HardPruning]:
    return lambda: HardPruning(**{"at_epoch": 1, "plot": False, "verbose": False, **kwargs})


CALLBACK_CASES: list[Any] = [
    pytest.param(_construct(BudgetAwareRegularization), ValueError, ["budget", "factor"], id="bar-no-budget"),
    pytest.param(_construct(BudgetAwareRegularization, budget=0.5, factor=2), ValueError, ["budget", "factor"],
                 id="bar-budget-and-factor"),
    pytest.param(_construct(BudgetAwareRegularization, budget=1.5), ValueError, ["budget"], id="bar-budget-over-1"),
    pytest.param(_construct(BudgetAwareRegularization, factor=2, cost="flops"), ValueError, ["cost", "'macs'"],
                 id="bar-unknown-cost"),
    pytest.param(_construct(BudgetAwareRegularization, factor=2, lambda_=-1), ValueError, ["lambda_"], id="bar-lambda"),
    pytest.param(_construct(BudgetAwareRegularization, factor=2, margin=1.0), ValueError, ["margin"], id="bar-margin"),
    pytest.param(_construct(BudgetAwareRegularization, factor=2, margin_of="final"), ValueError, ["margin_of"], id="bar-margin-of"),
    pytest.param(_construct(BudgetAwareRegularization, factor=2, cap=0.0), ValueError, ["cap"], id="bar-cap"),
    pytest.param(_construct(BudgetAwareRegularization, factor=2, fill="yes"), TypeError, ["fill"], id="bar-fill"),
    pytest.param(_construct(BudgetAwareRegularization, factor=2, gate_lr=0), ValueError, ["gate_lr"], id="bar-gate-lr"),
    pytest.param(_construct(BudgetAwareRegularization, factor=2, ignore="conv1"), TypeError, ["ignore"],
                 id="bar-ignore-a-string"),
    pytest.param(_construct(BudgetAwareRegularization, factor=2, penalty="l1"), ValueError, ["penalty"], id="bar-penalty"),
    pytest.param(_construct(DirichletImportance, factor=2, estimator="median"), ValueError, ["estimator"],
                 id="dirichlet-estimator"),
    pytest.param(_construct(RandomPruning, factor=2, seed=-1), ValueError, ["seed"], id="random-seed"),
    pytest.param(_construct(SigmoidalBudgetAnnealing, until_epoch=1, from_epoch=1), ValueError, ["until_epoch"],
                 id="annealing-empty-transition"),
    pytest.param(_construct(HardPruning, at_epoch=-1), ValueError, ["at_epoch"], id="hard-negative-epoch"),
    pytest.param(_construct(HardPruning, at_epoch=1, freeze=False), ValueError, ["freeze"], id="hard-no-freeze"),
    pytest.param(_construct(HardPruning, at_epoch=1, widths="4"), TypeError, ["widths"], id="hard-widths-a-string"),
    pytest.param(_construct(HardPruning, at_epoch=1, round_to=0), ValueError, ["round_to", ">= 1"], id="hard-round-to-0"),
    pytest.param(_construct(HardPruning, at_epoch=1, round_to="8"), TypeError, ["round_to", "str"], id="hard-round-to-a-string"),
    pytest.param(_fit(_bar(module="encoder")), ValueError, ["module", "encoder"], id="fit-unknown-module"),
    pytest.param(_fit(_bar(factor=1e4, cost="macs", example_input=TINY)), ValueError, ["budget", "one channel per"],
                 id="fit-unreachable-budget"),
    pytest.param(_fit(_bar(example_input="images")), TypeError, ["example_input"], id="fit-example-a-string"),
    pytest.param(_fit(_hard()), ValueError, ["exactly one channel-selection callback"], id="fit-hard-without-source"),
    pytest.param(_fit(lambda: SigmoidalBudgetAnnealing(until_epoch=1)), ValueError, ["BudgetAwareRegularization"],
                 id="fit-annealing-without-bar"),
    pytest.param(_fit(_bar(), _hard(at_epoch=3)), ValueError, ["at_epoch", "epoch 3", "max_epochs=3"],
                 id="fit-prune-after-the-last-epoch"),
    pytest.param(_fit(_bar(), _hard(at_epoch=0), max_epochs=0), ValueError, ["at_epoch", "max_epochs=0"],
                 id="fit-max-epochs-0"),
    pytest.param(_fit(_bar(), _hard(widths={"conv9": 2})), ValueError, ["widths", "conv9", "conv1, conv2"],
                 id="fit-widths-unknown-group"),
    pytest.param(_fit(_bar(), _hard(widths=[0, 4])), ValueError, ["widths", "1..8", "got 0"], id="fit-widths-zero"),
    pytest.param(_fit(_bar(), _hard(widths=[9, 4])), ValueError, ["widths", "1..8", "got 9"], id="fit-widths-too-wide"),
    pytest.param(_fit(_bar(), _hard(widths=[4])), ValueError, ["widths", "1 numbers for 2 channel groups"],
                 id="fit-widths-too-few"),
    pytest.param(_fit(_bar(factor=4, cost="macs"), _hard(widths=[8, 12])), ValueError, ["widths", "over the budget"],
                 id="fit-widths-over-budget"),
    pytest.param(_fit(_bar(), _hard(widths=[6, 12], round_to=4)), ValueError,
                 ["widths['conv1']", "multiple of round_to=4", "got 6"], id="fit-widths-not-multiples"),
]


CASES = [*LOAD_PRUNED_CASES, *SWEEPER_CASES, *CLI_CASES, *CALLBACK_CASES]
# What torch's own messages say, and ours must not: loading a file with weights_only=False runs its pickle.
FORBIDDEN = ("weights_only=False", "weights_only` set to `False")


@pytest.mark.parametrize(("make", "error", "words"), CASES)
def test_bad_input_raises_one_clear_error(
    make: Make, error: type[BaseException], words: list[str], tmp_path: Path, data_dir: Path, no_network: None
) -> None:
    call = make(tmp_path)
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for word in words:
        assert word.format(tmp=tmp_path) in message, f"{word!r} not in: {message}"
    for advice in FORBIDDEN:
        assert advice not in message


def test_torchvision_builders_never_load_pretrained_weights(tmp_path: Path, no_network: None) -> None:
    """A detection / segmentation builder loads an ImageNet backbone by default: load_pruned
    builds it with no weights at all (the saved state_dict holds them), also through get_model."""
    import torchvision

    net = torchvision.models.segmentation.lraspp_mobilenet_v3_large(num_classes=3, weights_backbone=None)
    for target, extra in [("torchvision.models.segmentation.lraspp_mobilenet_v3_large", {}),
                          ("torchvision.models.get_model", {"name": "lraspp_mobilenet_v3_large"})]:
        path = tmp_path / "lraspp.pt"
        lightning_prune.save_pruned(net, path, architecture={"_target_": target, "num_classes": 3, "weights": None,
                                                             "pretrained": False, **extra})
        loaded = lightning_prune.load_pruned(path)
        for key, value in net.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value)
