"""Latency as a cost: how long the network's inference form takes on this device, as a function
of the channels each group keeps. This module holds the model (plain data); measuring it is
:func:`lightning_prune.core.cost.latency_measure.measure_latency`.

A :class:`LatencyTable` is measured once per network, device, dtype, thread count and batch size:

1. **Layers.** Every convolution and linear layer of the channel graph is rebuilt alone at a
   grid of kept (input, output) widths -- ``grid`` points from one channel to the full width
   along each dimension that pruning changes, plus 0 (a layer with no input or no output
   channel runs nothing) -- and timed on a random input of its recorded shape at
   ``batch_size``, in the form the inference export runs it (bias on: the batch norm folded
   in; 2-D convolutions ``channels_last``). Layers with the same shape share one timing.
2. **The rest.** Batch norms that do not fold, activations, additions, pooling, the scatter of
   mixed-connectivity branches and the framework's per-call overhead are not timed layer by
   layer: the whole network is timed in its inference form (:func:`lightning_prune.export`
   with ``inference=True``) with 100, 85, 70, 55, 40, 25 and 15% of every group's channels kept
   at random, and a least-squares fit gives ``layer_scale`` (layers alone run faster or slower
   than inside the network), ``offset``, ``per_volume`` (per unit of activation volume ``V``,
   which the memory-bound work follows) and ``per_scatter`` (per stream channel x position
   that a pruned mixed block scatters into, ``S``); the dense network weighs most, so its
   prediction is its measurement.

:class:`~lightning_prune.core.cost.model.CostModel` (``CostModel(graph, latency=table)``)
then predicts, for keep-masks, ``layer_scale x sum over layers of T_l(cin_l, out_l) + offset +
per_volume x V + per_scatter x S`` in nanoseconds per forward pass of a batch, ``T_l``
interpolated bilinearly in the layer's grid. With open-probabilities instead of masks it
evaluates the same formula at the expected widths, which is differentiable (piecewise linear),
as the gates of BAR need; the expectation of a bilinear interpolation is not exactly the
interpolation at the expectation, but the two agree at 0/1 probabilities.

Measurements are cached on disk (one JSON file per device, torch version, dtype, memory
format, threads and batch size, under ``$LP_LATENCY_CACHE`` or
``~/.cache/lightning_prune/latency``): layers with a shape already timed and networks already
calibrated are not measured again. Timings are the fastest of interleaved repeats (other
processes only add time); they are still as noisy as the machine, which is why a budget in
latency is checked against the model's prediction (deterministic), and the exported network's
measured latency is reported next to it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

__all__ = ["LATENCY", "LatencyKey", "LatencyTable", "LayerTiming", "check_latency_option"]

LATENCY = "latency"


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


@dataclass(frozen=True)
class LatencyTable:
    """A measured latency model (see the module docstring): per-layer timings, scaled by
    ``layer_scale``, and the fit of everything else, ``offset + per_volume x V + per_scatter x S``
    nanoseconds."""

    key: LatencyKey
    layers: Mapping[str, LayerTiming]
    offset: float
    per_volume: float
    per_scatter: float
    measured: Mapping[str, float]  # the calibration: measured ns of the networks it was fitted to, by kept fraction
    predicted: Mapping[str, float]  # and the fit's prediction for each
    layer_scale: float = 1.0  # the layers' timings alone, scaled to what they take inside the network

    def check_network(self, network: nn.Module) -> None:
        """``ValueError`` unless ``network`` is on the device type and dtype the table was measured on."""
        param = next(network.parameters(), None)
        if param is None:
            return
        if param.device.type != self.key.device_type or str(param.dtype).removeprefix("torch.") != self.key.dtype:
            raise ValueError(
                f"latency: the latency model was measured on {self.key.describe()}; the network is on "
                f"{param.device.type}, {str(param.dtype).removeprefix('torch.')}: measure it again on the device and dtype "
                "the network runs on (lightning_prune.core.cost.measure_latency)"
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
            "layer_scale": self.layer_scale, "measured": dict(self.measured), "predicted": dict(self.predicted),
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
                dict(data["measured"]), dict(data["predicted"]), float(data["layer_scale"]),
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
