"""Model zoo: the papers' architectures and any torchvision classifier by name."""

from __future__ import annotations

from typing import Any

import torchvision
from torch import nn

from lightning_prune.models.lenet import LeNet5, LeNet300100
from lightning_prune.models.resnet_cifar import CifarResNet
from lightning_prune.models.vgg import CifarVGG
from lightning_prune.models.wideresnet import WideResNet

__all__ = ["LeNet5", "LeNet300100", "CifarVGG", "CifarResNet", "WideResNet", "torchvision_model"]


def torchvision_model(name: str, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """Any torchvision classification model by name (``resnet18``, ``mobilenet_v2``, ...),
    randomly initialised with ``num_classes`` outputs. Weights are never downloaded."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(f"name must be a torchvision classification model, got {name!r}; available: {', '.join(available)}")
    if kwargs.get("weights") is not None:
        raise ValueError("weights: pretrained weights are not downloaded by lightning-prune; load a state_dict yourself")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
