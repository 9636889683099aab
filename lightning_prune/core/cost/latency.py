"""Latency as a cost: how long the network's inference form takes on this device, as a function
of the channels each group keeps.

A :class:`LatencyTable` is measured once per network, device, dtype, thread count and batch
size by :func:`measure_latency`:

1. **Layers.** Every convolution and linear layer of the channel graph is rebuilt alone at a
   grid of kept (input, output) widths -- ``grid`` points from one channel to the full width
   along each dimension that pruning changes, plus 0 (a layer with no input or no output
   channel runs nothing) -- and timed on a random input of its recorded shape at
   ``batch_size``, in the form the inference export runs it (bias on: the batch norm folded
   in; 2-D convolutions ``channels_last``). Layers with the same shape share one timing.
2. **The rest.** Batch norms that do not fold, activations, additions, pooling and the
   framework's per-call overhead are not timed layer by layer: the whole network is timed
   in its inference form (:func:`lightning_prune.export` with ``inference=True``) dense and
   with half of every group's channels removed at random, and the difference between those
   measurements and the sum of the layer timings is fitted as ``offset + per_volume x V``
   (``V``: the activation volume, which the memory-bound work follows). So the model's
   prediction equals the measured latency of those two networks.

:class:`~lightning_prune.core.cost.model.CostModel` (``CostModel(graph, latency=table)``)
then predicts, for keep-masks, ``offset + sum over layers of T_l(cin_l, out_l) + per_volume
x V`` in nanoseconds per forward pass of a batch, ``T_l`` interpolated bilinearly in the
layer's grid. With open-probabilities instead of masks it evaluates the same formula at the
expected widths, which is differentiable (piecewise linear), as the gates of BAR need; the
expectation of a bilinear interpolation is not exactly the interpolation at the expectation,
but the two agree at 0/1 probabilities.

Measurements are cached on disk (one JSON file per device, torch version, dtype, memory
format, threads and batch size, under ``$LP_LATENCY_CACHE`` or
``~/.cache/lightning_prune/latency``): layers with a shape already timed and networks already
calibrated are not measured again. Timings are the fastest of interleaved repeats (other processes only add time); they are
still as noisy as the machine, which is why a budget in latency is checked against the model's
prediction (deterministic), and the exported network's measured latency is reported next
to it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lightning_prune._checks import check_int

__all__ = [
    "LATENCY", "LatencyKey", "LatencyTable", "LayerTiming", "check_latency_option", "default_cache_dir", "device_name", "measure_latency", "time_network",
]

LATENCY = "latency"
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


@dataclass(frozen=True)
class LatencyKey:
    """Where and how a latency table was measured; a table applies only to the same key."""

    device: str  # device_name(): the processor
    device_type: str  # "cpu", "cuda", ...
    torch: str
    dtype: str
    threads: int
    batch_size: int
    channels_last: bool

    def file_name(self) -> str:
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]
        return f"{digest}.json"

    def describe(self) -> str:
        return (
            f"{self.device_type} ({self.device}), {self.dtype}, batch {self.batch_size}, {self.threads} thread(s), "
            f"torch {self.torch}"
        )


@dataclass(frozen=True)
class LayerTiming:
    """Nanoseconds of one layer per batch on the grid ``cin x out`` of kept widths, in the units
    of :class:`~lightning_prune.core.cost.model.CostModel` (``cin``: input channels per group,
    or input features of a linear layer; ``out``: output channels)."""

    cin: tuple[int, ...]
    out: tuple[int, ...]
    ns: tuple[tuple[float, ...], ...]  # ns[i][j] at (cin[i], out[j])

    def at(self, cin: int, out: int) -> float:
        """The bilinear interpolation at one point (a plain float; see ``CostModel`` for tensors)."""
        def locate(grid: tuple[int, ...], x: float) -> tuple[int, float]:
            if len(grid) == 1:
                return 0, 0.0
            i = max(0, min(len(grid) - 2, sum(1 for g in grid if g <= x) - 1))
            return i, (x - grid[i]) / (grid[i + 1] - grid[i])

        i, ti = locate(self.cin, cin)
        j, tj = locate(self.out, out)
        i1, j1 = min(i + 1, len(self.cin) - 1), min(j + 1, len(self.out) - 1)
        ns = self.ns
        return (
            ns[i][j] * (1 - ti) * (1 - tj) + ns[i][j1] * (1 - ti) * tj + ns[i1][j] * ti * (1 - tj) + ns[i1][j1] * ti * tj
        )


@dataclass(frozen=True)
class LatencyTable:
    """A measured latency model (see the module docstring): per-layer timings and the fit of
    everything else, ``offset + per_volume x V`` nanoseconds."""

    key: LatencyKey
    layers: Mapping[str, LayerTiming]
    offset: float
    per_volume: float
    per_scatter: float
    measured: Mapping[str, float]  # the calibration: measured ns of the networks it was fitted to, by kept fraction
    predicted: Mapping[str, float]  # and the fit's prediction for each

    def check_network(self, network: nn.Module) -> None:
        """``ValueError`` unless ``network`` is on the device type and dtype the table was measured on."""
        param = next(network.parameters(), None)
        if param is None:
            return
        if param.device.type != self.key.device_type or str(param.dtype).removeprefix("torch.") != self.key.dtype:
            raise ValueError(
                f"latency: the latency model was measured on {self.key.describe()}; the network is on "
                f"{param.device.type}, {str(param.dtype).removeprefix('torch.')}: measure it again on the device and dtype "
                "the network runs on (lightning_prune.measure_latency)"
            )

    def check_graph(self, graph: Any) -> None:
        """``ValueError`` unless the table times every convolution and linear layer of ``graph``
        at widths up to the layer's."""
        for name, layer in graph.layers.items():
            if layer.kind == "norm":
                continue
            timing = self.layers.get(name)
            if timing is None:
                raise ValueError(
                    f"latency: the latency model has no timing of layer {name!r}; it was measured on another network"
                )
            cin = 1 if layer.depthwise else layer.in_channels // layer.groups
            if cin > max(timing.cin) or layer.out_channels > max(timing.out):
                raise ValueError(
                    f"latency: layer {name!r} ({cin} inputs, {layer.out_channels} outputs) is wider than the latency "
                    f"model's timing of it ({max(timing.cin)}, {max(timing.out)}); it was measured on another network"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": asdict(self.key), "offset": self.offset, "per_volume": self.per_volume, "per_scatter": self.per_scatter,
            "measured": dict(self.measured), "predicted": dict(self.predicted),
            "layers": {n: {"cin": list(t.cin), "out": list(t.out), "ns": [list(r) for r in t.ns]} for n, t in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        try:
            layers = {
                n: LayerTiming(tuple(int(c) for c in t["cin"]), tuple(int(o) for o in t["out"]), tuple(tuple(float(v) for v in r) for r in t["ns"]))
                for n, t in data["layers"].items()
            }
            return cls(
                LatencyKey(**data["key"]), layers, float(data["offset"]), float(data["per_volume"]), float(data["per_scatter"]),
                dict(data["measured"]), dict(data["predicted"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"latency: not a latency table ({type(err).__name__}: {err})") from err


def check_latency_option(cost: str, latency: object) -> LatencyTable | dict[str, Any] | None:
    """The ``latency=`` argument of a session or callback, checked against ``cost``."""
    if cost != LATENCY:
        if latency is not None:
            raise ValueError(f"latency: a latency model is used only with cost='latency', got cost={cost!r}")
        return None
    if latency is None:
        raise ValueError(
            "latency: cost='latency' needs the batch size to time the network at, e.g. latency={'batch_size': 256} "
            "(keyword arguments of lightning_prune.measure_latency), or a LatencyTable"
        )
    if isinstance(latency, LatencyTable):
        return latency
    if not isinstance(latency, Mapping):
        raise TypeError(f"latency must be a LatencyTable or a mapping of measure_latency arguments, got {type(latency).__name__}")
    options = dict(latency)
    allowed = {"batch_size", "threads", "grid", "repeats", "cache_dir", "cache"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"latency: unknown option {unknown[0]!r}; the options are {', '.join(sorted(allowed))}")
    if "batch_size" not in options:
        raise ValueError("latency: give the batch size to time the network at, e.g. latency={'batch_size': 256}")
    return options


# -- measuring ---------------------------------------------------------------------------------
def _grid(full: int, points: int, varies: bool) -> tuple[int, ...]:
    if not varies or full <= 1:
        return (full,) if not varies else (0, full)
    return tuple(sorted({0, 1, full, *(round(full * k / (points - 1)) for k in range(1, points - 1))}))


def _layer_specs(network: nn.Module, graph: Any) -> dict[str, dict[str, Any]]:
    """Per convolution / linear layer of ``graph``: what is needed to rebuild and time it (its
    hyper-parameters and the input shape of every call, without the batch dimension)."""
    modules = dict(network.named_modules())
    shapes: dict[str, list[list[int]]] = {}
    handles = []
    for name, layer in graph.layers.items():
        if layer.kind == "norm":
            continue
        module = modules.get(name)
        if not isinstance(module, (_ConvNd, nn.Linear)) or getattr(module, "transposed", False):
            raise ValueError(f"latency: cannot time layer {name!r} ({type(module).__name__}); only Conv1d/2d/3d and Linear are timed")

        def hook(_m: nn.Module, args: tuple, _out: Any, name: str = name) -> None:
            shapes.setdefault(name, []).append(list(args[0].shape[1:]))

        handles.append(module.register_forward_hook(hook))
    was_training = network.training
    network.eval()
    try:
        example = tuple(t.to(_device_of(network)) for t in graph.example_input())
        with torch.no_grad():
            network(*example)
    finally:
        for h in handles:
            h.remove()
        network.train(was_training)
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _fastest_ns(runs: Mapping[str, Any], repeats: int, device: torch.device) -> dict[str, float]:
    """Nanoseconds of the fastest of ``repeats`` calls of each callable in ``runs`` (no
    arguments), timed interleaved after one warm-up. The minimum, not the median: other
    processes only ever add time, so the fastest run is the closest to the machine's own."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for round_ in range(repeats + 1):
        for k, run in runs.items():
            _sync(device)
            start = time.perf_counter_ns()
            run()
            _sync(device)
            if round_:
                times[k].append(time.perf_counter_ns() - start)
    return {k: float(min(v)) for k, v in times.items()}


def _time_layer(spec: Mapping[str, Any], points: int, repeats: int, key: LatencyKey, device: torch.device, dtype: torch.dtype) -> LayerTiming:
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
    medians = _fastest_ns(runs, repeats, device)
    ns = tuple(tuple(medians.get(f"{i},{j}", 0.0) for j in range(len(out_grid))) for i in range(len(cin_grid)))
    return LayerTiming(cin_grid, out_grid, ns)


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


CALIBRATION_FRACTIONS = (1.0, 0.75, 0.5, 0.25)  # of every group's channels kept in the networks the rest is fitted to


def _inference_form(network: nn.Module, graph: Any, masks: Mapping[str, Tensor] | None, example: tuple[Tensor, ...]) -> nn.Module:
    from lightning_prune.core.export import export
    from lightning_prune.core.folding import shrink_as_masked

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
    param = next(network.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    old_threads = torch.get_num_threads()
    threads = old_threads if threads is None else threads
    has_conv2d = any(isinstance(m, nn.Conv2d) for m in network.modules())
    key = LatencyKey(device_name(device), device.type, torch.__version__, str(dtype).removeprefix("torch."), threads, batch_size, has_conv2d)
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
    return LatencyTable(key, timings, fit["offset"], fit["per_volume"], fit["per_scatter"], fit["measured"], fit["predicted"])


def _calibrate(network: nn.Module, graph: Any, timings: Mapping[str, LayerTiming], key: LatencyKey, device: torch.device, repeats: int) -> dict[str, Any]:
    """Fit what the layer timings miss as ``offset + per_volume x V + per_scatter x S`` (``V``:
    activation volume; ``S``: the stream channels x positions that mixed-connectivity branches
    are scattered and added into, 0 for tied blocks) by least squares, from the network with
    :data:`CALIBRATION_FRACTIONS` of every group's channels kept at random, timed interleaved
    in their inference form. A coefficient the fit makes negative is dropped (fixed at 0)."""
    from lightning_prune.core.cost.model import CostModel

    example = tuple(t.to(device) for t in graph.example_input())
    batch = _batch_of(example, key)
    from lightning_prune.core.graph import random_masks

    generator = torch.Generator().manual_seed(0)
    masks = {f"{f:g}": (graph.full_masks() if f == 1 else random_masks(graph, f, generator)) for f in CALIBRATION_FRACTIONS}
    nets = {k: _inference_form(network, graph, None if k == "1" else m, example) for k, m in masks.items()}
    measured = _fastest_ns({k: (lambda net=net: net(*batch)) for k, net in nets.items()}, repeats, device)
    layers_only = CostModel(graph, latency=LatencyTable(key, timings, 0.0, 0.0, 0.0, {}, {}))
    features = {k: [1.0, float(layers_only.exact(m, "volume")), float(layers_only.scatter_volume(m))] for k, m in masks.items()}
    rest = {k: measured[k] - layers_only.exact(m, LATENCY) for k, m in masks.items()}
    used = [0, 1] + ([2] if any(f[2] for f in features.values()) else [])
    while True:
        a = torch.tensor([[features[k][c] for c in used] for k in masks], dtype=torch.float64)
        b = torch.tensor([rest[k] for k in masks], dtype=torch.float64).unsqueeze(1)
        scale = a.abs().amax(0).clamp_min(1.0)
        solution = (torch.linalg.lstsq(a / scale, b).solution.squeeze(1) / scale).tolist()
        negative = [c for c, x in zip(used, solution) if c and x < 0]
        if not negative:
            break
        used.remove(negative[0])
    coef = [0.0, 0.0, 0.0]
    for c, x in zip(used, solution):
        coef[c] = x
    predicted = {k: measured[k] - rest[k] + sum(c * f for c, f in zip(coef, features[k])) for k in masks}
    return {"offset": coef[0], "per_volume": coef[1], "per_scatter": coef[2], "measured": measured, "predicted": predicted}


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
    device = next(iter(networks.values())).parameters().__next__().device
    batch = _batch_of(tuple(t.to(device) for t in example), table.key)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(table.key.threads)
    try:
        for network in networks.values():
            network.eval()
        return _fastest_ns({k: (lambda net=net: net(*batch)) for k, net in networks.items()}, repeats, device)
    finally:
        torch.set_num_threads(old_threads)
