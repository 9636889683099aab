"""Datamodules on real data (MNIST, the CIFAR-10 JPEG archive) and on generated tiny folders."""

from __future__ import annotations

import pickle
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from lightning_prune.data import (
    BatchRandomCrop,
    BatchRandomHorizontalFlip,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DatasetNotFoundError,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    SVHNDataModule,
)


def first_batch(loader):
    return next(iter(loader))


def test_mnist_real_data_split_and_normalisation(data_dir):
    dm = MNISTDataModule(data_dir, batch_size=500, val_size=5000, seed=3)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55_000, 5_000, 10_000)
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (500, 1, 28, 28) and y.dtype == torch.int64
    # normalised with MNIST's statistics: mean ~0, std ~1 over a batch
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1.0) < 0.1
    assert set(y.tolist()) <= set(range(10))
    # train and validation never share images
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)


def test_split_is_seeded_and_subset_keeps_that_many(data_dir):
    a = MNISTDataModule(data_dir, val_size=100, subset=300, seed=1)
    b = MNISTDataModule(data_dir, val_size=100, subset=300, seed=1)
    c = MNISTDataModule(data_dir, val_size=100, subset=300, seed=2)
    for dm in (a, b, c):
        dm.setup("fit")
    assert len(a.train_set) == 300 and len(a.val_set) == 100
    assert a.train_set.indices == b.train_set.indices and a.val_set.indices == b.val_set.indices
    assert a.train_set.indices != c.train_set.indices


def test_cifar10_loads_from_the_jpeg_archive(data_dir, cache_dir):
    dm = CIFAR10DataModule(data_dir, cache_dir=cache_dir, batch_size=64, val_size=5000, num_workers=0)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (45_000, 5_000, 10_000)
    assert (cache_dir / "cifar10-jpg.pt").is_file()  # decoded once, read memory-mapped
    x, y = first_batch(dm.val_dataloader())
    assert x.shape == (64, 3, 32, 32)
    # same class order as torchvision's CIFAR10
    assert dm.test_set.classes == [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    ]
    assert abs(x.mean().item()) < 0.3 and 0.7 < x.std().item() < 1.3


def test_cifar_augmentation_is_pad4_crop_and_flip_on_train_only(data_dir, cache_dir):
    dm = CIFAR10DataModule(data_dir, cache_dir=cache_dir, val_size=10, subset=20)
    names = [type(t).__name__ for t in dm.train_transform().transforms]
    assert names == ["BatchRandomCrop", "BatchRandomHorizontalFlip", "ConvertImageDtype", "Normalize"]  # on decoded uint8 batches
    assert dm.train_transform().transforms[0].padding == 4
    assert [type(t).__name__ for t in dm.eval_transform().transforms] == ["ConvertImageDtype", "Normalize"]
    dm.setup("fit")
    raw = dm.val_set.dataset[dm.val_set.indices[0]][0]
    again = dm.val_set.dataset[dm.val_set.indices[0]][0]
    assert torch.equal(raw, again)  # evaluation is deterministic


def test_mnist_shift_translates_training_images_only(data_dir):
    plain = MNISTDataModule(data_dir, val_size=10, subset=20)
    assert [type(t).__name__ for t in plain.train_transform().transforms] == ["ToTensor", "Normalize"]
    dm = MNISTDataModule(data_dir, val_size=10, subset=20, shift=2)
    assert [type(t).__name__ for t in dm.eval_transform().transforms] == ["ToTensor", "Normalize"]
    assert [type(t).__name__ for t in MNISTDataModule(data_dir, shift=2, augment=False).train_transform().transforms] == [
        "ToTensor", "Normalize"]
    dm.setup("fit")
    image = dm.train_set.dataset.data[dm.train_set.indices[0]]
    reference = plain.eval_transform()(torchvision.transforms.functional.to_pil_image(image))[0]
    background = float(reference[0, 0])
    shifts = set()
    for _ in range(60):
        x = dm.train_set[0][0][0]
        assert x.shape == (28, 28)
        # each draw is the image moved by whole pixels (dy, dx) in [-2, 2], the uncovered border black
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.allclose(x, _translated(reference, dy, dx, background))]
        assert found, "a training image is not a translation of the original by at most 2 pixels"
        shifts.update(found)
    assert len(shifts) > 5  # the translation is random


def _translated(image, dy, dx, fill):
    out = torch.full_like(image, fill)
    h, w = image.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_missing_data_offline_names_the_folder_and_how_to_get_it(tmp_path):
    dm = MNISTDataModule(tmp_path / "nothing-here")
    with pytest.raises(DatasetNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert str((tmp_path / "nothing-here").resolve()) in msg
    assert "download=true" in msg and "LP_DATA_DIR" in msg and "MNIST" in msg


def test_failed_download_is_reported_the_same_way(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    dm = MNISTDataModule(tmp_path, download=True)
    with pytest.raises(DatasetNotFoundError, match="download failed"):
        dm.prepare_data()


def make_cifar_archive(folder: Path, per_class: int = 3) -> Path:
    """A small CIFAR-10 JPEG archive in the shared copy's layout (cifar10/{train,test}/<class>/<n>.jpg),
    with file names that sort differently as strings and as numbers, and one grayscale JPEG."""
    import tarfile

    rng = np.random.default_rng(0)
    root = folder / "src" / "cifar10"
    for split in ("train", "test"):
        for c in ("cat", "airplane", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in (1, 2, 10)[:per_class]:
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                image = Image.fromarray(pixels[..., 0]) if (split, c, i) == ("train", "dog", 2) else Image.fromarray(pixels)
                image.save(root / split / c / f"{i}.jpg", quality=75)
    data = folder / "data"
    data.mkdir()
    with tarfile.open(data / "cifar10-jpg.tar.gz", "w:gz") as tar:
        tar.add(root, arcname="cifar10")
    return data


def test_decoded_archive_gives_the_items_of_image_folder_on_the_extracted_files(tmp_path):
    """Same images, labels, order, classes as torchvision's ImageFolder on the extracted archive
    with PIL transforms (the way the archive was read before); an item alone also gets the same
    random crop and flip."""
    data = make_cifar_archive(tmp_path)
    dm = CIFAR10DataModule(data, cache_dir=tmp_path / "cache", val_size=2, batch_size=4)
    dm.setup()
    extracted = torchvision.datasets.ImageFolder(str(tmp_path / "src" / "cifar10" / "train"))
    assert dm.train_set.dataset.classes == extracted.classes == ["airplane", "cat", "dog"]
    pil_train = torchvision.transforms.Compose([torchvision.transforms.RandomCrop(32, padding=4),
                                                torchvision.transforms.RandomHorizontalFlip(),
                                                torchvision.transforms.ToTensor(),
                                                torchvision.transforms.Normalize(dm.mean, dm.std)])
    pil_eval = torchvision.transforms.Compose(pil_train.transforms[2:])
    for index in range(len(extracted)):
        image, label = extracted[index]
        torch.manual_seed(index)
        expected = pil_train(image)
        torch.manual_seed(index)
        decoded, decoded_label = dm.train_set.dataset[index]
        assert decoded_label == label and torch.equal(decoded, expected)
        assert torch.equal(dm.val_set.dataset[index][0], pil_eval(image))
    test = torchvision.datasets.ImageFolder(str(tmp_path / "src" / "cifar10" / "test"))
    assert [label for _, label in test] == dm.test_set.labels.tolist()


def test_batch_crop_and_flip_draw_each_image_its_own_crop_and_flip():
    """A batch gets, image by image, torchvision's padded crop at the offsets drawn for it and a
    flip where its draw says so: all rows, then all columns, then all flips."""
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(7)
    out = BatchRandomHorizontalFlip()(BatchRandomCrop(32, padding=4)(images))
    torch.manual_seed(7)
    rows, cols, flips = torch.randint(0, 9, (16,)), torch.randint(0, 9, (16,)), torch.rand(16) < 0.5
    F = torchvision.transforms.functional
    for k in range(16):
        crop = F.crop(F.pad(images[k], [4]), int(rows[k]), int(cols[k]), 32, 32)
        assert torch.equal(out[k], F.hflip(crop) if flips[k] else crop)
    assert out.dtype == torch.uint8 and out.is_contiguous()
    assert len({(int(r), int(c)) for r, c in zip(rows, cols)}) > 1 and 0 < int(flips.sum()) < 16  # not one draw for all
    assert torch.equal(BatchRandomCrop(32, padding=0)(images), images)  # the only crop
    with pytest.raises(ValueError, match="crop of padded 40x40"):
        BatchRandomCrop(48, padding=4)(images)
    with pytest.raises(ValueError, match="size"):
        BatchRandomCrop(0, padding=4)
    with pytest.raises(TypeError, match="padding"):
        BatchRandomCrop(32, padding=4.0)
    with pytest.raises(ValueError, match="p must be a probability"):
        BatchRandomHorizontalFlip(p=1.5)


def test_a_dataloader_transforms_decoded_images_a_batch_at_a_time(tmp_path):
    """The loader's batches come from one call of the transform per batch (``__getitems__``,
    through the train/val ``Subset``), on the batch's images in the sampler's order."""
    data = make_cifar_archive(tmp_path)
    dm = CIFAR10DataModule(data, cache_dir=tmp_path / "cache", val_size=0, batch_size=5)
    dm.setup("fit")
    decoded = dm.train_set.dataset
    calls = []
    transform = decoded.transform
    decoded.transform = lambda batch: calls.append((batch, transform(batch))) or calls[-1][1]
    x, y = first_batch(dm.train_dataloader())
    assert len(calls) == 1 and x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, calls[0][1])
    calls.clear()
    x, y = first_batch(torch.utils.data.DataLoader(dm.train_set, batch_size=5))  # in order
    first = torch.as_tensor(dm.train_set.indices[:5])
    assert len(calls) == 1 and torch.equal(calls[0][0], decoded.images[first]) and torch.equal(x, calls[0][1])
    assert y.tolist() == decoded.labels[first].tolist()


def test_decoded_archive_cache_is_reused_and_rebuilt_when_stale_or_corrupt(tmp_path, monkeypatch):
    from lightning_prune.data import datamodules

    data = make_cifar_archive(tmp_path, per_class=2)
    cache = tmp_path / "cache"
    first = CIFAR10DataModule(data, cache_dir=cache, val_size=1)
    first.prepare_data()
    images = first.decoded_archive()["train"]["images"].clone()
    decodes = []
    original = datamodules.decode_image_folder_archive
    monkeypatch.setattr(datamodules, "decode_image_folder_archive", lambda *a: decodes.append(1) or original(*a))
    again = CIFAR10DataModule(data, cache_dir=cache, val_size=1)
    again.setup("fit")
    assert decodes == [] and torch.equal(again.train_set.dataset.images, images)  # read from the cache
    (cache / "cifar10-jpg.pt").write_bytes(b"not a torch file")
    assert torch.equal(CIFAR10DataModule(data, cache_dir=cache).decoded_archive()["train"]["images"], images)
    assert decodes == [1]  # a corrupt cache is decoded again
    with open(data / "cifar10-jpg.tar.gz", "ab") as f:  # the archive changed (its size)
        f.write(b"\0" * 1024)
    CIFAR10DataModule(data, cache_dir=cache).decoded_archive()
    assert decodes == [1, 1]


def test_corrupt_cifar_archive_names_the_archive(tmp_path):
    data = make_cifar_archive(tmp_path, per_class=1)
    archive = data / "cifar10-jpg.tar.gz"
    archive.write_bytes(archive.read_bytes()[:300])  # truncated
    with pytest.raises(DatasetNotFoundError, match="cifar10-jpg.tar.gz cannot be read"):
        CIFAR10DataModule(data, cache_dir=tmp_path / "cache").setup("fit")


def test_cifar10_without_layout_or_archive_fails_clearly(tmp_path):
    dm = CIFAR10DataModule(tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetNotFoundError, match="cifar10-jpg.tar.gz"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 1.5}, TypeError, "batch_size"),
        ({"subset": -1}, ValueError, "subset"),
        ({"num_workers": -1}, ValueError, "num_workers"),
        ({"data_dir": 3}, TypeError, "data_dir"),
        ({"shift": -1}, ValueError, "shift"),
        ({"shift": 14}, ValueError, "shift"),
        ({"shift": 1.5}, TypeError, "shift"),
        ({"channels_last": "yes"}, TypeError, "channels_last"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MNISTDataModule(**kwargs)


def test_val_size_larger_than_training_set(data_dir):
    with pytest.raises(ValueError, match="val_size"):
        MNISTDataModule(data_dir, val_size=60_000).setup("fit")


# --- generated tiny copies of the datasets the shared folder does not have --------------------


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def test_fashion_mnist_on_generated_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(raw, "train", rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), np.arange(60, dtype=np.uint8) % 10)
    write_idx(raw, "t10k", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), np.arange(20, dtype=np.uint8) % 10)
    dm = FashionMNISTDataModule(tmp_path, batch_size=8, val_size=10)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50, 10, 20)
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (8, 1, 28, 28)


def test_cifar100_on_generated_pickles(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 40), ("test", 12)):
        with open(root / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": list(range(n))}, f)
    with open(root / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    dm = CIFAR100DataModule(tmp_path, batch_size=4, val_size=8)
    dm.setup()
    assert dm.num_classes == 100
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (32, 8, 12)
    assert first_batch(dm.train_dataloader())[0].shape == (4, 3, 32, 32)


def test_svhn_on_generated_mat_files(tmp_path, monkeypatch):
    import scipy.io

    monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)
    root = tmp_path / "svhn"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train_32x32.mat", 30), ("test_32x32.mat", 10)):
        scipy.io.savemat(root / name, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                       "y": (np.arange(n) % 10 + 1).reshape(n, 1)})
    dm = SVHNDataModule(tmp_path, batch_size=5, val_size=5)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (25, 5, 10)
    x, y = first_batch(dm.test_dataloader())
    assert x.shape == (5, 3, 32, 32) and y.max() <= 9  # torchvision maps label 10 to digit 0


def make_image_folder(root: Path, classes=("cat", "dog", "fish"), per_class=(6, 2)) -> None:
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "test"), per_class):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_image_folder_datamodule(tmp_path):
    make_image_folder(tmp_path)
    dm = ImageFolderDataModule(tmp_path, image_size=24, batch_size=4, val_size=3)
    assert dm.num_classes == 3 and dm.input_shape == (3, 24, 24)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 3, 6)
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (4, 3, 24, 24)
    gray = ImageFolderDataModule(tmp_path, image_size=16, channels=1, val_size=3, batch_size=2)
    gray.setup("test")
    assert first_batch(gray.test_dataloader())[0].shape == (2, 1, 16, 16)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no train/ folder"):
        ImageFolderDataModule(tmp_path)
    make_image_folder(tmp_path)
    with pytest.raises(ValueError, match="download"):
        ImageFolderDataModule(tmp_path, download=True)
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataModule(tmp_path, channels=2)
    with pytest.raises(DatasetNotFoundError, match="no val/ folder"):
        ImageFolderDataModule(tmp_path, test_folder="val", val_size=3).setup("test")


def test_channels_last_lays_out_the_batches_nhwc(tmp_path):
    """``channels_last=True``: the network sees the same images, laid out channels-last, in training
    and evaluation; without it the batches stay contiguous NCHW."""
    import lightning as L

    seen = {}

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Conv2d(3, 2, 3)

        def training_step(self, batch, batch_idx):
            x, y = batch
            seen.setdefault("train", []).append((x.is_contiguous(memory_format=torch.channels_last), x.is_contiguous(), x.clone(), y))
            return self.layer(x).mean()

        def validation_step(self, batch, batch_idx):
            seen.setdefault("val", []).append(batch[0].is_contiguous(memory_format=torch.channels_last))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    make_image_folder(tmp_path)
    for channels_last in (True, False):
        seen.clear()
        dm = ImageFolderDataModule(tmp_path, image_size=24, batch_size=8, val_size=3, subset=16, augment=False, channels_last=channels_last)
        L.seed_everything(0)  # the same shuffle
        L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0).fit(Probe(), dm)
        assert len(seen["train"]) == 2 and len(seen["val"]) == 1
        assert all(nhwc is channels_last and nchw is not channels_last for nhwc, nchw, _, _ in seen["train"])
        assert seen["val"] == [channels_last]
        if channels_last:
            images = [x for _, _, x, _ in seen["train"]]
        else:  # the same images in the same order (same seed), only their memory layout differs
            assert all(torch.equal(a, x) for a, (_, _, x, _) in zip(images, seen["train"]))
