"""The cost of a network as a function of the channels each group keeps.

Three costs, all per input sample (the definitions of :func:`lightning_prune.count_cost`):

- ``"volume"``: activation volume, the number of output elements of every convolution and
  linear layer (``sum over feature maps of H x W``; ungated layers such as the head count
  as constants);
- ``"macs"``: multiply-accumulates of convolutions and linear layers (FLOPs = 2 x MACs);
- ``"params"``: parameter elements, biases and batch-norm weights included.

Every layer contributes ``a * cin * out + b * out`` (coefficients from
:meth:`lightning_prune.core.graph.LayerInfo.coefficients`), where ``out`` and ``cin`` are a fixed
part plus, for each group the layer belongs to, a weighted count of the kept channels
(the weight is how many positions a channel occupies, e.g. ``H*W`` after a flatten). So:

- :meth:`CostModel.full` is the cost of the unpruned network;
- :meth:`CostModel.exact` evaluates the formula in integers for hard keep-masks: it equals
  what ``count_cost`` measures on the physically shrunk network (the tests check this);
- :meth:`CostModel.expected` evaluates it with open-probabilities instead of 0/1 masks,
  differentiably. Volume and parameters of batch norms are linear in the probabilities, so
  their expectation is exact; MACs and weights are bilinear in (kept inputs, kept outputs),
  whose expectation is ``E[in] * E[out]`` for independent gates of different groups (a
  layer whose input and output channels belong to the *same* group -- only a layer applied
  to its own output -- would need ``E[in * out]``; this model uses ``E[in] * E[out]`` there);
- mixed-connectivity residual blocks (Lemaire, Achkar and Jodoin, CVPR 2019, supplementary
  material, Algorithm 1; graphs built with ``residual="mixed"``): a branch channel counts as
  kept when it is kept *and* the stream channel it adds into is kept (``keep_b * keep_s``),
  and every other layer of a branch is multiplied by whether the branch keeps any channel,
  ``1 - prod_i (1 - keep_b,i * keep_s,i)`` (exact for masks; for independent gates the
  expectation of each factor is exact, and their product is taken as the expectation of the
  product, as above: exact when the stream is kept);
- :meth:`CostModel.channel_weights` gives each channel's marginal cost, the ``A_l`` of the
  BAR sparsity loss (Lemaire, Achkar and Jodoin, "Structured Pruning of Neural Networks with
  Budget-Aware Regularization", CVPR 2019, arXiv:1811.09332): for volume the ``H x W`` summed
  over the layers that output the channel (constant), for MACs and parameters the derivative of the expected cost with
  respect to the channel's open-probability (by default with every other channel kept).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_prune.core.cost.latency import LATENCY, LatencyTable
from lightning_prune.core.graph import COSTS, ChannelGraph

__all__ = ["BUDGET_COSTS", "CostModel", "COSTS"]

BUDGET_COSTS = (*COSTS, LATENCY)  # what a budget can be given in: the counted costs and the measured latency


def check_budget_cost(cost: object, name: str = "cost") -> str:
    """``cost`` if it is one of :data:`BUDGET_COSTS`, else a ``ValueError`` naming ``name``."""
    if cost not in BUDGET_COSTS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, BUDGET_COSTS))}, got {cost!r}")
    return cost


class CostModel:
    """Exact and expected cost of the networks obtainable by pruning ``graph``'s groups.

    Args:
        graph: the channel graph of the (possibly already shrunk) model.
        latency: a measured :class:`~lightning_prune.core.cost.latency.LatencyTable` of the
            model (:func:`~lightning_prune.core.cost.latency.measure_latency`): then
            ``"latency"`` is a cost too, in nanoseconds per forward pass of the table's batch
            (predicted by the table; ``exact`` is the prediction for hard masks, not a measurement).
    """

    def __init__(self, graph: ChannelGraph, latency: LatencyTable | None = None) -> None:
        if not isinstance(graph, ChannelGraph):
            raise TypeError(f"graph must be a ChannelGraph (from build_graph), got {type(graph).__name__}")
        if latency is not None and not isinstance(latency, LatencyTable):
            raise TypeError(f"latency must be a LatencyTable (from measure_latency) or None, got {type(latency).__name__}")
        if latency is not None:
            latency.check_graph(graph)
        self.graph = graph
        self.latency = latency
        self.names = tuple(graph.groups)
        self.sizes = tuple(g.size for g in graph.groups.values())
        self.offsets = {}
        start = 0
        for name, size in zip(self.names, self.sizes):
            self.offsets[name] = start
            start += size
        self.num_channels = start

        layer_names = list(graph.layers)
        row = {name: i for i, name in enumerate(layer_names)}
        fixed_in = [graph.layers[n].cost_in for n in layer_names]
        fixed_out = [graph.layers[n].out_channels for n in layer_names]
        terms: dict[str, tuple[list[int], list[int], list[int]]] = {"in": ([], [], []), "out": ([], [], [])}
        self._uniform: dict[str, bool] = {}
        for name, group in graph.groups.items():
            uniform = True
            for member in group.members:
                r = row[member.module]
                per_channel = group.per_channel(member)
                uniform &= bool((per_channel == per_channel[0]).all())
                if member.role == "in":
                    fixed_in[r] -= len(member.positions)
                    side = "in"
                else:  # "out", or "channel": batch norm / depthwise conv, whose cin is 1
                    fixed_out[r] -= len(member.positions)
                    side = "out"
                rows, cols, weights = terms[side]
                nz = torch.nonzero(per_channel).flatten()
                rows += [r] * len(nz)
                cols += (nz + self.offsets[name]).tolist()
                weights += per_channel[nz].tolist()
            self._uniform[name] = uniform
        self._fixed = {"in": torch.tensor(fixed_in, dtype=torch.long), "out": torch.tensor(fixed_out, dtype=torch.long)}
        self._terms = {side: tuple(torch.tensor(v, dtype=torch.long) for v in t) for side, t in terms.items()}
        coef = {c: [graph.layers[n].coefficients(c) for n in layer_names] for c in COSTS}
        self._a = {c: torch.tensor([ab[0] for ab in coef[c]], dtype=torch.long) for c in COSTS}
        self._b = {c: torch.tensor([ab[1] for ab in coef[c]], dtype=torch.long) for c in COSTS}
        self._constant = {"volume": 0, "macs": graph.untracked["macs"], "params": graph.untracked["params"]}
        self._layer_names = tuple(layer_names)
        self._latency = None if latency is None else self._latency_grids(latency, layer_names)
        # Mixed-connectivity blocks scatter each pruned branch into the stream and add it there:
        # work in proportion to the stream's kept channels x the branch output's positions, for
        # every block whose branch or stream lost a channel (an unpruned block is not scattered).
        stream_cols: list[int] = []
        stream_seg: list[int] = []
        block_cols: list[int] = []
        block_seg: list[int] = []
        spatial: list[float] = []
        for k, group in enumerate(g for g in graph.groups.values() if g.is_branch):
            spatial.append(float(max(graph.layers[m.module].spatial for m in group.members)))
            stream = range(self.offsets[group.stream], self.offsets[group.stream] + graph.groups[group.stream].size)
            stream_cols += stream
            stream_seg += [k] * len(stream)
            branch = range(self.offsets[group.name], self.offsets[group.name] + group.size)
            block_cols += [*branch, *stream]
            block_seg += [k] * (len(branch) + len(stream))
        self._scatter = {
            "stream_cols": torch.tensor(stream_cols, dtype=torch.long), "stream_seg": torch.tensor(stream_seg, dtype=torch.long),
            "block_cols": torch.tensor(block_cols, dtype=torch.long), "block_seg": torch.tensor(block_seg, dtype=torch.long),
            "spatial": torch.tensor(spatial, dtype=torch.float64),
        }
        if latency is not None:
            self._constant[LATENCY] = latency.offset
        self._cache: dict[tuple[torch.device, torch.dtype], dict] = {}
        # Mixed-connectivity residual blocks: a branch channel counts as kept when its stream
        # channel is kept too, and a branch's layers count only while it keeps a channel.
        self._mixed: dict[str, Tensor] | None = None
        branches = [(name, group) for name, group in graph.groups.items() if group.is_branch]
        if branches:
            b_idx: list[int] = []
            s_idx: list[int] = []
            segment: list[int] = []
            rows: list[int] = []
            row_branch: list[int] = []
            for k, (name, group) in enumerate(branches):
                b_idx += range(self.offsets[name], self.offsets[name] + group.size)
                s_idx += [self.offsets[group.stream] + c for c in group.into]
                segment += [k] * group.size
                own = set(group.layers)  # the branch's last layer counts its (effective) channels already
                for layer in group.branch_layers:
                    if layer in row and layer not in own:
                        rows.append(row[layer])
                        row_branch.append(k)
            self._mixed = {
                "branch": torch.tensor(b_idx, dtype=torch.long), "stream": torch.tensor(s_idx, dtype=torch.long),
                "segment": torch.tensor(segment, dtype=torch.long), "rows": torch.tensor(rows, dtype=torch.long),
                "row_branch": torch.tensor(row_branch, dtype=torch.long), "count": torch.tensor(len(branches)),
            }

    # -- internals ---------------------------------------------------------------------
    def _tensors(self, device: torch.device, dtype: torch.dtype) -> dict:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = {
                "fixed": {s: t.to(device, dtype) for s, t in self._fixed.items()},
                "rows": {s: t[0].to(device) for s, t in self._terms.items()},
                "cols": {s: t[1].to(device) for s, t in self._terms.items()},
                "w": {s: t[2].to(device, dtype) for s, t in self._terms.items()},
                "a": {c: t.to(device, dtype) for c, t in self._a.items()},
                "b": {c: t.to(device, dtype) for c, t in self._b.items()},
                "mixed": None if self._mixed is None else {k: v.to(device) for k, v in self._mixed.items()},
                "latency": None if self._latency is None else {k: v.to(device, dtype) for k, v in self._latency.items()},
                "scatter": {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in self._scatter.items()},
            }
        return self._cache[key]

    def _counts(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """(cin, out) of every layer for a flat vector of per-channel keep values."""
        t = self._tensors(flat.device, flat.dtype)
        flat = self._effective(flat, t)
        counts = []
        for side in ("in", "out"):
            contrib = t["w"][side] * flat[t["cols"][side]]
            counts.append(t["fixed"][side].index_add(0, t["rows"][side], contrib))
        return counts[0], counts[1]

    @staticmethod
    def _effective(flat: Tensor, t: dict) -> Tensor:
        """Keep values with every branch channel multiplied by its stream channel's."""
        mixed = t["mixed"]
        if mixed is None:
            return flat
        return flat.index_put((mixed["branch"],), flat[mixed["branch"]] * flat[mixed["stream"]])

    def _layer_factor(self, flat: Tensor, t: dict) -> Tensor | None:
        """Per layer, 1 (or, in expectation, the probability) if it runs: a branch's layers run
        while the branch keeps a channel, ``1 - prod_i (1 - keep_i)`` over its effective keep values."""
        mixed = t["mixed"]
        if mixed is None:
            return None
        effective = self._effective(flat, t)
        ones = torch.ones(int(mixed["count"]), dtype=flat.dtype, device=flat.device)
        empty = ones.scatter_reduce(0, mixed["segment"], 1 - effective[mixed["branch"]], reduce="prod")
        factor = torch.ones(len(self._layer_names), dtype=flat.dtype, device=flat.device)
        return factor.index_put((mixed["rows"],), (1 - empty)[mixed["row_branch"]])

    @staticmethod
    def _latency_grids(table: LatencyTable, layer_names: list[str]) -> dict[str, Tensor]:
        """The layers' grids and timings, padded to one size (past the full width: the last
        value repeated, at widths no layer reaches) for a batched interpolation."""
        timings = [table.layers.get(n) for n in layer_names]  # None: a batch norm, timed with the rest
        size = max([2] + [max(len(t.cin), len(t.out)) for t in timings if t is not None])

        def pad(grid: tuple[int, ...]) -> list[float]:
            return [*grid, *(grid[-1] + k for k in range(1, size - len(grid) + 1))]

        cin, out, ns = [], [], []
        for t in timings:
            if t is None:
                cin.append(pad((0,)))
                out.append(pad((0,)))
                ns.append([[0.0] * size for _ in range(size)])
                continue
            cin.append(pad(t.cin))
            out.append(pad(t.out))
            rows = [[*r, *[r[-1]] * (size - len(r))] for r in t.ns]
            ns.append(rows + [rows[-1]] * (size - len(rows)))
        return {"cin": torch.tensor(cin, dtype=torch.float64), "out": torch.tensor(out, dtype=torch.float64),
                "ns": torch.tensor(ns, dtype=torch.float64), "per_volume": torch.tensor(table.per_volume, dtype=torch.float64),
                "per_scatter": torch.tensor(table.per_scatter, dtype=torch.float64),
                "layer_scale": torch.tensor(table.layer_scale, dtype=torch.float64)}

    @staticmethod
    def _locate(grid: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per row, the grid interval ``[grid[i], grid[i + 1]]`` holding ``x`` and the position in it."""
        i = torch.searchsorted(grid, x.detach().unsqueeze(1).contiguous(), right=True).squeeze(1) - 1
        i = i.clamp(0, grid.shape[1] - 2)
        low, high = grid.gather(1, i.unsqueeze(1)).squeeze(1), grid.gather(1, (i + 1).unsqueeze(1)).squeeze(1)
        return i, (x - low) / (high - low)

    def _latency_values(self, cin: Tensor, out: Tensor, t: dict) -> Tensor:
        """Every layer's predicted nanoseconds: its timing interpolated bilinearly at (cin, out),
        times ``layer_scale``, plus the fitted share of the rest of the network, ``per_volume`` x
        its volume."""
        lat = t["latency"]
        i, u = self._locate(lat["cin"], cin)
        j, v = self._locate(lat["out"], out)
        rows = torch.arange(len(self._layer_names), device=cin.device)
        ns = lat["ns"]
        timed = (
            ns[rows, i, j] * (1 - u) * (1 - v) + ns[rows, i, j + 1] * (1 - u) * v
            + ns[rows, i + 1, j] * u * (1 - v) + ns[rows, i + 1, j + 1] * u * v
        )
        return lat["layer_scale"] * timed + lat["per_volume"] * (t["a"]["volume"] * cin * out + t["b"]["volume"] * out)

    def _values(self, flat: Tensor, cost: str) -> Tensor:
        """The cost of every layer."""
        if cost == LATENCY and not flat.is_floating_point():
            flat = flat.double()
        t = self._tensors(flat.device, flat.dtype)
        cin, out = self._counts(flat)
        if cost == LATENCY:
            values = self._latency_values(cin, out, t)
        else:
            values = t["a"][cost] * cin * out + t["b"][cost] * out
        factor = self._layer_factor(flat, t)
        return values if factor is None else values * factor

    @staticmethod
    def _scattered(flat: Tensor, t: dict) -> Tensor:
        """Sum over mixed blocks of stream kept channels x positions x (1 - the product of the
        keep values of the block's branch and stream channels): 0 for a block that keeps every
        channel, which is not scattered; in expectation, nearly 1 for any gated block."""
        sc = t["scatter"]
        count = len(sc["spatial"])
        if count == 0:
            return flat.new_zeros(())
        kept = flat.new_zeros(count).index_add(0, sc["stream_seg"], flat[sc["stream_cols"]])
        whole = flat.new_ones(count).scatter_reduce(0, sc["block_seg"], flat[sc["block_cols"]], reduce="prod")
        return (sc["spatial"] * kept * (1 - whole)).sum()

    def _evaluate(self, flat: Tensor, cost: str) -> Tensor:
        if cost == LATENCY and not flat.is_floating_point():
            flat = flat.double()
        total = self._constant[cost] + self._values(flat, cost).sum()
        if cost == LATENCY:
            t = self._tensors(flat.device, flat.dtype)
            total = total + t["latency"]["per_scatter"] * self._scattered(flat, t)
        return total

    def _flat_masks(self, masks: Mapping[str, Tensor | int]) -> Tensor:
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a mapping from group name to a keep-mask or keep-count, got {type(masks).__name__}")
        counts = {k: v for k, v in masks.items() if isinstance(v, int) and not isinstance(v, bool)}
        for name, k in counts.items():
            if name not in self.graph.groups:
                self.graph.check_masks({name: None})  # raises the unknown-group error
            size = self.graph.groups[name].size
            if not 0 <= k <= size:
                raise ValueError(f"masks[{name!r}]: a keep-count must be in [0, {size}], got {k}")
            if not self._uniform[name]:
                raise ValueError(
                    f"masks[{name!r}]: the channels of group {name!r} do not all cost the same; give a boolean mask"
                )
        as_masks = {n: v for n, v in masks.items() if n not in counts}
        as_masks.update({n: torch.arange(self.graph.groups[n].size) < k for n, k in counts.items()})
        full = self.graph.check_masks(as_masks, allow_empty=True)
        return torch.cat([full[n].long() for n in self.names]) if self.names else torch.zeros(0, dtype=torch.long)

    def _flat_probs(self, probs: Mapping[str, Tensor]) -> Tensor:
        if not isinstance(probs, Mapping):
            raise TypeError(f"probs must be a mapping from group name to a probability vector, got {type(probs).__name__}")
        unknown = [n for n in probs if n not in self.offsets]
        if unknown:
            raise ValueError(f"probs: unknown channel group {unknown[0]!r}; groups: {', '.join(self.names)}")
        ref = next((p for p in probs.values() if isinstance(p, Tensor)), None)
        device = ref.device if ref is not None else torch.device("cpu")
        parts = []
        for name, size in zip(self.names, self.sizes):
            p = probs.get(name)
            if p is None:
                parts.append(torch.ones(size, dtype=torch.float64, device=device))
                continue
            if not isinstance(p, Tensor) or not p.is_floating_point():
                raise TypeError(f"probs[{name!r}] must be a floating-point tensor")
            if p.shape != (size,):
                raise ValueError(f"probs[{name!r}] must have shape ({size},), got {tuple(p.shape)}")
            parts.append(p.to(device, torch.float64))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)

    def _check_cost(self, cost: str) -> str:
        if cost == LATENCY and self.latency is None:
            raise ValueError(
                "cost 'latency' needs a latency model: CostModel(graph, latency=measure_latency(model, graph, batch_size=...))"
            )
        return check_budget_cost(cost)

    # -- public ------------------------------------------------------------------------
    def full(self, cost: str) -> int:
        """Cost per sample of the unpruned network (an exact integer)."""
        return self.exact({}, cost)

    def exact(self, masks: Mapping[str, Tensor | int], cost: str) -> int:
        """Exact cost per sample when every group keeps the channels of its mask.

        ``masks``: ``{group name: bool mask (size,)}`` or ``{group name: keep-count}`` (a count
        is allowed when the group's channels all cost the same); groups not given keep all
        their channels. A group may keep zero channels here (it cannot be shrunk so far).
        """
        self._check_cost(cost)
        return int(self._evaluate(self._flat_masks(masks), cost).item())

    def expected(self, probs: Mapping[str, Tensor], cost: str) -> Tensor:
        """Expected cost per sample (float64 scalar, differentiable w.r.t. ``probs``) when channel
        ``i`` of group ``g`` is kept with probability ``probs[g][i]`` independently of the
        others; groups not given are kept."""
        self._check_cost(cost)
        return self._evaluate(self._flat_probs(probs), cost)

    def channel_weights(self, cost: str, probs: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Marginal cost of each channel: ``{group name: float64 tensor (size,)}``, the derivative
        of :meth:`expected` w.r.t. each open-probability at ``probs`` (default: everything kept).
        For ``"volume"`` it does not depend on ``probs``: the ``H x W`` (summed over calls) of
        every layer that outputs the channel."""
        self._check_cost(cost)
        flat = self._flat_probs({} if probs is None else {k: v.detach() for k, v in probs.items()}).requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self._evaluate(flat, cost), flat, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(flat)
        return {name: grad[self.offsets[name] : self.offsets[name] + size] for name, size in zip(self.names, self.sizes)}

    def per_layer(self, masks: Mapping[str, Tensor | int], cost: str) -> dict[str, int]:
        """Exact cost per sample of every convolution, linear and batch-norm layer under ``masks``."""
        self._check_cost(cost)
        values = self._values(self._flat_masks(masks), cost)
        return {name: int(v) for name, v in zip(self._layer_names, values.tolist())}

    def scatter_volume(self, masks: Mapping[str, Tensor | int]) -> int:
        """Per sample, the stream channels x positions into which mixed-connectivity residual
        branches are scattered and added (0 without mixed blocks, and for blocks that keep all
        their channels): the part of the elementwise work of a mixed network that the activation
        volume does not count."""
        flat = self._flat_masks(masks).double()
        return int(self._scattered(flat, self._tensors(flat.device, flat.dtype)).item())

    def kept_channels(self, masks: Mapping[str, Tensor | int]) -> dict[str, tuple[int, int]]:
        """``{layer name: (in_channels, out_channels)}`` after applying ``masks`` (``(0, 0)`` for
        the layers of a removed residual branch)."""
        flat = self._flat_masks(masks)
        cin, out = self._counts(flat)
        factor = self._layer_factor(flat, self._tensors(flat.device, flat.dtype))
        if factor is not None:
            cin, out = cin * factor, out * factor
        result = {}
        for name, ci, co in zip(self._layer_names, cin.tolist(), out.tolist()):
            layer = self.graph.layers[name]
            result[name] = (co, co) if layer.kind == "norm" or layer.depthwise else (ci * layer.groups, co)
        return result
