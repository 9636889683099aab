"""LightningDataModules for the datasets of the pruning papers.

Every datamodule takes a ``data_dir``; nothing is downloaded unless ``download=True``. When the
files are missing (and download is off or there is no network) the datamodule raises
:class:`DatasetNotFoundError` naming the folder it looked in and how to get the data.

The training set is split into train / validation with a seeded permutation, so the split is
the same on every run and every DDP rank. ``subset`` keeps only that many training samples
(for quick CPU runs); validation and test sets are never subsampled.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from lightning_prune._checks import check_int

CIFAR10_ARCHIVE = "cifar10-jpg.tar.gz"


def default_cache_dir() -> Path:
    """Where decoded archives and other derived files are kept: ``$LP_CACHE_DIR``, else
    ``~/.cache/lightning-prune``."""
    return Path(os.environ.get("LP_CACHE_DIR", Path.home() / ".cache" / "lightning-prune"))


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is not in ``data_dir`` and could not (or may not) be downloaded."""


def _check_positive_int(name: str, value: Any, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    check_int(name, value, 0 if allow_zero else 1)


class VisionDataModule(L.LightningDataModule):
    """Common train/val/test logic; subclasses say how to build the three raw datasets.

    ``channels_last=True`` lays every image batch out channels-last (NHWC) once it is on the
    device (:meth:`on_after_batch_transfer`), so the convolutions run channels-last; whether that
    is faster depends on the network and the hardware (on one CPU core here: a ResNet-20 training
    step 1.35x faster, LeNet-5 and VGG-16 within 10%; ``benchmarks/channels_last.py``)."""

    name: str = ""
    num_classes: int = 0
    input_shape: tuple[int, int, int] = (0, 0, 0)
    mean: Sequence[float] = ()
    std: Sequence[float] = ()
    how_to_get: str = ""

    def __init__(
        self,
        data_dir: str | os.PathLike = "./data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: int = 5000,
        subset: int | None = None,
        seed: int = 0,
        augment: bool = True,
        download: bool = False,
        pin_memory: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(data_dir, (str, os.PathLike)):
            raise TypeError(f"data_dir must be a path, got {type(data_dir).__name__}")
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("eval_batch_size", eval_batch_size, allow_none=True)
        _check_positive_int("num_workers", num_workers, allow_zero=True)
        _check_positive_int("val_size", val_size, allow_zero=True)
        _check_positive_int("subset", subset, allow_none=True)
        _check_positive_int("seed", seed, allow_zero=True)
        if not isinstance(channels_last, bool):
            raise TypeError(f"channels_last must be a bool, got {type(channels_last).__name__}")
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.subset = subset
        self.seed = seed
        self.augment = augment
        self.download = download
        self.pin_memory = pin_memory
        self.channels_last = channels_last
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # --- what subclasses provide ---------------------------------------------------------
    def train_augmentation(self) -> list[Callable]:
        return []

    def build(self, train: bool, transform: Callable) -> Dataset:
        """The raw dataset (``train`` or test split) with ``transform``; may raise anything
        torchvision raises when the files are missing."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------
    def to_tensor(self) -> Callable:
        """The transform from what the raw dataset yields to a float image in [0, 1]: from PIL
        images, ``ToTensor``."""
        return transforms.ToTensor()

    def eval_transform(self) -> Callable:
        return transforms.Compose([self.to_tensor(), transforms.Normalize(self.mean, self.std)])

    def train_transform(self) -> Callable:
        aug = self.train_augmentation() if self.augment else []
        return transforms.Compose([*aug, self.to_tensor(), transforms.Normalize(self.mean, self.std)])

    def missing(self, reason: str = "") -> DatasetNotFoundError:
        msg = (
            f"{self.name} was not found in {self.data_dir.resolve()}"
            + (f" ({reason})" if reason else "")
            + f". {self.how_to_get} Point data_dir (or the LP_DATA_DIR environment variable) at the folder that holds it"
            + ("" if self.download else ", or set download=true on a machine with network access")
            + "."
        )
        return DatasetNotFoundError(msg)

    def _load(self, train: bool, transform: Callable) -> Dataset:
        try:
            return self.build(train, transform)
        except DatasetNotFoundError:
            raise
        except (RuntimeError, FileNotFoundError) as err:
            raise self.missing(str(err).strip().splitlines()[0] if str(err).strip() else "") from err
        except OSError as err:  # urllib errors when downloading offline
            raise self.missing(f"download failed: {err}") from err

    def prepare_data(self) -> None:
        # Runs on one process only: the place to download or extract.
        self._load(True, None)
        self._load(False, None)

    def split_indices(self, n: int) -> tuple[list[int], list[int]]:
        if self.val_size >= n:
            raise ValueError(f"val_size must be smaller than the training set ({n} samples), got {self.val_size}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        val_idx, train_idx = perm[: self.val_size], perm[self.val_size :]
        if self.subset is not None:
            train_idx = train_idx[: self.subset]
        return train_idx, val_idx

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            full_train = self._load(True, self.train_transform())
            full_eval = self._load(True, self.eval_transform())
            train_idx, val_idx = self.split_indices(len(full_train))
            self.train_set = Subset(full_train, train_idx)
            self.val_set = Subset(full_eval, val_idx)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._load(False, self.eval_transform())

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested")
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``channels_last``, the images of an ``(images, labels)`` batch are laid out
        channels-last (NHWC strides, same values and shape) once on the device: convolutions then
        run channels-last throughout the network."""
        if self.channels_last:
            images, *rest = batch
            batch = type(batch)([images.contiguous(memory_format=torch.channels_last), *rest])
        return batch

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)


_TORCHVISION_HINT = "torchvision's {cls}(root=data_dir, download=True) creates the expected layout."


class MNISTDataModule(VisionDataModule):
    """MNIST. ``shift`` (default 0: none) translates each training image by a random whole
    number of pixels, at most ``shift`` in each direction, filling with the black background
    (the classic MNIST augmentation; applied only when ``augment`` is true)."""

    name, num_classes, input_shape = "MNIST", 10, (1, 28, 28)
    mean, std = (0.1307,), (0.3081,)
    how_to_get = _TORCHVISION_HINT.format(cls="MNIST") + " The expected files are <data_dir>/MNIST/raw/*-ubyte."

    def __init__(self, *args: Any, shift: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _check_positive_int("shift", shift, allow_zero=True)
        if shift >= 14:
            raise ValueError(f"shift must be smaller than half the 28-pixel image, got {shift}")
        self.shift = shift

    def train_augmentation(self) -> list[Callable]:
        return [transforms.RandomCrop(28, padding=self.shift)] if self.shift else []

    def build(self, train: bool, transform: Callable) -> Dataset:
        return datasets.MNIST(str(self.data_dir), train=train, transform=transform, download=self.download)


class FashionMNISTDataModule(VisionDataModule):
    name, num_classes, input_shape = "Fashion-MNIST", 10, (1, 28, 28)
    mean, std = (0.2860,), (0.3530,)
    how_to_get = _TORCHVISION_HINT.format(cls="FashionMNIST") + " The expected files are <data_dir>/FashionMNIST/raw/*-ubyte."

    def build(self, train: bool, transform: Callable) -> Dataset:
        return datasets.FashionMNIST(str(self.data_dir), train=train, transform=transform, download=self.download)


class _CifarAugmentation:
    def train_augmentation(self) -> list[Callable]:
        return [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]


class BatchRandomCrop:
    """torchvision's ``RandomCrop(size, padding)`` (zero padding) for a batch of images
    ``(N, C, H, W)``: every image gets its own crop, uniform over the padded image. The offsets
    are drawn as ``torch.randint`` of all rows, then of all columns, so that a batch of one image
    draws the same numbers, and gets the same crop, as ``RandomCrop`` on that image."""

    def __init__(self, size: int, padding: int) -> None:
        self.size, self.padding = check_int("size", size, minimum=1), check_int("padding", padding, minimum=0)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        padded = torch.nn.functional.pad(images, [self.padding] * 4)
        height, width = padded.shape[-2:]
        if height < self.size or width < self.size:
            raise ValueError(f"BatchRandomCrop: a {self.size}x{self.size} crop of padded {height}x{width} images")
        if (height, width) == (self.size, self.size):
            return padded  # one possible crop: no draw, as in RandomCrop
        window = torch.arange(self.size)
        rows = torch.randint(0, height - self.size + 1, (n,))[:, None] + window  # (N, size)
        cols = torch.randint(0, width - self.size + 1, (n,))[:, None] + window
        crops = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (N, size, size, C)
        return crops.permute(0, 3, 1, 2).contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, padding={self.padding})"


class BatchRandomHorizontalFlip:
    """torchvision's ``RandomHorizontalFlip(p)`` for a batch of images ``(N, C, H, W)``: every
    image is flipped or not on its own draw (``torch.rand(N) < p``; for one image, the draw of
    ``RandomHorizontalFlip``)."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        self.p = p

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        flip = torch.rand(images.shape[0]) < self.p
        return torch.where(flip[:, None, None, None], images.flip(-1), images)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class DecodedImages(Dataset):
    """Images held decoded as one ``uint8`` tensor ``(N, C, H, W)`` with their ``labels``. The
    ``transform`` takes a batch of such images ``(B, C, H, W)`` and treats each image on its own
    (torchvision's dtype conversion and normalisation, :class:`BatchRandomCrop`,
    :class:`BatchRandomHorizontalFlip`): a DataLoader fetches its batches through
    :meth:`__getitems__`, which transforms the whole batch in one call, and item ``i`` is
    ``(transform(images[i:i+1])[0], labels[i])``. ``classes``: the class names, by label."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None,
                 classes: Sequence[str] = ()) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.shape != images.shape[:1]:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor with N labels, got {tuple(images.shape)} {images.dtype} and {tuple(labels.shape)} labels")
        self.images, self.labels, self.transform, self.classes = images, labels, transform, list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, int]]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        images = self.images[index]
        if self.transform is not None:
            images = self.transform(images)
        return list(zip(images.unbind(0), self.labels[index].tolist()))

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.__getitems__([index])[0]


def decode_image_folder_archive(archive: Path, splits: Sequence[str]) -> dict[str, Any]:
    """Decode an ImageFolder archive (``<top>/<split>/<class>/<file>``, one top folder) into
    ``{"classes": [...], <split>: {"images": uint8 (N, C, H, W), "labels": int64 (N,)}}``, in
    ``torchvision.datasets.ImageFolder``'s order (classes sorted by name, their files too), so
    that indices, splits and subsets are those of the extracted folder. Every image of a split
    must have the same size; images are converted to RGB."""
    found: dict[str, dict[tuple[str, str], np.ndarray]] = {split: {} for split in splits}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4 or parts[1] not in found:
                continue
            data = tar.extractfile(member).read()
            with Image.open(io.BytesIO(data)) as image:
                found[parts[1]][(parts[2], parts[3])] = np.asarray(image.convert("RGB"))
    empty = [split for split, images in found.items() if not images]
    if empty:
        raise FileNotFoundError(f"the archive {archive} has no <top>/{'|'.join(empty)}/<class>/<file> images")
    classes = sorted({cls for images in found.values() for cls, _ in images})
    decoded: dict[str, Any] = {"classes": classes}
    for split, images in found.items():
        keys = sorted(images)
        shapes = {images[k].shape for k in keys}
        if len(shapes) != 1:
            raise ValueError(f"the archive {archive} has images of several sizes in {split}: {sorted(shapes)[:3]}")
        stacked = np.stack([images[k] for k in keys]).transpose(0, 3, 1, 2)  # NHWC -> NCHW
        decoded[split] = {"images": torch.from_numpy(np.ascontiguousarray(stacked)),
                          "labels": torch.tensor([classes.index(cls) for cls, _ in keys], dtype=torch.int64)}
    return decoded


class CIFAR10DataModule(_CifarAugmentation, VisionDataModule):
    """CIFAR-10 from torchvision's layout (``<data_dir>/cifar-10-batches-py``) or, when that is
    absent, from the JPEG ImageFolder archive ``<data_dir>/cifar10-jpg.tar.gz``, decoded once into
    ``<cache_dir>/cifar10-jpg.pt`` (default ``cache_dir``: ``~/.cache/lightning-prune``) and read
    from there memory-mapped: no JPEG is decoded while training, and processes on one machine
    share the pages. The decoded images and their order are those of
    ``torchvision.datasets.ImageFolder`` on the extracted archive; the crops and flips are drawn
    for a whole batch at once (:class:`BatchRandomCrop`, :class:`BatchRandomHorizontalFlip`):
    each image's on its own, from the same distribution as torchvision's, and for a single item
    the same numbers."""

    name, num_classes, input_shape = "CIFAR-10", 10, (3, 32, 32)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    how_to_get = (
        _TORCHVISION_HINT.format(cls="CIFAR10")
        + f" Expected <data_dir>/cifar-10-batches-py or the JPEG archive <data_dir>/{CIFAR10_ARCHIVE}."
    )

    def __init__(self, *args: Any, cache_dir: str | os.PathLike | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    def _from_archive(self) -> bool:
        return not (self.data_dir / "cifar-10-batches-py").is_dir() and (self.data_dir / CIFAR10_ARCHIVE).is_file()

    def to_tensor(self) -> Callable:
        return transforms.ConvertImageDtype(torch.float32) if self._from_archive() else super().to_tensor()

    def train_augmentation(self) -> list[Callable]:
        """From the archive, the batch versions of the crop and flip (the decoded images are
        transformed a batch at a time, see :class:`DecodedImages`)."""
        if self._from_archive():
            return [BatchRandomCrop(32, padding=4), BatchRandomHorizontalFlip()]
        return super().train_augmentation()

    def decoded_archive(self) -> dict[str, Any]:
        """The archive's images, decoded (see :func:`decode_image_folder_archive`); cached in
        ``cache_dir``, decoded again when the archive's size changed."""
        archive = self.data_dir / CIFAR10_ARCHIVE
        cache = self.cache_dir / "cifar10-jpg.pt"
        size = archive.stat().st_size
        if cache.is_file():
            try:
                decoded = torch.load(cache, mmap=True, weights_only=True)
                if decoded.get("archive_size") == size:
                    return decoded
            except (RuntimeError, OSError, EOFError, KeyError, AttributeError):
                pass  # a corrupt or foreign cache file: decoded again below
        try:
            decoded = decode_image_folder_archive(archive, ("train", "test"))
        except (tarfile.TarError, EOFError, OSError, ValueError) as err:  # OSError: a truncated gzip, an undecodable image
            raise self.missing(f"the archive {archive} cannot be read: {err}") from err
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f"{cache.name}.{os.getpid()}.partial")
        torch.save({**decoded, "archive_size": size}, partial)
        os.replace(partial, cache)  # atomic: a concurrent reader sees the old file or the whole new one
        return torch.load(cache, mmap=True, weights_only=True)

    def build(self, train: bool, transform: Callable) -> Dataset:
        if self._from_archive():
            decoded = self.decoded_archive()
            split = decoded["train" if train else "test"]
            return DecodedImages(split["images"], split["labels"], transform, decoded["classes"])
        return datasets.CIFAR10(str(self.data_dir), train=train, transform=transform, download=self.download)


class CIFAR100DataModule(_CifarAugmentation, VisionDataModule):
    name, num_classes, input_shape = "CIFAR-100", 100, (3, 32, 32)
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    how_to_get = _TORCHVISION_HINT.format(cls="CIFAR100") + " Expected <data_dir>/cifar-100-python."

    def build(self, train: bool, transform: Callable) -> Dataset:
        return datasets.CIFAR100(str(self.data_dir), train=train, transform=transform, download=self.download)


class SVHNDataModule(VisionDataModule):
    """SVHN digits (train and test splits; the 'extra' split is not used). Crops only, no flips."""

    name, num_classes, input_shape = "SVHN", 10, (3, 32, 32)
    mean, std = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
    how_to_get = _TORCHVISION_HINT.format(cls="SVHN") + " Expected <data_dir>/svhn/train_32x32.mat and test_32x32.mat."

    def train_augmentation(self) -> list[Callable]:
        return [transforms.RandomCrop(32, padding=4)]

    def build(self, train: bool, transform: Callable) -> Dataset:
        return datasets.SVHN(
            str(self.data_dir / "svhn"), split="train" if train else "test", transform=transform, download=self.download
        )


class ImageFolderDataModule(VisionDataModule):
    """Any local dataset in ImageFolder layout: ``<data_dir>/train/<class>/*`` and
    ``<data_dir>/<test_folder>/<class>/*``. Images are resized to ``image_size`` (square);
    ``mean``/``std`` default to 0.5 per channel. Nothing is ever downloaded."""

    name = "ImageFolder dataset"
    how_to_get = "Put images in <data_dir>/train/<class>/ and <data_dir>/test/<class>/."

    def __init__(
        self,
        data_dir: str | os.PathLike = "./data",
        image_size: int = 32,
        channels: int = 3,
        test_folder: str = "test",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("download"):
            raise ValueError("download: an ImageFolder dataset cannot be downloaded; set download=false")
        super().__init__(data_dir, **kwargs)
        _check_positive_int("image_size", image_size)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.image_size = image_size
        self.channels = channels
        self.test_folder = test_folder
        self.mean = tuple(mean) if mean is not None else (0.5,) * channels
        self.std = tuple(std) if std is not None else (0.5,) * channels
        self.input_shape = (channels, image_size, image_size)
        train_root = self.data_dir / "train"
        if not train_root.is_dir():
            raise self.missing("no train/ folder")
        self.classes = sorted(p.name for p in train_root.iterdir() if p.is_dir())
        if len(self.classes) < 2:
            raise ValueError(f"data_dir must hold at least two class folders under train/, found {self.classes}")
        self.num_classes = len(self.classes)

    def _base(self) -> list[Callable]:
        base: list[Callable] = [transforms.Resize((self.image_size, self.image_size))]
        if self.channels == 1:
            base.append(transforms.Grayscale(1))
        return base

    def eval_transform(self) -> Callable:
        return transforms.Compose([*self._base(), transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    def train_transform(self) -> Callable:
        aug = [transforms.RandomHorizontalFlip()] if self.augment else []
        return transforms.Compose([*self._base(), *aug, transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    def build(self, train: bool, transform: Callable) -> Dataset:
        folder = self.data_dir / ("train" if train else self.test_folder)
        if not folder.is_dir():
            raise self.missing(f"no {folder.name}/ folder")
        ds = datasets.ImageFolder(str(folder), transform=transform)
        if ds.classes != self.classes:
            raise ValueError(f"data_dir: the class folders of {folder} differ from those of train/: {ds.classes} vs {self.classes}")
        return ds
