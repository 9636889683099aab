"""Measuring a :class:`~lightning_prune.core.cost.latency.LatencyTable` on this machine (what
is measured and how it is modelled: :mod:`lightning_prune.core.cost.latency`), its disk cache,
and timing whole networks against a table's batch size and threads."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lightning_prune._checks import check_int
from lightning_prune.core.cost.measure import forward_with_hooks
from lightning_prune.core.cost.latency import LATENCY, LatencyKey, LatencyTable, LayerTiming
from lightning_prune.core.cost.model import CostModel
from lightning_prune.core.export import export, inference_channels_last
from lightning_prune.core.folding import shrink_as_masked
from lightning_prune.core.graph import random_masks
from lightning_prune.core.timing import interleaved_times

__all__ = ["default_cache_dir", "device_name", "measure_latency", "time_network"]

CACHE_ENV = "LP_LATENCY_CACHE"
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def device_name(device: torch.device | str = "cpu") -> str:
    """A name of the processor behind ``device``: the CPU model (``/proc/cpuinfo``), or the
    accelerator's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type != "cpu":
        return device.type
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"cpu: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()}"


def default_cache_dir() -> Path:
    """``$LP_LATENCY_CACHE``, else ``$XDG_CACHE_HOME/lightning_prune/latency`` (``~/.cache`` by default)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lightning_prune" / "latency"


def _grid(full: int, points: int, varies: bool) -> tuple[int, ...]:
    if not varies or full <= 1:
        return (full,) if not varies else (0, full)
    return tuple(sorted({0, 1, full, *(round(full * k / (points - 1)) for k in range(1, points - 1))}))


def _layer_specs(network: nn.Module, graph: Any) -> dict[str, dict[str, Any]]:
    """Per convolution / linear layer of ``graph``: what is needed to rebuild and time it (its
    hyper-parameters and the input shape of every call, without the batch dimension)."""
    modules = dict(network.named_modules())
    shapes: dict[str, list[list[int]]] = {}
    hooks = []
    for name, layer in graph.layers.items():
        if layer.kind == "norm":
            continue
        module = modules.get(name)
        if not isinstance(module, (_ConvNd, nn.Linear)) or getattr(module, "transposed", False):
            raise ValueError(f"latency: cannot time layer {name!r} ({type(module).__name__}); only Conv1d/2d/3d and Linear are timed")

        def hook(_m: nn.Module, args: tuple, _out: Any, name: str = name) -> None:
            shapes.setdefault(name, []).append(list(args[0].shape[1:]))

        hooks.append((module, hook))
    forward_with_hooks(network, tuple(t.to(_device_of(network)) for t in graph.example_input()), hooks)
    varies_in = {m.module for g in graph.groups.values() for m in g.members if m.role == "in"}
    varies_out = {m.module for g in graph.groups.values() for m in g.members if m.role in ("out", "channel")}
    specs = {}
    for name, layer in graph.layers.items():
        if layer.kind == "norm" or name not in shapes:
            continue
        module = modules[name]
        spec: dict[str, Any] = {"type": type(module).__name__, "calls": shapes[name]}
        if isinstance(module, _ConvNd):
            spec.update(
                dims=len(module.kernel_size), kernel_size=list(module.kernel_size), stride=list(module.stride),
                padding=module.padding if isinstance(module.padding, str) else list(module.padding),
                dilation=list(module.dilation), padding_mode=module.padding_mode, groups=module.groups,
                depthwise=layer.depthwise,
            )
        cin_full = 1 if layer.depthwise else layer.in_channels // layer.groups
        spec["cin"] = cin_full
        spec["out"] = layer.out_channels
        spec["varies_in"] = name in varies_in and not layer.depthwise
        spec["varies_out"] = name in varies_out
        specs[name] = spec
    return specs


def _device_of(network: nn.Module) -> torch.device:
    param = next(network.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _build(spec: Mapping[str, Any], cin: int, out: int, key: LatencyKey, device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> tuple[nn.Module, list[Tensor]]:
    """The layer of ``spec`` with ``cin`` inputs (per group) and ``out`` outputs, and one input per call."""
    if spec["type"] == "Linear":
        module: nn.Module = nn.Linear(cin, out, bias=True)
        inputs = [torch.randn(key.batch_size, *shape[:-1], cin, generator=generator) for shape in spec["calls"]]
    else:
        groups = out if spec["depthwise"] else spec["groups"]
        in_channels = out if spec["depthwise"] else cin * groups
        module = _CONV[spec["dims"]](
            in_channels, out, spec["kernel_size"], stride=spec["stride"], padding=spec["padding"],
            dilation=spec["dilation"], groups=groups, bias=True, padding_mode=spec["padding_mode"],
        )
        inputs = [torch.randn(key.batch_size, in_channels, *shape[1:], generator=generator) for shape in spec["calls"]]
    module = module.to(device, dtype).eval()
    inputs = [x.to(device, dtype) for x in inputs]
    if key.channels_last and spec.get("dims") == 2:
        module = module.to(memory_format=torch.channels_last)
        inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
    return module, inputs


def _fastest_ns(runs: Mapping[str, Any], repeats: int, device: torch.device) -> dict[str, float]:
    """Nanoseconds of the fastest of ``repeats`` calls of each callable in ``runs`` (no
    arguments), timed interleaved after one warm-up. The minimum, not the median: other
    processes only ever add time, so the fastest run is the closest to the machine's own."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return {k: min(v) * 1e9 for k, v in interleaved_times(runs, repeats, warmup=1, sync=sync).items()}


def _time_layer(spec: Mapping[str, Any], points: int, repeats: int, key: LatencyKey, device: torch.device, dtype: torch.dtype) -> LayerTiming:
    """The layer of ``spec`` timed on its grid of kept widths (0 ns with no input or output channel)."""
    cin_grid = _grid(spec["cin"], points, spec["varies_in"])
    out_grid = _grid(spec["out"], points, spec["varies_out"])
    generator = torch.Generator().manual_seed(0)
    runs = {}
    for i, cin in enumerate(cin_grid):
        for j, out in enumerate(out_grid):
            if cin == 0 or out == 0:
                continue
            module, inputs = _build(spec, cin, out, key, device, dtype, generator)
            runs[f"{i},{j}"] = lambda module=module, inputs=inputs: [module(x) for x in inputs]
    fastest = _fastest_ns(runs, repeats, device)
    grid = torch.tensor([[fastest.get(f"{i},{j}", 0.0) for j in range(len(out_grid))] for i in range(len(cin_grid))],
                        dtype=torch.float64)
    # A layer with more channels is not faster: noise that says otherwise is taken out (running maxima).
    grid = grid.cummax(dim=0).values.cummax(dim=1).values
    return LayerTiming(cin_grid, out_grid, tuple(tuple(row) for row in grid.tolist()))


def _signature(spec: Mapping[str, Any], points: int) -> str:
    return json.dumps({**spec, "grid": points}, sort_keys=True)


def _network_signature(graph: Any, specs: Mapping[str, Any], points: int) -> str:
    groups = [(n, g.size, [(m.module, m.role) for m in g.members], g.stream) for n, g in graph.groups.items()]
    text = json.dumps({"layers": specs, "groups": groups, "residual": graph.residual, "grid": points}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def _read_cache(path: Path, key: LatencyKey) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"key": asdict(key), "layers": {}, "networks": {}}
    except (OSError, ValueError) as err:
        raise ValueError(f"latency cache {path}: unreadable ({err}); delete the file to measure again") from err
    if data.get("key") != asdict(key) or not isinstance(data.get("layers"), dict) or not isinstance(data.get("networks"), dict):
        raise ValueError(f"latency cache {path}: not a cache file of {key.describe()}; delete the file to measure again")
    return data


def _write_cache(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".latency-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


CALIBRATION_FRACTIONS = (1.0, 0.85, 0.7, 0.55, 0.4, 0.25, 0.15)
# of every group's channels kept in the networks the rest of the latency is fitted to
DENSE_WEIGHT = 10.0  # of the dense network's error in the fit


def _inference_form(network: nn.Module, graph: Any, masks: Mapping[str, Tensor] | None, example: tuple[Tensor, ...]) -> nn.Module:
    net = copy.deepcopy(network)
    if masks is not None:
        shrink_as_masked(net, masks, graph=graph)
    return export(net, inference=True, example_input=example, allow_over_budget=True).eval()


def measure_latency(
    network: nn.Module,
    graph: Any,
    *,
    batch_size: int,
    threads: int | None = None,
    grid: int = 5,
    repeats: int = 7,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
) -> LatencyTable:
    """Measure the latency model of ``network`` (whose channel graph is ``graph``, from
    :func:`~lightning_prune.build_graph`) on the device and in the dtype of its parameters.

    Args:
        batch_size: the batch size the network will run at (latency is per forward pass of a batch).
        threads: intra-op threads (``torch.set_num_threads``) during the measurement and in the
            key; default: the current number.
        grid: points per pruned dimension of a layer (from 1 channel to the full width; 0 is added).
        repeats: timed rounds (the fastest counts; one warm-up round first).
        cache_dir: folder of the cache files (default :func:`default_cache_dir`).
        cache: read and write the cache; ``False`` measures everything again and writes nothing.
    """
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be an nn.Module, got {type(network).__name__}")
    check_int("batch_size", batch_size, 1)
    check_int("grid", grid, 2)
    check_int("repeats", repeats, 1)
    if threads is not None:
        check_int("threads", threads, 1)
    device = _device_of(network)
    param = next(network.parameters(), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    old_threads = torch.get_num_threads()
    threads = old_threads if threads is None else threads
    key = LatencyKey(device_name(device), device.type, str(torch.__version__), str(dtype).removeprefix("torch."), threads,
                     batch_size, inference_channels_last(network))
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / key.file_name()
    data = _read_cache(path, key) if cache else {"key": asdict(key), "layers": {}, "networks": {}}
    specs = _layer_specs(network, graph)
    torch.set_num_threads(threads)
    changed = False
    try:
        timings = {}
        for name, spec in specs.items():
            signature = _signature(spec, grid)
            if signature not in data["layers"]:
                data["layers"][signature] = asdict(_time_layer(spec, grid, repeats, key, device, dtype))
                changed = True
            t = data["layers"][signature]
            timings[name] = LayerTiming(tuple(t["cin"]), tuple(t["out"]), tuple(tuple(r) for r in t["ns"]))
        net_key = _network_signature(graph, specs, grid)
        if net_key not in data["networks"]:
            data["networks"][net_key] = _calibrate(network, graph, timings, key, device, repeats)
            changed = True
        fit = data["networks"][net_key]
    finally:
        torch.set_num_threads(old_threads)
    if cache and changed:
        _write_cache(path, data)
    return LatencyTable(key, timings, fit["offset"], fit["per_volume"], fit["per_scatter"], fit["measured"], fit["predicted"],
                        fit["layer_scale"])


def _calibrate(network: nn.Module, graph: Any, timings: Mapping[str, LayerTiming], key: LatencyKey, device: torch.device, repeats: int) -> dict[str, Any]:
    """Fit the measured latency as ``layer_scale x (the layers' timings) + offset + per_volume x V
    + per_scatter x S`` by least squares. ``V``: activation volume; ``S``: the stream channels x
    positions that pruned mixed-connectivity branches are scattered and added into (0 for tied
    blocks); the scale: layers timed alone run faster or slower than inside the network. The
    networks: :data:`CALIBRATION_FRACTIONS` of every group's channels kept at random, timed
    interleaved in their inference form; the dense network's error weighs :data:`DENSE_WEIGHT`
    times (the budget is a fraction of its latency). An offset or a coefficient of ``V`` or ``S``
    the fit makes negative is dropped (0; a negative offset would predict negative latencies for
    the smallest networks), a scale under 0.5 too (1)."""
    example = tuple(t.to(device) for t in graph.example_input())
    batch = _batch_of(example, key)
    generator = torch.Generator().manual_seed(0)
    masks = {f"{f:g}": (graph.full_masks() if f == 1 else random_masks(graph, f, generator)) for f in CALIBRATION_FRACTIONS}
    nets = {k: _inference_form(network, graph, None if k == "1" else m, example) for k, m in masks.items()}
    measured = _fastest_ns({k: (lambda net=net: net(*batch)) for k, net in nets.items()}, repeats, device)
    layers_only = CostModel(graph, latency=LatencyTable(key, timings, 0.0, 0.0, 0.0, {}, {}))
    # features: 1, V, S and the layers' own timings (whose coefficient is their scale)
    features = {k: [1.0, float(layers_only.exact(m, "volume")), float(layers_only.scatter_volume(m)),
                    float(layers_only.exact(m, LATENCY))] for k, m in masks.items()}
    used = [0, 1, 2, 3] if any(f[2] for f in features.values()) else [0, 1, 3]
    weight = torch.tensor([DENSE_WEIGHT if k == "1" else 1.0 for k in masks], dtype=torch.float64).unsqueeze(1)
    coef = [0.0, 0.0, 0.0, 1.0]
    solution: list[float] = []
    while used:  # a scale dropped from the fit stays 1: the target is then what the layers' timings miss
        target = [measured[k] - (0.0 if 3 in used else features[k][3]) for k in masks]
        a = weight * torch.tensor([[features[k][c] for c in used] for k in masks], dtype=torch.float64)
        b = weight * torch.tensor(target, dtype=torch.float64).unsqueeze(1)
        scale = a.abs().amax(0).clamp_min(1.0)
        solution = (torch.linalg.lstsq(a / scale, b).solution.squeeze(1) / scale).tolist()
        dropped = [c for c, x in zip(used, solution) if (c in (0, 1, 2) and x < 0) or (c == 3 and x < 0.5)]
        if not dropped:
            break
        used.remove(dropped[0])
    for c, x in zip(used, solution):
        coef[c] = x
    predicted = {k: sum(c * f for c, f in zip(coef, features[k])) for k in masks}
    return {"offset": coef[0], "per_volume": coef[1], "per_scatter": coef[2], "layer_scale": coef[3],
            "measured": measured, "predicted": predicted}


def _batch_of(example: tuple[Tensor, ...], key: LatencyKey) -> tuple[Tensor, ...]:
    batch = tuple(t.expand(key.batch_size, *t.shape[1:]).clone() for t in example)
    if key.channels_last:
        batch = tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in batch)
    return batch


def time_network(networks: Mapping[str, nn.Module], table: LatencyTable, example_input: Tensor | tuple[Tensor, ...], repeats: int = 7) -> dict[str, float]:
    """Measured nanoseconds per forward pass of each of ``networks`` (timed interleaved, the
    fastest of ``repeats``) at the batch size and thread count of ``table``, on an input shaped
    like ``example_input`` (the batch dimension is replaced). Give the networks in the form to
    compare with the table's predictions: their inference export."""
    check_int("repeats", repeats, 1)
    example = example_input if isinstance(example_input, tuple) else (example_input,)
    for network in networks.values():
        table.check_network(network)
    device = _device_of(next(iter(networks.values())))
    batch = _batch_of(tuple(t.to(device) for t in example), table.key)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(table.key.threads)
    try:
        for network in networks.values():
            network.eval()
        return _fastest_ns({k: (lambda net=net: net(*batch)) for k, net in networks.items()}, repeats, device)
    finally:
        torch.set_num_threads(old_threads)
