"""Compression spaces of AdaNS (Javaheripi, Samragh, Javidi and Koushanfar, "AdaNS: Adaptive
Non-Uniform Sampling for Automated Design of Compact DNNs", IEEE JSTSP 2020, doi:10.1109/JSTSP.2020.2992384;
Appendix A): a vector x -> a compressed model.

:class:`CompressionSpace` wraps one loaded, trained model and offers, for one ``kind``:

- ``"structured"`` (P_s): one pruning rate per channel group of
  :func:`lightning_prune.core.trace.build_graph` (a residual stream is one group, so the result can
  be shrunk; with ``residual="mixed"`` each residual branch is a group of its own, and a rate
  of 1 removes the branch). The ``floor(p * c)`` channels of lowest priority are removed; priority is the
  summed absolute gradient of the loss with respect to the channel's feature maps, computed
  once (:meth:`rank_channels`). Masks sit at the group's gate sites (the core's
  :class:`~lightning_prune.core.gating.GateSet` with fixed 0/1 masks): after the activation's
  batch norm for a plain conv-BN-ReLU chain, and at the batch norms feeding every residual
  addition for a residual stream. (The paper puts masks after the ReLU and after the residual
  add; with 0/1 masks this is the same network, and it is exactly the network ``shrink``
  builds. The gradients are taken at the gate sites, i.e. at the batch-norm outputs.)
- ``"unstructured"`` (P_n): one rate per convolution / linear weight; the ``floor(p * n)``
  weights of smallest magnitude are zeroed. Cost counts non-zero weights (``params``) or the
  MACs of non-zero weights (``macs``).
- ``"svd"``: one normalised rank per linear layer and 1x1 convolution; rank ``floor(x R)``
  with ``R = min(in, out)``.
- ``"tucker2"``: two normalised ranks per k x k convolution (k > 1): input rank ``r_in`` of
  ``c`` and output rank ``r_out`` of ``f`` channels; the layer becomes 1x1 (c -> r_in),
  k x k (r_in -> r_out), 1x1 (r_out -> f).
- ``"decomposition"`` (D): svd + tucker2.
- ``"decomposition+structured"`` (D+P_s): decomposition ranks, then structured pruning of the
  decomposed layers' outer channels.

A decomposition that would cost more than the dense layer (in the space's cost) is not
applied: the layer stays dense with its low-rank weights, so the function is the same and the
cost is never above the original.

Evaluating a candidate never rebuilds the model: :meth:`apply` writes low-rank / sparse
weights into the loaded model (from factors cached once) and sets the fixed masks in place;
:meth:`accuracy` runs the held-out images through it. :meth:`compress` builds the real
smaller model (shrunk, decomposed into smaller layers); its cost measured with
:func:`lightning_prune.count_cost` equals :meth:`predict_cost` (tested). The compressed model
carries its structural steps as plain data (the pruning history of
:func:`lightning_prune.core.surgery.shrink`, the decompositions of
:func:`lightning_prune.core.decomposition.decompose`), so :func:`lightning_prune.save_pruned`
saves it and :func:`lightning_prune.load_pruned` rebuilds it from a fresh instance.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_prune.core.cost import CostModel, count_cost
from lightning_prune.core.cost.latency import LATENCY, LatencyTable, check_latency_option
from lightning_prune.core.cost.latency_measure import measure_latency
from lightning_prune.core.cost.model import check_budget_cost
from lightning_prune.core.decomposition import decompose as decompose_layer
from lightning_prune.core.decomposition import mode_bases, svd_layer, tucker2_layer
from lightning_prune.core.gates import FixedMask
from lightning_prune.core.gating import attach_gates
from lightning_prune.core.trace import build_graph
from lightning_prune.search.space import Dimension, SearchSpace, integer_setting
from lightning_prune.core.surgery import shrink

KINDS = ("structured", "unstructured", "svd", "tucker2", "decomposition", "decomposition+structured")

__all__ = ["CompressionSpace", "KINDS", "sparse_cost", "top1"]


def _matrix(m: nn.Module) -> Tensor:
    """Weight of a linear / 1x1 conv as (out, in)."""
    return m.weight.detach().reshape(m.weight.shape[0], m.weight.shape[1])


def _sparse_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


@torch.no_grad()
def sparse_cost(model: nn.Module, example_input: Tensor) -> dict[str, int]:
    """Measured cost of a model whose convolution / linear weights contain zeros, per sample:
    ``params`` counts non-zero weights (other parameters in full), ``macs`` the MACs of the
    non-zero weights (each weight element of a layer is used the same number of times)."""
    report = count_cost(model, example_input)
    macs, params = report.macs, report.params
    for name, m in _sparse_layers(model):
        n, nnz = m.weight.numel(), int(torch.count_nonzero(m.weight))
        layer = report.per_layer.get(name)
        per_weight = (layer.macs // n) if layer is not None else 0
        macs -= per_weight * (n - nnz)
        params -= n - nnz
    return {"macs": int(macs), "params": int(params)}


@contextlib.contextmanager
def _one_thread():
    """Run the (small) SVDs on one thread: multi-threaded LAPACK gains nothing on matrices of
    a few hundred rows and is many times slower when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def top1(model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent of ``model`` (run in eval mode, mode restored) on ``inputs``."""
    was = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(inputs), batch_size):
            logits = model(inputs[start : start + batch_size])
            correct += int((logits.argmax(dim=-1) == targets[start : start + batch_size]).sum())
    finally:
        model.train(was)
    return 100.0 * correct / len(inputs)


@contextlib.contextmanager
def recalibrated_batch_norm(model: nn.Module, images: Tensor, batch_size: int = 500) -> Iterator[None]:
    """Within the block, every batch norm of ``model`` uses running statistics re-estimated on
    ``images`` (a forward pass with the batch norms alone in training mode, cumulative average)
    for the network as it computes now, e.g. with channels masked: adaptive batch norm (Li, Wang,
    Wang, Zhang and Lin, "EagleEye: Fast Sub-net Evaluation for Efficient Neural Network
    Pruning", ECCV 2020, arXiv:2007.02491), after which the accuracy of a pruned candidate
    predicts its accuracy after fine-tuning far better. The statistics, momenta and modes are
    restored on exit."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [(m.training, m.momentum, {k: b.clone() for k, b in m.named_buffers(recurse=False)}) for m in norms]
    was = model.training
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the calibration batches
            m.train()
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                model(images[start : start + batch_size])
        for m in norms:
            m.eval()
        yield
    finally:
        for m, (training, momentum, buffers) in zip(norms, saved):
            m.momentum = momentum
            for k, b in buffers.items():
                getattr(m, k).copy_(b)
            m.train(training)
        model.train(was)


class CompressionSpace:
    """The compression space ``kind`` of a trained ``model`` (see the module docstring).

    Args:
        model: the trained network; it is modified in place by :meth:`apply` (weights and
            fixed masks), :meth:`reset` restores it.
        example_input: one input batch (shapes only), e.g. ``torch.zeros(1, 3, 32, 32)``.
        kind: one of ``KINDS``.
        cost: ``"macs"``, ``"params"`` (or ``"volume"`` or ``"latency"`` for ``structured``
            only): what :meth:`predict_cost` counts, per sample (latency: nanoseconds per
            batch of the inference form, predicted by a measured latency model).
        latency: with ``cost="latency"``: a :class:`~lightning_prune.core.cost.latency.LatencyTable`
            of ``model`` or the keyword arguments of :func:`lightning_prune.measure_latency`
            (at least ``batch_size``; measured here, or read from its disk cache).
        ignore: modules (or names) whose output channels are never pruned (structured).
        residual: ``"tied"`` (a residual stream and its branches are one group) or
            ``"mixed"`` (each residual branch is a group of its own, whose rate 1 removes the
            branch; see :func:`lightning_prune.core.trace.build_graph`), structured kinds.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Tensor,
        kind: str = "structured",
        cost: str = "macs",
        ignore: Iterable[nn.Module | str] = (),
        residual: str = "tied",
        latency: LatencyTable | Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(example_input, Tensor):
            raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        check_budget_cost(cost)
        if cost in ("volume", LATENCY) and kind != "structured":
            raise ValueError(f"cost={cost!r} is supported for kind='structured' only, got kind={kind!r}")
        latency = check_latency_option(cost, latency)
        self.model = model
        self.example_input = example_input[:1].detach()
        self.kind = kind
        self.cost = cost
        self.structured = kind in ("structured", "decomposition+structured")
        self.unstructured = kind == "unstructured"
        modules = dict(model.named_modules())
        with torch.no_grad():
            self.graph = build_graph(model, self.example_input, ignore=ignore, residual=residual)
        if isinstance(latency, Mapping):
            latency = measure_latency(model, self.graph, **latency)
        if latency is not None:
            latency.check_network(model)
        self.latency = latency
        self.cost_model = CostModel(self.graph, latency=latency)
        self._spatial_in = self._input_spatial()

        dims: list[Dimension] = []
        self.svd_layers: list[str] = []
        self.tucker_layers: list[str] = []
        if kind in ("svd", "decomposition", "decomposition+structured"):
            self.svd_layers = [n for n, m in modules.items() if svd_layer(m) and n in self.graph.layers]
            dims += [Dimension(f"svd:{n}", "rank", min(_matrix(modules[n]).shape)) for n in self.svd_layers]
        if kind in ("tucker2", "decomposition", "decomposition+structured"):
            self.tucker_layers = [n for n, m in modules.items() if tucker2_layer(m) and n in self.graph.layers]
            for n in self.tucker_layers:
                dims += [Dimension(f"tucker_in:{n}", "rank", modules[n].in_channels),
                         Dimension(f"tucker_out:{n}", "rank", modules[n].out_channels)]
        self.sparse_layers = [n for n, _ in _sparse_layers(model)] if self.unstructured else []
        dims += [Dimension(f"sparse:{n}", "rate", modules[n].weight.numel()) for n in self.sparse_layers]
        self.groups = list(self.graph.groups) if self.structured else []
        dims += [Dimension(f"prune:{g}", "rate", self.graph.groups[g].size) for g in self.groups]
        if not dims:
            raise ValueError(f"{type(model).__name__} has no layer that kind={kind!r} can compress")
        self.search_space = SearchSpace(tuple(dims), predict_cost=self.predict_cost)

        # Cached once: original weights, factors, magnitude orders.
        self._original = {n: modules[n].weight.detach().clone() for n in {*self.svd_layers, *self.tucker_layers,
                                                                           *self.sparse_layers}}
        self._svd = {}
        self._tucker = {}
        with _one_thread():
            for n in self.svd_layers:
                u, s, vh = torch.linalg.svd(_matrix(modules[n]).double(), full_matrices=False)
                self._svd[n] = (u, s, vh)
            for n in self.tucker_layers:
                self._tucker[n] = mode_bases(self._original[n].double())
        self._order = {n: torch.argsort(self._original[n].abs().flatten(), descending=True) for n in self.sparse_layers}
        self._dense: dict[str, int] = {}
        self._per_weight_macs: dict[str, int] = {}
        if self.unstructured:
            report = count_cost(model, self.example_input)
            self._dense = {"macs": report.macs, "params": report.params}
            self._per_weight_macs = {n: report.per_layer[n].macs // self._original[n].numel() if n in report.per_layer
                                     else 0 for n in self.sparse_layers}
        self.importance: dict[str, Tensor] | None = None
        self.gates = None
        self._holder = nn.Module()  # owns the GateSet, so the model itself stays a plain module
        self._current: np.ndarray | None = None

    # --- dimensions -> integer settings --------------------------------------------------------
    def _input_spatial(self) -> dict[str, int]:
        spatial: dict[str, int] = {}
        hooks = []
        for name, m in self.model.named_modules():
            if isinstance(m, nn.Conv2d):
                def hook(mod: nn.Module, inp: tuple, _out: Tensor, name: str = name) -> None:
                    spatial[name] = spatial.get(name, 0) + inp[0].numel() // (inp[0].shape[0] * mod.in_channels)
                hooks.append(m.register_forward_hook(hook))
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(self.example_input)
        finally:
            for h in hooks:
                h.remove()
            self.model.train(was)
        return spatial

    def _values(self, x: Any) -> dict[str, float]:
        arr = self.search_space.check(x)
        return {d.name: float(v) for d, v in zip(self.search_space.dims, arr)}

    def settings(self, x: Any) -> dict[str, Any]:
        """The integer settings ``x`` stands for: kept channels per group, ranks per layer,
        kept weights per layer."""
        values = self._values(x)
        dims = {d.name: d for d in self.search_space.dims}

        def setting(name: str) -> int:
            d = dims[name]
            return integer_setting(values[name], d.kind, d.levels)

        def kept(group: str) -> int:
            # A mixed residual branch may keep no channel (rate 1: the branch is removed).
            d = dims[f"prune:{group}"]
            if self.graph.groups[group].is_branch and values[d.name] >= 1.0:
                return 0
            return setting(d.name)

        return {
            "kept_channels": {g: kept(g) for g in self.groups},
            "svd_rank": {n: setting(f"svd:{n}") for n in self.svd_layers},
            "tucker_rank": {n: (setting(f"tucker_in:{n}"), setting(f"tucker_out:{n}")) for n in self.tucker_layers},
            "kept_weights": {n: setting(f"sparse:{n}") for n in self.sparse_layers},
        }

    def masks(self, x: Any, ranked: bool = True) -> dict[str, Tensor]:
        """Keep-masks of the channel groups for ``x``: the most important channels are kept.
        With ``ranked=False`` (enough for costs and shapes) the first channels are kept."""
        kept = self.settings(x)["kept_channels"]
        if not kept:
            return {}
        if ranked and self.importance is None:
            raise RuntimeError("structured spaces rank channels first: call rank_channels(batches)")
        out = {}
        for g, k in kept.items():
            size = self.graph.groups[g].size
            order = torch.argsort(self.importance[g], descending=True, stable=True) if ranked else torch.arange(size)
            mask = torch.zeros(self.graph.groups[g].size, dtype=torch.bool)
            mask[order[:k]] = True
            out[g] = mask
        return out

    # --- cost -------------------------------------------------------------------------------------
    def _decomposed_cost(self, name: str, cin: int, cout: int, ranks: tuple[int, ...]) -> tuple[int, int]:
        """(dense, decomposed) cost per sample of layer ``name`` with ``cin`` / ``cout`` channels."""
        layer = self.graph.layers[name]
        metric = self.cost
        bias = int(layer.bias)
        if name in self._svd:
            (r,) = ranks
            r = min(r, cin, cout)
            spatial = layer.spatial
            dense = {"macs": spatial * cin * cout, "params": cin * cout + bias * cout}[metric]
            dec = {"macs": spatial * r * (cin + cout), "params": r * (cin + cout) + bias * cout}[metric]
            return dense, dec
        r_in, r_out = min(ranks[0], cin), min(ranks[1], cout)
        k = layer.kernel
        sp_in, sp_out = self._spatial_in[name], layer.spatial
        dense = {"macs": sp_out * k * cin * cout, "params": k * cin * cout + bias * cout}[metric]
        dec = {"macs": sp_in * cin * r_in + sp_out * k * r_in * r_out + sp_out * r_out * cout,
               "params": cin * r_in + k * r_in * r_out + r_out * cout + bias * cout}[metric]
        return dense, dec

    def _plan(self, x: Any, ranked: bool = True) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, tuple[int, ...]]]:
        """Settings, masks and the layers actually decomposed (with their clamped ranks)."""
        s = self.settings(x)
        masks = self.masks(x, ranked) if self.structured else {}
        kept = self.cost_model.kept_channels(masks) if (self.svd_layers or self.tucker_layers) else {}
        decompose = {}
        for name in [*self.svd_layers, *self.tucker_layers]:
            cin, cout = kept[name]
            ranks = (s["svd_rank"][name],) if name in self._svd else s["tucker_rank"][name]
            dense, dec = self._decomposed_cost(name, cin, cout, ranks)
            if dec < dense:
                clamped = (min(ranks[0], cin, cout),) if name in self._svd else (min(ranks[0], cin), min(ranks[1], cout))
                decompose[name] = clamped
        return s, masks, decompose

    def predict_cost(self, x: Any) -> int:
        """Cost per sample (``self.cost``) of the model ``x`` describes, without building it.
        Before :meth:`rank_channels` the first channels of each group stand in for the kept
        ones, which gives the same cost whenever a group's channels all cost the same."""
        s, masks, decompose = self._plan(x, ranked=self.importance is not None)
        if self.unstructured:
            total = self._dense[self.cost]
            for name, kept in s["kept_weights"].items():
                n = self._original[name].numel()
                total -= (self._per_weight_macs[name] if self.cost == "macs" else 1) * (n - kept)
            return int(total)
        total = self.cost_model.exact(masks, self.cost)
        if decompose:
            kept = self.cost_model.kept_channels(masks)
            for name, ranks in decompose.items():
                dense, dec = self._decomposed_cost(name, *kept[name], ranks)
                total += dec - dense
        return int(total)

    @property
    def base_cost(self) -> int:
        """Cost per sample of the uncompressed model."""
        return self.predict_cost(self.search_space.identity)

    # --- channel ranking ------------------------------------------------------------------------
    def rank_channels(self, batches: Iterable[tuple[Tensor, Tensor]],
                      loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> dict[str, Tensor]:
        """Priority of every channel: the absolute gradient of the loss with respect to the
        channel's feature maps at its gate sites, summed over positions, images and sites
        (computed once, in eval mode). Returns and stores ``{group: tensor (size,)}``."""
        if not self.structured:
            raise RuntimeError(f"kind={self.kind!r} has no channels to rank")
        modules = dict(self.model.named_modules())
        sites: dict[str, list[tuple[str, Tensor, Tensor]]] = {}
        for g in self.groups:
            group = self.graph.groups[g]
            for member in group.members:
                if member.module in group.gate_sites and member.role != "in":
                    sites.setdefault(member.module, []).append(
                        (g, torch.tensor(member.positions), torch.tensor(member.channels)))
        importance = {g: torch.zeros(self.graph.groups[g].size, dtype=torch.float64) for g in self.groups}
        captured: dict[str, Tensor] = {}

        def capture(name: str) -> Callable:
            def hook(_m: nn.Module, _i: Any, out: Tensor) -> None:
                out.retain_grad()
                captured[name] = out
            return hook

        handles = [modules[name].register_forward_hook(capture(name)) for name in sites]
        was = self.model.training
        self.model.eval()
        seen = 0
        try:
            with torch.enable_grad(), self._gates_suspended():
                for inputs, targets in batches:
                    captured.clear()
                    self.model.zero_grad(set_to_none=True)
                    loss_fn(self.model(inputs), targets, reduction="sum").backward()
                    seen += len(inputs)
                    for name, entries in sites.items():
                        grad = captured[name].grad
                        channel = grad.dim() - 1 if self.graph.layers[name].kind == "linear" else 1
                        per_pos = grad.abs().sum(dim=[d for d in range(grad.dim()) if d != channel]).double()
                        for g, pos, chan in entries:
                            importance[g].index_add_(0, chan, per_pos[pos])
        finally:
            for h in handles:
                h.remove()
            self.model.zero_grad(set_to_none=True)
            self.model.train(was)
        if seen == 0:
            raise ValueError("batches must yield at least one (inputs, targets) batch")
        self.importance = importance
        return importance

    # --- in-place evaluation ----------------------------------------------------------------------
    def _gates_suspended(self):
        return self.gates.suspended() if self.gates is not None else contextlib.nullcontext()

    @torch.no_grad()
    def apply(self, x: Any) -> None:
        """Make the loaded model compute the compressed model ``x``, in place: low-rank or sparse
        weights from cached factors, fixed 0/1 masks at the gate sites."""
        s, masks, _ = self._plan(x)
        modules = dict(self.model.named_modules())
        for name in self.svd_layers:
            r = s["svd_rank"][name]
            u, sv, vh = self._svd[name]
            w = (u[:, :r] * sv[:r]) @ vh[:r]
            modules[name].weight.copy_(w.reshape(modules[name].weight.shape).to(modules[name].weight.dtype))
        for name in self.tucker_layers:
            r_in, r_out = s["tucker_rank"][name]
            u_out, u_in = (f[:, :r] for f, r in zip(self._tucker[name], (r_out, r_in)))
            w = self._original[name].double()
            w = torch.einsum("oa,aikl->oikl", u_out @ u_out.T, w)
            w = torch.einsum("oakl,ai->oikl", w, u_in @ u_in.T)
            modules[name].weight.copy_(w.to(modules[name].weight.dtype))
        for name in self.sparse_layers:
            weight = modules[name].weight
            keep = torch.zeros(weight.numel(), dtype=torch.bool)
            keep[self._order[name][: s["kept_weights"][name]]] = True
            weight.copy_(self._original[name] * keep.view_as(weight))
        if self.structured:
            if self.gates is None:
                self.gates = attach_gates(self.model, self.graph, {g: FixedMask(m) for g, m in masks.items()},
                                          owner=self._holder)
            else:
                for g, m in masks.items():
                    self.gates[g].mask.copy_(m)
        self._current = self.search_space.check(x).copy()

    @torch.no_grad()
    def reset(self) -> None:
        """Restore the original weights and remove the masks."""
        modules = dict(self.model.named_modules())
        for name, w in self._original.items():
            modules[name].weight.copy_(w)
        if self.gates is not None:
            self.gates.detach()
            self.gates = None
        self._current = None

    def accuracy(self, x: Any, inputs: Tensor, targets: Tensor, batch_size: int = 500,
                 calibration: Tensor | None = None) -> float:
        """Top-1 accuracy in percent of the compressed model ``x`` on ``inputs`` (no rebuild);
        with ``calibration`` images, after re-estimating the batch-norm statistics on them for
        ``x`` (:func:`recalibrated_batch_norm`; the loaded model's are restored)."""
        self.apply(x)
        if calibration is None or len(calibration) == 0:
            return top1(self.model, inputs, targets, batch_size)
        with recalibrated_batch_norm(self.model, calibration, batch_size):
            return top1(self.model, inputs, targets, batch_size)

    # --- the real compressed model ------------------------------------------------------------------
    def _bare_copy(self) -> nn.Module:
        with self._gates_suspended():
            return copy.deepcopy(self.model)

    @torch.no_grad()
    def compress(self, x: Any) -> nn.Module:
        """A new, physically smaller model for ``x``: pruned channels removed (``shrink``),
        decomposed layers replaced by smaller ones, sparse weights zeroed. The loaded model is
        left as :meth:`apply` leaves it."""
        s, masks, decompose = self._plan(x)
        self.apply(x)
        model = self._bare_copy()
        graph = self.graph
        if masks:
            graph = shrink(model, masks, graph=graph)
        with _one_thread():
            for name, ranks in decompose.items():
                decompose_layer(model, name, tuple(int(r) for r in ranks))  # recorded on the model (save_pruned)
        return model.eval()
