"""LightningDataModules: MNIST, Fashion-MNIST, CIFAR-10/100, SVHN and any ImageFolder."""

from lightning_prune.data.datamodules import (
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
    "CIFAR100DataModule",
    "SVHNDataModule",
    "ImageFolderDataModule",
    "DatasetNotFoundError",
    "default_cache_dir",
]
