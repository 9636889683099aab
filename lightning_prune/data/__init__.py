"""LightningDataModules: MNIST, Fashion-MNIST, CIFAR-10/100, SVHN and any ImageFolder."""

from lightning_prune.data.datamodules import (
    BatchRandomCrop,
    BatchRandomHorizontalFlip,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DatasetNotFoundError,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    SVHNDataModule,
    VisionDataModule,
    default_cache_dir,
)

__all__ = [
    "VisionDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "CIFAR10DataModule",
    "BatchRandomCrop",
    "BatchRandomHorizontalFlip",
    "CIFAR100DataModule",
    "SVHNDataModule",
    "ImageFolderDataModule",
    "DatasetNotFoundError",
    "default_cache_dir",
]
