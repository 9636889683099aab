"""CIFAR ResNets of He et al. (2016, §4.2): ResNet-20/32/56/110.

Shortcut: option B — identity where the shape is unchanged, a 1x1 convolution with BatchNorm
(stride 2) where it changes. Option A (zero-padded identity) cannot have its channels pruned
consistently with the residual stream, so pruning papers re-implement option B. It adds
2,752 parameters to every depth (ResNet-20: 272,474 vs 269,722; ResNet-56: 855,770 vs 853,018, the published
0.85M of option A).
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_prune.models._width import scaled
from lightning_prune.models.init import init_convolutions


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: three stages of n basic blocks with 16/32/64 channels."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth!r}")
        n = (depth - 2) // 6
        widths = [scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_planes = widths[0]
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_convolutions(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def resnet20(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    return CifarResNet(20, num_classes, width=width)


def resnet32(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    return CifarResNet(32, num_classes, width=width)


def resnet56(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    return CifarResNet(56, num_classes, width=width)


def resnet110(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    return CifarResNet(110, num_classes, width=width)
