"""The physical form of mixed-connectivity residual blocks.

In a mixed-connectivity block (Lemaire, Achkar and Jodoin, "Structured Pruning of Neural
Networks with Budget-Aware Regularization", CVPR 2019, arXiv:1811.09332, supplementary
material, Algorithm 1) the residual stream and the block's branch keep different channels:
the branch computes only its alive channels and adds them into the alive stream channels
they belong to. The model's own forward code is never edited (``out = self.bn2(...); out +=
shortcut`` stays as written); :func:`lightning_prune.core.surgery.shrink` changes two things
in the network instead:

- the branch's last layer (the one whose output is added to the stream, e.g. ``bn2``) becomes
  a *scattered* layer: the same module, with the same parameters and state-dict keys, whose
  class is switched to a subclass of its own (``ScatteredBatchNorm2d``, ...) that places its
  ``k`` output channels at positions ``scatter_index`` of a zero tensor with
  ``scatter_width`` channels (the stream's). ``scatter_index`` is a buffer, so it is in the
  state dict and a ``weights_only`` load restores it; the pruning history rebuilds it.
  Cost of the scatter: one zero tensor of the stream's shape and a copy of the ``k`` channels
  (memory traffic, no multiply-accumulate), then the model's own addition.
- a branch that keeps no channel is removed: each of its layers is replaced by a
  :class:`RemovedLayer`, which runs nothing. Inside the branch it returns an empty tensor
  (0 channels, the spatial size the layer would have produced), so parameter-free operations
  between the layers (ReLU, pooling, concatenation...) cost nothing either; as the branch's
  last layer it returns zeros with the stream's channels, which the block's addition adds
  (one zero tensor of the stream's shape and the addition: no MACs, no parameters, no
  activation volume). The block becomes the identity, or the projection shortcut alone.

This module holds the two forms; it imports nothing else of lightning_prune.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = [
    "ScatteredOutput",
    "RemovedLayer",
    "scatter_output",
    "unscatter_output",
    "is_scattered",
    "own_output_numel",
    "channel_dim",
    "uses_mixed_modules",
]


def channel_dim(module: nn.Module) -> int:
    """The channel dimension of a layer's output: -1 for a linear layer, 1 otherwise."""
    return -1 if isinstance(module, nn.Linear) else 1


def zeros_as(x: Tensor, shape: list[int]) -> Tensor:
    """Zeros of ``shape`` in ``x``'s dtype, device and memory format: a 4-D ``x`` in
    ``channels_last`` gives ``channels_last`` zeros, so that copying ``x`` into them and adding
    them to the stream (also ``channels_last`` in the inference export) stays a dense,
    same-layout operation rather than a strided one."""
    if x.dim() == 4 and len(shape) == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last).zero_()
    return x.new_zeros(shape)


def scatter_channels(x: Tensor, index: Tensor, width: int, dim: int) -> Tensor:
    """``x`` with its channels (along ``dim``) placed at ``index`` of a zero tensor of ``width``
    channels (in ``x``'s memory format)."""
    shape = list(x.shape)
    shape[dim] = width
    return zeros_as(x, shape).index_copy_(dim, index, x)  # in place into the fresh zeros: no extra copy


class ScatteredOutput:
    """Mixin of the scattered layers: ``forward`` runs the layer, then places its output
    channels at ``scatter_index`` of a zero tensor with ``scatter_width`` channels.

    A scattered layer is an instance of a subclass of its original class (``isinstance``
    still holds), so it keeps its parameters, its state-dict keys and its hooks."""

    scatter_width: int
    scatter_index: Tensor

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        out = super().forward(*args, **kwargs)  # type: ignore[misc]
        return scatter_channels(out, self.scatter_index, self.scatter_width, channel_dim(self))  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        return f"{base}, scattered into {self.scatter_width} channels"


_SCATTERED: dict[type, type] = {}


def _scattered_class(cls: type) -> type:
    """The scattered subclass of ``cls`` (one per class, created once, named
    ``Scattered<cls name>`` in this module)."""
    if issubclass(cls, ScatteredOutput):
        return cls
    if cls not in _SCATTERED:
        name = f"Scattered{cls.__name__}"
        if name in globals() and globals()[name] not in _SCATTERED.values():
            name = f"Scattered{cls.__module__.replace('.', '_')}_{cls.__name__}"
        made = type(name, (ScatteredOutput, cls), {"__module__": __name__, "__doc__": f"{cls.__name__} whose output "
                                                   "channels are scattered into a wider zero tensor (see ScatteredOutput)."})
        made.__qualname__ = name
        globals()[name] = made  # importable by name (pickle), for the torch classes at least
        _SCATTERED[cls] = made
    return _SCATTERED[cls]


for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
    _scattered_class(_cls)


def is_scattered(module: nn.Module) -> bool:
    return isinstance(module, ScatteredOutput)


def scatter_output(module: nn.Module, index: Tensor | list[int], width: int) -> None:
    """Make ``module`` (a convolution, linear or batch-norm layer) place its output channels at
    ``index`` of a zero tensor with ``width`` channels, in place (or update the placement)."""
    if not isinstance(module, (_ConvNd, nn.Linear, _BatchNorm)):
        raise TypeError(f"only a convolution, linear or batch-norm layer can be scattered, got {type(module).__name__}")
    ref = next(module.parameters(), None)
    buffers = [b for b in module.buffers() if b is not None]
    device = ref.device if ref is not None else (buffers[0].device if buffers else torch.device("cpu"))
    index = torch.as_tensor(index, dtype=torch.long).to(device)
    if not is_scattered(module):
        module.__class__ = _scattered_class(type(module))
        module.register_buffer("scatter_index", index)
    else:
        module.scatter_index = index
    module.scatter_width = int(width)


def unscatter_output(module: nn.Module) -> None:
    """Undo :func:`scatter_output` (the layer's output is its own again)."""
    if not is_scattered(module):
        return
    base = next(c for c in type(module).__mro__[1:] if not issubclass(c, ScatteredOutput))
    module.__class__ = base
    del module._buffers["scatter_index"]
    del module.__dict__["scatter_width"]


def own_output_numel(module: nn.Module, out: Tensor) -> int:
    """Elements of the layer's own output in ``out`` (its forward's result): for a scattered
    layer, without the zeros it was scattered into."""
    if is_scattered(module):
        return out.numel() // module.scatter_width * module.scatter_index.numel()
    return out.numel()


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class RemovedLayer(nn.Module):
    """Stands in for a layer of a residual branch that keeps no channel; runs nothing.

    Inside the branch (``width=None``) it returns an empty tensor (0 channels) with the shape
    the layer's output would have; as the branch's last layer it returns zeros with ``width``
    channels, the stream's, which the block's own addition adds.

    Args:
        kind: ``"conv"``, ``"linear"`` or ``"norm"`` (the layer it replaces).
        width: channels of the zeros returned (the last layer of the branch), or ``None``.
        kernel_size, stride, padding, dilation: of a replaced convolution (its output size);
            ``padding`` may be ``"same"`` or ``"valid"``.
        layer: the replaced layer's class name (shown by ``repr``).
    """

    def __init__(
        self,
        kind: str,
        width: int | None = None,
        *,
        kernel_size: tuple[int, ...] = (),
        stride: tuple[int, ...] = (),
        padding: tuple[int, ...] | str = (),
        dilation: tuple[int, ...] = (),
        layer: str = "",
    ) -> None:
        super().__init__()
        if kind not in ("conv", "linear", "norm"):
            raise ValueError(f"kind must be 'conv', 'linear' or 'norm', got {kind!r}")
        self.kind = kind
        self.width = width
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)
        self.layer = layer

    @classmethod
    def replacing(cls, module: nn.Module, width: int | None) -> RemovedLayer:
        """The stand-in for ``module`` (a convolution, linear or batch-norm layer)."""
        if isinstance(module, _ConvNd):
            return cls("conv", width, kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                       dilation=module.dilation, layer=type(module).__name__)
        if isinstance(module, nn.Linear):
            return cls("linear", width, layer=type(module).__name__)
        if isinstance(module, _BatchNorm):
            return cls("norm", width, layer=type(module).__name__)
        raise TypeError(f"cannot remove a layer of type {type(module).__name__}")

    def _shape(self, x: Tensor, channels: int) -> list[int]:
        if self.kind == "linear":
            return [*x.shape[:-1], channels]
        shape = [x.shape[0], channels, *x.shape[2:]]
        if self.kind == "conv":
            n = len(self.kernel_size)
            for i in range(n):
                if self.padding == "same":
                    continue
                pad = 0 if self.padding == "valid" else self.padding[i]
                shape[2 + i] = _out_size(x.shape[2 + i], self.kernel_size[i], self.stride[i], pad, self.dilation[i])
        return shape

    def forward(self, x: Tensor) -> Tensor:
        if self.width is None:
            return x.new_empty(self._shape(x, 0))
        return zeros_as(x, self._shape(x, self.width))

    def extra_repr(self) -> str:
        what = f"zeros of {self.width} channels" if self.width is not None else "an empty tensor"
        return f"removed {self.layer or self.kind} (residual branch with no channel left): returns {what}"


def uses_mixed_modules(model: nn.Module) -> list[str]:
    """Names of the scattered and removed layers of ``model``."""
    return [n for n, m in model.named_modules() if is_scattered(m) or isinstance(m, RemovedLayer)]
