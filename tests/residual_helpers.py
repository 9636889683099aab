"""Residual networks written the way a user might, for the mixed-connectivity tests (none of
them is a lightning-prune or torchvision class: the residual blocks must be found in the trace)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class UserBlock(nn.Module):
    """A hand-written residual block: an ``nn.Sequential`` body, the skip computed first and
    added with ``+``, a functional ReLU; a 1x1 projection when the shape changes; the body ends
    in a batch norm, or (``norm_last=False``) in a convolution with a bias."""

    def __init__(self, cin: int, cout: int, stride: int = 1, norm_last: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=not norm_last),
        ]  # fmt: skip
        if norm_last:
            layers.append(nn.BatchNorm2d(cout))
        self.body = nn.Sequential(*layers)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip(x)
        return F.relu(skip + self.body(x))


class UserResNet(nn.Module):
    """A small residual CNN of the user's own: stem without batch norm, three blocks (one
    downsampling, one ending in a convolution), global pooling, a head."""

    def __init__(self, classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            UserBlock(width, width), UserBlock(width, width, norm_last=False), UserBlock(width, 2 * width, stride=2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.classify = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


class ResidualMLP(nn.Module):
    """Residual blocks of linear layers on (batch, features): ``h = h + ff(h)``."""

    def __init__(self, features: int = 24, hidden: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(3 * 4 * 4, features)
        self.ff1 = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, features))
        self.ff2 = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, features), nn.BatchNorm1d(features))
        self.out = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.embed(x.flatten(1)))
        h = h + self.ff1(h)
        h = F.relu(h + self.ff2(h))
        return self.out(h)


class ResidualModule(L.LightningModule):
    """A LightningModule of the user's own around :class:`UserResNet`: its own attribute name,
    a dict from ``training_step``, SGD with momentum and a step schedule, no ``forward``."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.trunk = UserResNet()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return {"loss": F.cross_entropy(self.trunk(images), labels)}

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.trunk.parameters(), lr=self.lr, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


INPUT = (3, 8, 8)


def residual_loader(batch_size: int = 16, n: int = 64, shuffle: bool = True, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *INPUT, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 1].mean(dim=(1, 2)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


# Hard-pruning widths that remove the second block's branch and thin the rest (UserResNet, width 8).
WIDTHS = {"features.3.body.3": 0, "features.4.body.3": 5, "features.0": 6, "features.2.body.0": 4}
