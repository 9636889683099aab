"""Weight initialisation shared by the CIFAR models."""

from torch import nn


def init_convolutions(model: nn.Module) -> None:
    """He (Kaiming) normal initialisation, fan-out mode, of every 2-D convolution's weight."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
