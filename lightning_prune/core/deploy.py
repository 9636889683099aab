"""Portable forms of a pruned network: an ONNX file and a ``torch.export.ExportedProgram``.

Both go through :func:`lightning_prune.core.export.export`, so they take what ``export`` takes: a
LightningModule or a network, with gates attached (shrunk to the channels the gates keep) or
already shrunk, and by default the inference form (eval mode, batch norms folded, see
:mod:`lightning_prune.core.inference`).

:func:`export_onnx` writes the network with the ``torch.export``-based ONNX exporter of PyTorch
(``torch.onnx.export(..., dynamo=True)``), which needs the packages ``onnx`` and ``onnxscript``;
by default it then runs the file in ONNX Runtime (package ``onnxruntime``) and compares the
result with PyTorch's. ``pip install "lightning-prune[deploy]"`` installs the three.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune._checks import check_bool, check_int
from lightning_prune.core.cost.measure import check_example
from lightning_prune.core.export import export

__all__ = ["export_onnx", "export_program", "MIN_OPSET"]

MIN_OPSET = 18  # the lowest opset PyTorch's ONNX exporter implements (it silently writes 18 for less)
ATOL = 1e-4  # ONNX Runtime vs PyTorch, relative to the largest output magnitude (at least 1)
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to a "<path>.data" file (one protobuf holds at most 2 GiB)


def _require(packages: tuple[str, ...], what: str) -> None:
    for package in packages:
        if importlib.util.find_spec(package) is None:
            raise ModuleNotFoundError(
                f"{what} needs the package {package!r}, which is not installed; install it with "
                f"pip install \"lightning-prune[deploy]\" (onnx, onnxscript and onnxruntime)",
                name=package,
            )


def _example(example_input: Any) -> tuple[Tensor, ...]:
    if example_input is None:
        raise TypeError("example_input must be a tensor or a tuple of tensors (a batch for the network), got None")
    return check_example(example_input)


def _traced(example: tuple[Tensor, ...], dynamic_batch: bool) -> tuple[tuple[Tensor, ...], tuple[dict[int, Any], ...] | None]:
    """The inputs to trace with and their dynamic shapes: with ``dynamic_batch``, dimension 0 of
    every input is ``Dim.DYNAMIC``, and a batch of 1 is traced as a batch of 2 (the sample twice):
    ``torch.export`` specializes a dimension whose example size is 0 or 1 to that constant."""
    if not dynamic_batch:
        return example, None
    inputs = tuple(torch.cat([t, t]) if t.dim() > 0 and t.shape[0] == 1 else t for t in example)
    return inputs, tuple({0: torch.export.Dim.DYNAMIC} for _ in inputs)


def _network(module: nn.Module, example: tuple[Tensor, ...], inference: bool, allow_over_budget: bool) -> nn.Module:
    check_bool("inference", inference)
    check_bool("allow_over_budget", allow_over_budget)
    # Memory format is not part of an exported graph: keep the weights contiguous.
    net = export(module, allow_over_budget=allow_over_budget, inference=inference,
                 example_input=example if inference else None, channels_last=False)
    return net.eval()


def export_program(
    module: nn.Module,
    example_input: Tensor | tuple[Tensor, ...],
    *,
    inference: bool = True,
    dynamic_batch: bool = True,
    allow_over_budget: bool = False,
) -> torch.export.ExportedProgram:
    """The pruned network inside ``module`` (see :func:`lightning_prune.core.export.export`) as a
    ``torch.export.ExportedProgram`` (``torch.export.export(..., strict=False)``), in eval mode.

    Args:
        module: a LightningModule or network, gated or already shrunk.
        example_input: a batch for the network (a tensor or a tuple of tensors, batch first).
        inference: export the inference form (batch norms folded into the layers before them).
        dynamic_batch: the first dimension of every input is dynamic (any batch size runs);
            ``False`` specializes the program to the example's shapes.
        allow_over_budget: as for ``export``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    example = _example(example_input)
    check_bool("dynamic_batch", dynamic_batch)
    net = _network(module, example, inference, allow_over_budget)
    inputs, dynamic_shapes = _traced(example, dynamic_batch)
    return torch.export.export(net, inputs, dynamic_shapes=dynamic_shapes, strict=False)


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike,
    example_input: Tensor | tuple[Tensor, ...],
    *,
    inference: bool = True,
    dynamic_batch: bool = True,
    opset_version: int | None = None,
    check: bool = True,
    allow_over_budget: bool = False,
) -> Path:
    """Write the pruned network inside ``module`` (see :func:`lightning_prune.core.export.export`)
    to the ONNX file ``path``, in eval mode; return the path.

    The weights are stored in the file itself, unless they take more than 1 GiB: then they go
    to ``<path>.data`` beside it (ONNX's external data; keep the two files together).

    Args:
        module: a LightningModule or network, gated or already shrunk.
        path: the ``.onnx`` file to write (its directory must exist; an existing file is
            replaced).
        example_input: a batch for the network (a tensor or a tuple of tensors, batch first):
            the exporter runs it, and the check compares outputs on it.
        inference: export the inference form (batch norms folded into the layers before them).
        dynamic_batch: the first dimension of every input is dynamic in the file (any batch
            size runs); ``False`` fixes the example's shapes.
        opset_version: the ONNX operator set (at least 18); default: PyTorch's choice.
        check: run the file in ONNX Runtime (on the example and, with ``dynamic_batch``, on the
            example twice over, a batch of another size) and compare with PyTorch: a difference
            above ``1e-4`` of the largest output magnitude raises a ``ValueError`` (the file is
            left for inspection).
        allow_over_budget: as for ``export``.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: a bad value (a ``path`` that is a directory, an ``opset_version`` below 18),
            or outputs that differ (``check``).
        FileNotFoundError: the directory of ``path`` does not exist.
        ModuleNotFoundError: ``onnx`` or ``onnxscript`` (or, with ``check``, ``onnxruntime``)
            is not installed; the message names it.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise TypeError(f"path must be a str or os.PathLike naming the .onnx file to write, got {type(path).__name__}")
    target = Path(path)
    if not str(path) or target.is_dir():
        raise ValueError(f"path must name a file to write, got {os.fspath(path)!r}, which is a directory")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"path: the directory {target.parent} of {target.name!r} does not exist; create it first")
    example = _example(example_input)
    check_bool("dynamic_batch", dynamic_batch)
    check_bool("check", check)
    if opset_version is not None:
        check_int("opset_version", opset_version, MIN_OPSET)
    _require(("onnx", "onnxscript") + (("onnxruntime",) if check else ()), "export_onnx")
    net = _network(module, example, inference, allow_over_budget)
    size = sum(t.numel() * t.element_size() for t in net.state_dict().values() if isinstance(t, Tensor))
    inputs, dynamic_shapes = _traced(example, dynamic_batch)
    torch.onnx.export(
        net, inputs, target, dynamo=True, verbose=False, opset_version=opset_version,
        dynamic_shapes=dynamic_shapes, external_data=size > EXTERNAL_DATA_BYTES,
    )  # fmt: skip
    if check:
        batches = [example] + ([tuple(torch.cat([t, t]) for t in example)] if dynamic_batch else [])
        for batch in batches:
            _compare(net, target, batch)
    return target


def _flat(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat(v)]
    return []


def _compare(net: nn.Module, path: Path, batch: tuple[Tensor, ...]) -> None:
    """Run ``path`` in ONNX Runtime on ``batch`` and compare with ``net``; ValueError if they differ."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as PyTorch may use
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    with torch.no_grad():
        expected = [t.detach().cpu() for t in _flat(net(*batch))]
    got = session.run(None, {name: t.detach().cpu().numpy() for name, t in zip(names, batch)})
    if len(got) != len(expected):
        raise ValueError(f"export_onnx: {path} returns {len(got)} outputs in ONNX Runtime, PyTorch {len(expected)}")
    for i, (a, b) in enumerate(zip(got, expected)):
        a = torch.from_numpy(a)
        if a.shape != b.shape:
            raise ValueError(f"export_onnx: output {i} of {path} has shape {tuple(a.shape)} in ONNX Runtime, "
                             f"{tuple(b.shape)} in PyTorch (batch of {batch[0].shape[0]})")
        scale = max(float(b.abs().max()) if b.numel() and b.is_floating_point() else 0.0, 1.0)
        diff = float((a.double() - b.double()).abs().max()) if b.numel() else 0.0
        if not diff <= ATOL * scale:
            raise ValueError(f"export_onnx: output {i} of {path} differs between ONNX Runtime and PyTorch by {diff:.3g} "
                             f"(allowed {ATOL * scale:.3g}, batch of {batch[0].shape[0]}); the file was left for inspection")
