"""The CONV-k networks of Ashok, "Architecture Compression", arXiv:1902.03326, 2019, Sec. 5.3 (k
stacked conv-BN-ReLU blocks and one linear layer) and :func:`build`, the network of a token list
as a saved file's architecture.

Everything public here builds a network from plain data, so ``lightning_prune.load_pruned``
may call it (``lightning_prune.core.export.ALLOWED_TARGETS``): keep it that way.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_prune._checks import check_int
from lightning_prune.archcomp.tokens import build as _build_tokens
from lightning_prune.archcomp.tokens import check_input_shape


class ConvK(nn.Module):
    """CONV-k: ``depth`` blocks of Conv2d(3x3, padding 1, stride 1, no bias)-BatchNorm-ReLU, then
    Flatten-Linear(channels * H * W, num_classes).

    Ashok 2019 uses CONV-7 on Fashion-MNIST (708K parameters) and CONV-10 on CIFAR/SVHN (24.4M)
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
        check_int("depth", depth)
        widths = [channels] * depth if isinstance(channels, int) else list(channels)
        if len(widths) != depth or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in widths):
            raise ValueError(f"channels must be a positive int or {depth} positive ints, got {channels!r}")
        check_int("num_classes", num_classes)
        input_shape = check_input_shape(input_shape)
        if check_int("kernel_size", kernel_size) % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        for c in widths:
            layers += [nn.Conv2d(c_in, c, kernel_size, padding=kernel_size // 2, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c_in * input_shape[1] * input_shape[2], num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def build(tokens: Sequence[Sequence[int]], input_shape: Sequence[int], num_classes: int | None = None) -> nn.Sequential:
    """The ``nn.Sequential`` that ``tokens`` (``[[t, k, o, s, p], ...]``, see
    :mod:`lightning_prune.archcomp.tokens`) describe for inputs of ``input_shape`` (C, H, W):
    :func:`lightning_prune.archcomp.tokens.build` from plain data, the builder named by the
    ``architecture`` of a saved Architecture Compression network::

        {"_target_": "lightning_prune.archcomp.models.build", "tokens": [[1, 3, 8, 1, 1], ...], "input_shape": [1, 28, 28]}

    ``num_classes``, when given, is checked against the last layer's outputs.
    """
    return _build_tokens([list(t) for t in tokens], list(input_shape), num_classes=num_classes)

