"""The Hydra stages of ``python -m lightning_prune.archcomp`` on real MNIST, shrunk to a few batches."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_prune import count_cost
from lightning_prune.archcomp import (
    ArchitectureCompressor,
    ArchitectureSampler,
    ConvK,
    build,
    generate,
    load_dataset,
    param_count,
    to_tokens,
)
from lightning_prune.archcomp.generate import ArchitectureRecord, InMemoryDataModule, collect
from lightning_prune.classifier import ImageClassifier
from lightning_prune.data import MNISTDataModule
from lightning_prune.archcomp.pipeline import run
from lightning_prune.configs import config_dir

MNIST = (1, 28, 28)
DATA_DIR = os.environ.get("LP_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
TINY = [
    f"paths.data_dir={DATA_DIR}",
    "data.subset=64",
    "data.val_size=64",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "generate.seeds=[0]",
    "+generate.trainer.limit_train_batches=2",
    "+generate.trainer.limit_val_batches=1",
    "torch_threads=1",
]
SMALL_COMPRESSOR = [
    "compressor.max_len=16",
    "compressor.channels=16",
    "compressor.depth=1",
    "compressor.latent_channels=8",
    "compressor.hidden=16",
    "compressor/optimizer=adam",
    "compressor.optimizer.lr=0.01",
    "compressor.scheduler=null",
]


def config(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(str(config_dir("archcomp")), version_base="1.3"):
        return compose("archcomp", overrides=[f"paths.log_dir={tmp_path}", *TINY, *overrides])


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_generate_multirun_resume_and_collect(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "lightning_prune.archcomp", "-m", "stage=generate", "generate.num_architectures=2",
           "generate.index=0,1", "hydra/launcher=basic", f"paths.log_dir={tmp_path}", *TINY]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "LP_DATA_DIR": DATA_DIR})
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = config(tmp_path, "stage=generate", "generate.num_architectures=2")
    results = Path(cfg.results_dir)
    files = sorted(results.glob("arch_*.json"))
    assert [f.name for f in files] == ["arch_00000.json", "arch_00001.json"]
    sweeps = list((tmp_path / "archcomp" / "multiruns").iterdir())
    assert len(sweeps) == 1 and {p.name for p in sweeps[0].iterdir() if p.is_dir()} >= {"0", "1"}  # two Hydra jobs
    sampler = instantiate(cfg.sampler, input_shape=list(MNIST), num_classes=10)
    for i, path in enumerate(files):
        record = ArchitectureRecord.from_dict(json.loads(path.read_text()))
        assert record.ok and record.seeds == [0] and 0.0 <= record.accuracy <= 1.0
        assert [tuple(t) for t in record.tokens] == [tuple(t) for t in sampler.sample(i).tokens]
        assert record.params == param_count(record.tokens, MNIST)

    mtimes = [f.stat().st_mtime_ns for f in files]
    assert run(cfg) == {"trained": 0, "skipped": 2, "failed": 0}  # resumed: nothing retrained
    assert [f.stat().st_mtime_ns for f in files] == mtimes

    run(config(tmp_path, "stage=collect", "generate.num_architectures=2", "generate.unlabelled=3"))
    records, metadata, unlabelled = load_dataset(cfg.dataset_file)
    assert [r.index for r in records] == [0, 1] and metadata["count"] == 2 and metadata["seeds"] == [0]
    assert len(unlabelled) == 3 and not any(r.ok for r in unlabelled)
    assert all(r.params == param_count(r.tokens, MNIST) for r in unlabelled)
    with pytest.raises(ValueError, match="1 of the 3 architectures are not trained yet: 2"):
        run(config(tmp_path, "stage=collect", "generate.num_architectures=3"))


def write_fixture_dataset(dataset_file: str, folder: Path) -> None:
    """CONV-k variants; the accuracies are made up (a fixture for the fit/compress stages, not a measurement)."""
    i = 0
    for depth in (1, 2, 3):
        for channels in (4, 6, 8, 12):
            tokens = [list(t) for t in to_tokens(ConvK(depth, channels), MNIST)]
            record = ArchitectureRecord(i, tokens, param_count(tokens, MNIST), 0, 0, [0], [0.5 + 0.03 * i], 0.0)
            (folder / f"arch_{i:05d}.json").write_text(json.dumps(record.to_dict()))
            i += 1
    collect(folder, dataset_file, expected=i)


def test_fit_and_compress_stages(tmp_path: Path) -> None:
    fit_cfg = config(tmp_path, "stage=fit", *SMALL_COMPRESSOR, "fit.trainer.max_epochs=60", "fit.datamodule.batch_size=8",
                     "fit.datamodule.val_fraction=0.25")  # fmt: skip
    Path(fit_cfg.results_dir).mkdir(parents=True)
    write_fixture_dataset(fit_cfg.dataset_file, Path(fit_cfg.results_dir))
    metrics = run(fit_cfg)
    assert metrics["train_architectures"] == 9 and metrics["val_architectures"] == 3 and metrics["steps"] == 60
    assert 0 <= metrics["val/acc_mae"] <= 1 and -1 <= metrics["val/params_spearman"] <= 1
    assert json.loads((Path(fit_cfg.dir) / "compressor_metrics.json").read_text())["steps"] == 60
    assert ArchitectureCompressor.load_from_checkpoint(fit_cfg.compressor_ckpt).max_len == 16

    cfg = config(
        tmp_path, "stage=compress", *SMALL_COMPRESSOR, "compress.network.depth=2", "compress.network.channels=8",
        "compress.steps=2", "compress.seeds=[0]", "compress.trainer.max_epochs=1", "compress.in_memory=true",
        "+compress.trainer.limit_train_batches=2", "+compress.trainer.limit_val_batches=1",
        "compress.refit_steps=1", "compress.refit_every=1", "fit.datamodule.batch_size=8",
    )  # fmt: skip
    report = run(cfg)
    assert json.loads(Path(cfg.report_file).read_text())["compression"] == report["compression"]
    original = ConvK(2, 8)
    assert report["original"]["tokens"] == [list(t) for t in to_tokens(original, MNIST)]
    assert report["original"]["params"] == count_cost(original, torch.zeros(1, *MNIST)).params
    tokens = report["compressed"]["tokens"]
    measured = count_cost(build(tokens, MNIST), torch.zeros(1, *MNIST)).params
    assert report["compressed"]["params"] == measured == param_count(tokens, MNIST)
    assert report["compression"] == report["original"]["params"] / measured
    for part in ("original", "compressed"):
        assert len(report[part]["accuracies"]) == 1 and 0 <= report[part]["accuracy"] <= 1
    assert len(report["trajectory"]) == 3
    # The trained compressed network is saved in the lightning-prune format, rebuilt from its tokens.
    import lightning_prune

    path = Path(report["compressed"]["file"])
    assert path == Path(cfg.compressed_file) and report["compressed"]["file_seed"] == 0
    payload = torch.load(path, weights_only=True)
    assert payload["architecture"] == {"_target_": "lightning_prune.archcomp.models.build", "tokens": tokens,
                                       "input_shape": list(MNIST)}
    winner = lightning_prune.load_pruned(path)
    assert count_cost(winner, torch.zeros(1, *MNIST)).params == measured
    assert [list(t) for t in to_tokens(winner, MNIST)] == tokens


def test_failed_training_is_recorded_and_left_out_but_config_errors_raise(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    sampler = ArchitectureSampler(MNIST, 10, length=(2, 6), kernel=(1, 3), stride=(1, 2), padding=(0, 1), channels=(2, 8))
    data = InMemoryDataModule(MNISTDataModule(DATA_DIR, batch_size=32, val_size=64, subset=64))

    def trainer() -> L.Trainer:
        return L.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip

    def broken(net: torch.nn.Module) -> L.LightningModule:
        raise RuntimeError("out of memory (simulated)")

    counts = generate(sampler, [0], tmp_path / "r", data, broken, trainer, seeds=[0], log=lambda _: None)
    assert counts == {"trained": 0, "skipped": 0, "failed": 1}
    record = ArchitectureRecord.from_dict(json.loads((tmp_path / "r" / "arch_00000.json").read_text()))
    assert not record.ok and "out of memory (simulated)" in record.error
    module = functools.partial(ImageClassifier, num_classes=10, optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    assert generate(sampler, [1], tmp_path / "r", data, module, trainer, seeds=[0], log=lambda _: None)["trained"] == 1
    dataset = collect(tmp_path / "r", tmp_path / "d.json", expected=2)
    assert dataset["metadata"]["failed"] == [0] and [r["index"] for r in dataset["architectures"]] == [1]
    with pytest.raises(KeyError, match="val/nope"):  # a configuration error is not recorded per architecture
        generate(sampler, [2], tmp_path / "r", data, module, trainer, seeds=[0], metric="val/nope")
