"""LeNet architectures used by the pruning papers (MNIST-sized inputs, 1x28x28)."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_prune.models._width import scaled


class LeNet5(nn.Module):
    """The Caffe variant of LeNet-5: conv 20 (5x5) -> pool -> conv 50 (5x5) -> pool -> fc 500 -> fc.

    431,080 parameters and 2,293,000 MACs per 1x28x28 image at ``width=1``. ``width`` scales
    every hidden layer (the "WM" width-multiplier baseline of Lemaire, Achkar and Jodoin,
    "Structured Pruning of Neural Networks with Budget-Aware Regularization", CVPR 2019,
    arXiv:1811.09332); the head keeps ``num_classes`` outputs.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, f1 = scaled(20, width), scaled(50, width), scaled(500, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * 4 * 4, f1),
            nn.ReLU(inplace=True),
            nn.Linear(f1, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class LeNet300100(nn.Module):
    """The fully connected LeNet-300-100: 784 -> 300 -> 100 -> classes (266,610 parameters)."""

    def __init__(self, num_classes: int = 10, in_features: int = 784, width: float = 1.0) -> None:
        super().__init__()
        h1, h2 = scaled(300, width), scaled(100, width)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, h1),
            nn.ReLU(inplace=True),
            nn.Linear(h1, h2),
            nn.ReLU(inplace=True),
            nn.Linear(h2, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
