"""Low-rank decomposition of single layers, with a replayable record of what was decomposed.

- ``"svd"``: a linear layer or a 1x1 convolution (dense, no padding) with weight ``W`` (out x in)
  becomes two layers through rank ``r``: ``in -> r`` (no bias; a convolution keeps the stride)
  and ``r -> out`` (with the layer's bias), holding the best rank-``r`` approximation of ``W``.
- ``"tucker2"``: a k x k convolution (dense, zero padding) with ``c`` inputs and ``f`` outputs
  becomes 1x1 (``c -> r_in``), k x k (``r_in -> r_out``, the layer's stride, padding and
  dilation) and 1x1 (``r_out -> f``, with the layer's bias), from the leading singular
  vectors of the weight's input- and output-mode unfoldings.

Either is exact when the weight has at most these ranks. :func:`decompose` replaces the layer
in place by an ``nn.Sequential`` of the smaller layers and records the step, as plain data, in
a plain attribute of the model (copies carry it; ``forward`` never sees it)::

    decompositions(model) == [{"kind": "svd", "layer": "classifier.1", "ranks": [50], "after_steps": 0},
                              {"kind": "tucker2", "layer": "features.2", "ranks": [10, 12], "after_steps": 1}]

``after_steps`` is the number of steps of the model's pruning history
(:func:`lightning_prune.core.surgery.pruning_history`) done when the layer was decomposed, so
channel pruning and decompositions replay in their order. :func:`replay_decomposition` rebuilds
the layer structure of one step on a fresh copy of the network (shapes only; the weights come
with a state dict): :func:`lightning_prune.core.export.load_pruned` uses it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.core.surgery import pruning_history

__all__ = ["decompose", "decompositions", "replay_decomposition", "mode_bases", "svd_layer", "tucker2_layer", "KINDS",
           "DECOMPOSITIONS_ATTR"]

KINDS = ("svd", "tucker2")
DECOMPOSITIONS_ATTR = "_lightning_prune_decompositions"


def _dense_conv2d(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"


def svd_layer(m: nn.Module) -> bool:
    """Whether ``m`` can be decomposed by ``"svd"`` (a linear layer or a dense 1x1 convolution without padding)."""
    return isinstance(m, nn.Linear) or (_dense_conv2d(m) and tuple(m.kernel_size) == (1, 1) and tuple(m.padding) == (0, 0))


def tucker2_layer(m: nn.Module) -> bool:
    """Whether ``m`` can be decomposed by ``"tucker2"`` (a dense k x k convolution, k > 1)."""
    return _dense_conv2d(m) and math.prod(m.kernel_size) > 1


def decompositions(model: nn.Module) -> list[dict[str, Any]] | None:
    """The decompositions recorded on ``model`` by :func:`decompose` (plain data), or ``None``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return model.__dict__.get(DECOMPOSITIONS_ATTR)


def _kind(ranks: Any) -> str:
    if not isinstance(ranks, (list, tuple)) or len(ranks) not in (1, 2):
        raise ValueError(f"ranks must be [r] (svd) or [r_in, r_out] (tucker2), got {ranks!r}")
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise ValueError(f"ranks must be positive ints, got {ranks!r}")
    return KINDS[len(ranks) - 1]


def _structure(m: nn.Module, kind: str, ranks: tuple[int, ...], where: str) -> nn.Sequential:
    """Freshly initialised smaller layers standing for ``m`` (shapes only)."""
    factory = {"device": m.weight.device, "dtype": m.weight.dtype}
    bias = m.bias is not None
    if kind == "svd":
        if not svd_layer(m):
            raise ValueError(f"{where}: svd decomposes a linear layer or a dense 1x1 convolution without padding, "
                             f"got {type(m).__name__}")
        (r,) = ranks
        if isinstance(m, nn.Linear):
            return nn.Sequential(nn.Linear(m.in_features, r, bias=False, **factory),
                                 nn.Linear(r, m.out_features, bias=bias, **factory))
        return nn.Sequential(nn.Conv2d(m.in_channels, r, 1, stride=m.stride, bias=False, **factory),
                             nn.Conv2d(r, m.out_channels, 1, bias=bias, **factory))
    if not tucker2_layer(m):
        raise ValueError(f"{where}: tucker2 decomposes a dense k x k convolution (k > 1), got {type(m).__name__}")
    r_in, r_out = ranks
    return nn.Sequential(
        nn.Conv2d(m.in_channels, r_in, 1, bias=False, **factory),
        nn.Conv2d(r_in, r_out, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation, bias=False,
                  **factory),
        nn.Conv2d(r_out, m.out_channels, 1, bias=bias, **factory),
    )


def mode_bases(w: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors of the output-mode and input-mode unfoldings of a conv weight."""
    out_c, in_c = w.shape[:2]
    u_out = torch.linalg.svd(w.reshape(out_c, -1), full_matrices=False)[0]
    u_in = torch.linalg.svd(w.transpose(0, 1).reshape(in_c, -1), full_matrices=False)[0]
    return u_out, u_in


@torch.no_grad()
def _fill(m: nn.Module, new: nn.Sequential, kind: str, ranks: tuple[int, ...]) -> None:
    """Set the weights of ``new`` (from :func:`_structure`) to the decomposition of ``m``."""
    w = m.weight.detach().double()
    dtype = m.weight.dtype
    if kind == "svd":
        (r,) = ranks
        u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], w.shape[1]), full_matrices=False)
        a, b = new
        a.weight.copy_((vh[:r] * s[:r, None]).reshape(a.weight.shape).to(dtype))
        b.weight.copy_(u[:, :r].reshape(b.weight.shape).to(dtype))
    else:
        r_in, r_out = ranks
        out_c, in_c = w.shape[:2]
        u_out, u_in = (u[:, :r] for u, r in zip(mode_bases(w), (r_out, r_in)))
        a, core, b = new
        a.weight.copy_(u_in.T.reshape(r_in, in_c, 1, 1).to(dtype))
        core.weight.copy_(torch.einsum("oa,oikl,ib->abkl", u_out, w, u_in).to(dtype))
        b.weight.copy_(u_out.reshape(out_c, r_out, 1, 1).to(dtype))
    if m.bias is not None:
        new[-1].bias.copy_(m.bias)


def _layer(model: nn.Module, name: str, where: str) -> nn.Module:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: the layer must be named by a non-empty string, got {name!r}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{where}: {type(model).__name__} has no layer {name!r}") from None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _record(model: nn.Module, kind: str, name: str, ranks: tuple[int, ...]) -> None:
    history = pruning_history(model)
    steps = len(history["steps"]) if history is not None else 0
    model.__dict__.setdefault(DECOMPOSITIONS_ATTR, []).append(
        {"kind": kind, "layer": name, "ranks": list(ranks), "after_steps": steps}
    )


def decompose(model: nn.Module, name: str, ranks: tuple[int, ...] | list[int]) -> nn.Sequential:
    """Replace layer ``name`` of ``model`` (in place) by its decomposition at ``ranks``: ``(r,)``
    for ``"svd"``, ``(r_in, r_out)`` for ``"tucker2"``; record the step. Returns the new layers.

    Ranks above what the layer has (``min(in, out)`` for svd; ``in`` / ``out`` channels for
    tucker2) are refused: the result would cost more than the layer and compute the same.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    kind = _kind(ranks)
    ranks = tuple(ranks)
    m = _layer(model, name, "decompose")
    new = _structure(m, kind, ranks, f"decompose: layer {name!r}")
    limits = (min(m.weight.shape[0], m.weight.shape[1]),) if kind == "svd" else (m.in_channels, m.out_channels)
    if any(r > limit for r, limit in zip(ranks, limits)):
        raise ValueError(f"decompose: ranks {list(ranks)} of layer {name!r} exceed its ranks {list(limits)}")
    _fill(m, new, kind, ranks)
    new.train(m.training)
    _replace(model, name, new)
    _record(model, kind, name, ranks)
    return new


def replay_decomposition(model: nn.Module, step: Any, where: str = "decomposition") -> nn.Sequential:
    """Apply one recorded decomposition ``step`` (see :func:`decompositions`) to ``model``: the
    layer is replaced by the same smaller layers, freshly initialised (load the weights after);
    the step is recorded. ``where`` prefixes errors (``ValueError``)."""
    if not isinstance(step, Mapping) or not {"kind", "layer", "ranks"} <= set(step):
        raise ValueError(f"{where}: a decomposition step is a mapping with 'kind', 'layer' and 'ranks', got {step!r}")
    kind, name, ranks = step["kind"], step["layer"], step["ranks"]
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    if _kind(ranks) != kind:
        raise ValueError(f"{where}: {kind} takes {KINDS.index(kind) + 1} rank(s), got {ranks!r}")
    m = _layer(model, name, where)
    new = _structure(m, kind, tuple(ranks), f"{where}: layer {name!r}")
    new.train(m.training)
    _replace(model, name, new)
    _record(model, kind, name, tuple(ranks))
    return new
