"""The CONV-k networks of papers/003 §5.3: k stacked conv-BN-ReLU blocks and one linear layer."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class ConvK(nn.Module):
    """CONV-k: ``depth`` blocks of Conv2d(3x3, padding 1, stride 1, no bias)-BatchNorm-ReLU, then
    Flatten-Linear(channels * H * W, num_classes).

    papers/003 uses CONV-7 on Fashion-MNIST (708K parameters) and CONV-10 on CIFAR/SVHN (24.4M)
    without giving the widths. The paper does not say; with ``channels=64`` and 28x28 inputs,
    CONV-7 has 724,426 parameters, the closest plain choice to 708K (no pooling, so the linear
    layer holds 69% of them). ``channels`` may be one int (every block) or one per block.
    """

    def __init__(
        self,
        depth: int = 7,
        channels: int | Sequence[int] = 64,
        num_classes: int = 10,
        input_shape: Sequence[int] = (1, 28, 28),
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        widths = [channels] * depth if isinstance(channels, int) else list(channels)
        if len(widths) != depth or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in widths):
            raise ValueError(f"channels must be a positive int or {depth} positive ints, got {channels!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if len(input_shape) != 3 or not all(isinstance(v, int) and v > 0 for v in input_shape):
            raise ValueError(f"input_shape must be (channels, height, width) of positive ints, got {input_shape!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        for c in widths:
            layers += [nn.Conv2d(c_in, c, kernel_size, padding=kernel_size // 2, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c_in * input_shape[1] * input_shape[2], num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
