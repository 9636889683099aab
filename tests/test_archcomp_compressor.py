"""The compressor LightningModule of Ashok, Architecture Compression (arXiv:1902.03326), Sec. 4: encoder/decoder, regressors, padding and masks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_prune import count_cost
from lightning_prune.archcomp import (
    ArchitectureCompressor,
    ArchitectureDataModule,
    ConvK,
    InvalidArchitecture,
    Token,
    compress,
    param_count,
    to_tokens,
)
from lightning_prune.archcomp.generate import ArchitectureRecord, collect

MNIST = (1, 28, 28)
SHORT = [[1, 3, 8, 1, 1], [4, 0, 8, 0, 0], [8, 0, 10, 0, 0]]
MEDIUM = [[1, 5, 6, 2, 2], [3, 0, 6, 0, 0], [4, 0, 6, 0, 0], [2, 2, 6, 2, 0], [6, 0, 6, 0, 3], [8, 0, 32, 0, 0], [5, 0, 32, 0, 0], [8, 0, 10, 0, 0]]  # fmt: skip
LONG = [list(t) for t in to_tokens(ConvK(depth=4, channels=12), MNIST)]  # 13 layers


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is faster than two, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_compressor(**kwargs: object) -> ArchitectureCompressor:
    torch.manual_seed(0)
    args = dict(
        max_len=16, param_mean=9.0, param_std=2.0, param_floor=-4.0,
        channels=32, depth=2, blocks=1, latent_channels=8, hidden=32,
    )  # fmt: skip
    args.update(kwargs)
    return ArchitectureCompressor(**args)  # type: ignore[arg-type]


def batch_of(compressor: ArchitectureCompressor, seqs: list[list[list[int]]], acc: list[float], params: list[float]) -> dict:
    tokens, mask = compressor.pad(seqs)
    return {"tokens": tokens, "mask": mask, "accuracy": torch.tensor(acc), "params": torch.tensor(params)}


def test_different_lengths_in_one_batch_match_single_encodings() -> None:
    model = make_compressor().eval()
    tokens, mask = model.pad([SHORT, MEDIUM, LONG])
    assert mask.sum(1).tolist() == [3, 8, 13]
    with torch.no_grad():
        y = model.encode(tokens, mask)
        assert y.shape == (3, model.embedding_dim) == (3, 8 * 16 // 4)
        for i, seq in enumerate([SHORT, MEDIUM, LONG]):
            single = model.encode(*model.pad([seq]))
            torch.testing.assert_close(y[i : i + 1], single)
        assert model.decode(y).shape == (3, 5, 16)


def test_padded_positions_are_masked_out() -> None:
    model = make_compressor().eval()
    tokens, mask = model.pad([SHORT])
    junk = tokens.clone()
    junk[0, 3:] = torch.randint(1, 9, junk[0, 3:].shape)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(junk, mask), model.encode(tokens, mask))
        assert not torch.allclose(model.encode(junk, torch.ones_like(mask)), model.encode(tokens, mask))


def test_too_long_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match="max_len=16"):
        make_compressor().pad([LONG + LONG])


def test_joint_loss_matches_eq15_and_weights() -> None:
    model = make_compressor(lambda_acc=2.0, lambda_params=0.5)
    batch = batch_of(model, [SHORT, MEDIUM], [0.9, 0.3], [1e4, 2e5])
    parts = model.losses(batch)
    torch.testing.assert_close(parts["loss"], parts["loss_d"] + 2.0 * parts["loss_a"] + 0.5 * parts["loss_p"])
    torch.testing.assert_close(parts["loss_d"], F.mse_loss(parts["x_hat"], model.features(batch["tokens"])))
    torch.testing.assert_close(parts["loss_a"], (parts["accuracy"] - batch["accuracy"]).abs().mean())
    z = (torch.log(batch["params"]) - 9.0) / 2.0
    torch.testing.assert_close(parts["loss_p"], F.huber_loss(parts["params_z"], z, delta=1.0))
    assert ((parts["accuracy"] > 0) & (parts["accuracy"] < 1)).all() and (parts["params_z"] >= -4.0).all()
    batch["accuracy_weight"] = torch.tensor([1.0, 0.0])  # accuracy of the second one unknown
    torch.testing.assert_close(model.losses(batch)["loss_a"], (parts["accuracy"][0] - 0.9).abs())


def test_features_roundtrip_and_padding_is_zero() -> None:
    model = make_compressor()
    tokens, mask = model.pad([SHORT, LONG])
    x = model.features(tokens)
    assert (x[0, :, 3:] == 0).all()
    assert model.tokens_from_features(x) == [SHORT, LONG]


@pytest.fixture(scope="module")
def trained() -> tuple[ArchitectureCompressor, dict, list]:
    """A compressor fitted to three architectures of different lengths (repeated: BatchNorm needs a batch)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = make_compressor()
    seqs = [SHORT, MEDIUM, LONG] * 8
    batch = batch_of(model, seqs, [0.95, 0.4, 0.7] * 8, [4e3, 2e4, 6e4] * 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=150)
    model.first_loss = model.losses(batch)["loss"].item()
    for _ in range(150):
        opt.zero_grad()
        model.losses(batch)["loss"].backward()
        opt.step()
        sched.step()
    with torch.no_grad():  # BatchNorm running statistics of the final weights
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.reset_running_stats()
                m.momentum = None
        model.losses(batch)
    torch.set_num_threads(threads)
    return model.eval(), batch, seqs


def test_overfits_a_few_architectures_of_different_lengths(trained: tuple) -> None:
    """Encoder, decoder and regressors can learn: the three sequences come back."""
    model, batch, seqs = trained
    with torch.no_grad():
        parts = model.losses(batch)
    assert parts["loss"].item() < 0.01 * model.first_loss
    decoded = model.tokens_from_features(parts["x_hat"])
    for got, want in zip(decoded, seqs):  # every layer's type, kernel, stride, padding; channels within 10%
        assert [(t, k, s, p) for t, k, _, s, p in got] == [(t, k, s, p) for t, k, _, s, p in want]
        assert all(abs(a[2] - b[2]) <= 0.1 * b[2] for a, b in zip(got, want))
    quality = model.reconstruction(parts["x_hat"], batch["tokens"], batch["mask"])
    assert quality["types_exact"] == 1.0 and quality["channels_rel_err"] < 0.05
    torch.testing.assert_close(parts["accuracy"], batch["accuracy"], atol=0.02, rtol=0)
    torch.testing.assert_close(parts["params_z"], model.params_to_z(batch["params"]), atol=0.05, rtol=0)


def test_compress_returns_a_trainable_network_matching_its_tokens(trained: tuple) -> None:
    model, _, _ = trained
    result = compress(model, LONG, MNIST, 10, steps=3, lr=0.05, params_target=1e3, lam=5.0)
    assert len(result.trajectory) == 4 and result.step == 3
    assert result.trajectory[1].loss < result.trajectory[0].loss  # descending L_c
    measured = count_cost(result.net, torch.zeros(1, *MNIST)).params
    assert measured == result.params == param_count(result.tokens, MNIST)
    assert result.original_params == param_count(LONG, MNIST) and result.ratio == result.original_params / result.params
    assert result.tokens[-1] == Token(8, 0, 10, 0, 0)
    x, y = torch.randn(8, *MNIST), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in result.net.parameters()]
    opt = torch.optim.SGD(result.net.parameters(), lr=0.1)
    loss = F.cross_entropy(result.net(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, result.net.parameters()))


def test_compress_without_steps_decodes_the_original_structure(trained: tuple) -> None:
    model, _, _ = trained
    result = compress(model, MEDIUM, MNIST, 10, steps=0)
    assert [t.t for t in result.tokens] == [row[0] for row in MEDIUM]
    assert [t.k for t in result.tokens] == [row[1] for row in MEDIUM]


def test_compress_refit_leaves_the_compressor_unchanged(trained: tuple) -> None:
    model, batch, _ = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refit_batch = {**batch, "accuracy_weight": torch.ones(len(batch["mask"]))}
    result = compress(model, SHORT, MNIST, 10, steps=4, lr=0.05, original_accuracy=0.95,
                      refit_data=[refit_batch], refit_steps=2, refit_every=2, refit_lr=1e-3)  # fmt: skip
    assert len(result.trajectory) == 5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compress_rejects_when_nothing_decodes() -> None:
    model = make_compressor().eval()
    with torch.no_grad():  # the decoder says "no layer" everywhere
        model.decoder.head.weight.zero_()
        model.decoder.head.bias.copy_(torch.tensor([-5.0, 0, 0, 0, 0]))
    with pytest.raises(InvalidArchitecture, match="no step decoded to a valid network"):
        compress(model, SHORT, MNIST, 10, steps=1)


def test_compress_argument_validation() -> None:
    model = make_compressor()
    with pytest.raises(ValueError, match="steps"):
        compress(model, SHORT, MNIST, 10, steps=-1)
    with pytest.raises(ValueError, match="refit_data is required"):
        compress(model, SHORT, MNIST, 10, refit_steps=3)
    with pytest.raises(ValueError, match="accuracy_target"):
        compress(model, SHORT, MNIST, 10, accuracy_target=1.5)
    with pytest.raises(TypeError, match="compressor"):
        compress(torch.nn.Linear(2, 2), SHORT, MNIST, 10)  # type: ignore[arg-type]


def write_dataset(path: Path, n: int = 12) -> Path:
    results = path / "results"
    for i in range(n):
        seq = [SHORT, MEDIUM, LONG][i % 3]
        # a fixture, not a measurement: accuracies are made up for the datamodule test
        record = ArchitectureRecord(i, seq, 1000 * (i + 1), 0, 0, [0], [0.1 + 0.05 * i], 0.0)
        (results / f"arch_{i:05d}.json").parent.mkdir(parents=True, exist_ok=True)
        (results / f"arch_{i:05d}.json").write_text(json.dumps(record.to_dict()))
    collect(results, path / "dataset.json", expected=n)
    return path / "dataset.json"


def test_datamodule_split_statistics_and_lightning_fit(tmp_path: Path) -> None:
    dm = ArchitectureDataModule(write_dataset(tmp_path), max_len=16, batch_size=4, val_fraction=0.25, seed=0)
    stats = dm.statistics()
    assert len(dm.train_records) == 9 and len(dm.val_records) == 3  # type: ignore[arg-type]
    assert {r.index for r in dm.train_records} | {r.index for r in dm.val_records} == set(range(12))  # type: ignore[union-attr]
    logs = torch.log(torch.tensor([float(r.params) for r in dm.train_records]))  # type: ignore[union-attr]
    assert stats["param_mean"] == pytest.approx(logs.mean().item(), rel=1e-5)
    assert stats["param_std"] == pytest.approx(logs.std(unbiased=False).item(), rel=1e-5)
    assert stats["param_floor"] == pytest.approx(((logs.min() - logs.mean()) / logs.std(unbiased=False)).item() - 1, rel=1e-5)
    model = ArchitectureCompressor(**stats, channels=16, depth=1, latent_channels=4, hidden=16)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4  # 9 architectures, batches of 4, last partial batch dropped
    metrics = trainer.callback_metrics
    for key in ("val/loss", "val/acc_mae", "val/params_spearman", "val/token_exact", "val/seq_exact", "val/types_exact"):
        assert torch.isfinite(metrics[key]), key
    assert isinstance(model.optimizers().optimizer, torch.optim.SGD)  # the paper's Sec. 5.2.2
    assert model.optimizers().optimizer.defaults["nesterov"] and model.optimizers().optimizer.defaults["momentum"] == 0.5


def test_datamodule_refuses_long_sequences(tmp_path: Path) -> None:
    dm = ArchitectureDataModule(write_dataset(tmp_path, 3), max_len=8, val_fraction=0.0)
    with pytest.raises(ValueError, match="max_len=8 is shorter than architectures"):
        next(iter(dm.train_dataloader()))


def test_compressor_argument_validation() -> None:
    with pytest.raises(ValueError, match="max_len must be a multiple of 2\\*\\*depth"):
        make_compressor(max_len=18)
    with pytest.raises(ValueError, match="token_scale"):
        make_compressor(token_scale=[1.0, 1.0])
    with pytest.raises(ValueError, match="param_std"):
        make_compressor(param_std=0.0)
    with pytest.raises(TypeError, match="optimizer"):
        make_compressor(optimizer="sgd")


def test_token_fields_are_documented_types() -> None:
    assert Token(*LONG[0]).t == 1 and Token(*LONG[-1]) == Token(8, 0, 10, 0, 0)
