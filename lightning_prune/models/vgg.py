"""The CIFAR VGG-16 with BatchNorm used by channel-pruning papers (Li et al. 2017; Adamczewski and
Park, "Dirichlet Pruning for Neural Network Compression", AISTATS 2021, arXiv:2011.05985)."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_prune.models._width import scaled
from lightning_prune.models.init import init_convolutions

VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class CifarVGG(nn.Module):
    """VGG-16-BN for 32x32 inputs: 13 conv-BN-ReLU layers, 5 max-pools, then
    Linear(512, 512)-BN-ReLU-Linear(512, classes) as in Li et al. (about 15.0M parameters,
    313M MACs per image at ``width=1``)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        config: tuple[int | str, ...] = VGG16_CONFIG,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = scaled(int(item), width)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        hidden = scaled(512, width)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        init_convolutions(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def vgg16(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarVGG:
    return CifarVGG(num_classes=num_classes, in_channels=in_channels, width=width)
