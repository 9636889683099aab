"""Channel groups: the sets of channels that must be removed together (the data model).

A :class:`ChannelGraph` is plain, picklable data, built from a traced network by
:func:`lightning_prune.core.trace.build_graph` (the only module that traces with
Torch-Pruning); this module has no Torch-Pruning import:

- a :class:`ChannelGroup` per prunable group: a stable ``name`` (the qualified name of its
  first output-channel layer in ``model.named_modules()`` order), its ``size`` (number of
  channels) and its :class:`Member` layers. Each member says which dimension of which layer
  the group cuts (``role``) and, for every position along that dimension, which channel of
  the group it carries (``positions`` / ``channels``). This covers conv -> BN -> next layer,
  residual additions (several producers share one group), concatenation (a consumer reads
  the group at an offset), flattening (one channel feeds ``H*W`` inputs of a linear layer)
  and depthwise convolutions (``role="channel"``: input and output channels go together).
- a :class:`LayerInfo` per convolution, linear and batch-norm layer: what the cost model
  needs to count MACs, parameters and activation volume exactly.
- ``gate_sites`` per group: the layers whose *outputs* a gate must multiply so that a hard
  0/1 gate is equivalent to removing the channel (see :class:`ChannelGroup`).
- with ``residual="mixed"``, *branch groups*: the last layer of each residual branch, whose
  channels add into a stream group's (see :class:`ChannelGroup` and
  :meth:`ChannelGraph.effective_masks`).

Which groups are prunable, which are excluded (``ChannelGraph.excluded``) and which modules
the trace never reached (``ChannelGraph.unreached``) is decided by the builder: see
:mod:`lightning_prune.core.trace`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = [
    "Member",
    "ChannelGroup",
    "LayerInfo",
    "ChannelGraph",
    "random_masks",
    "layer_kind",
    "layer_sizes",
    "COSTS",
    "ROLES",
    "RESIDUAL_MODES",
]

ROLES = ("out", "in", "channel")
COSTS = ("volume", "macs", "params")
RESIDUAL_MODES = ("tied", "mixed")


@dataclass(frozen=True)
class Member:
    """One layer's share of a channel group.

    ``role``: ``"out"`` cuts the output channels of a convolution or linear layer, ``"in"``
    its input channels (input features of a linear layer), ``"channel"`` cuts a channel-wise
    layer whose input and output channels are the same (batch norm, depthwise convolution).
    ``positions[k]`` is an index along that dimension and ``channels[k]`` the group channel
    it carries; a channel maps to several positions after a flatten (conv -> linear).
    """

    module: str
    role: str
    positions: tuple[int, ...]
    channels: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels removed together.

    ``gate_sites`` are the layers whose outputs a gate multiplies: the *last per-channel
    operation* before every layer that mixes channels (the in-channel consumers) and before
    the model output. A producer (conv/linear output, depthwise conv) or batch norm of the
    group is a site when some path from its output reaches such a consumer through
    parameter-free operations and depthwise convolutions only, without passing another batch
    norm of the group. So the gate goes after a batch norm, never before it (zeroing a channel
    before a batch norm leaves its bias); in a post-activation ResNet the sites are the batch
    norms that feed the residual additions; in a pre-activation network (WideResNet) the
    residual stream is read only through batch norms (each block's first one, the final one),
    and those are the sites; in a DenseNet, every batch norm reading a concatenation gates the
    groups it reads. Each path from a producer to a consumer crosses exactly one site, so a
    soft gate scales a channel once, and with hard 0/1 gates, as long as the parameter-free
    operations map 0 to 0 (ReLU, pooling, addition, concatenation, flatten, dropout), the
    gated network computes exactly what the shrunk network computes.

    A *branch group* (``stream`` set; graphs built with ``residual="mixed"``) holds the last
    layer of a residual branch (its producer and the channel-wise layers after it, e.g. a
    block's ``conv2`` and ``bn2``), whose output a residual addition adds into the ``stream``
    group: channel ``i`` of the branch is added into channel ``into[i]`` of the stream. A
    branch channel is *effectively* kept when it is kept and its stream channel is kept too
    (:meth:`ChannelGraph.effective_masks`); a branch that keeps no channel is removed with all
    of its layers, ``branch_layers`` (the block becomes the identity, or the projection).
    ``branch_output`` is the branch's last layer, whose output is added to the stream.
    """

    name: str
    size: int
    members: tuple[Member, ...]
    gate_sites: tuple[str, ...]
    stream: str | None = None
    into: tuple[int, ...] = ()
    branch_output: str | None = None
    branch_layers: tuple[str, ...] = ()

    @property
    def is_branch(self) -> bool:
        """Whether this is the branch group of a mixed-connectivity residual block."""
        return self.stream is not None

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the member layers, in member order, without repeats."""
        return tuple(dict.fromkeys(m.module for m in self.members))

    def per_channel(self, member: Member) -> Tensor:
        """How many positions of ``member`` each channel of the group occupies (int64, ``(size,)``)."""
        return torch.bincount(torch.tensor(member.channels, dtype=torch.long), minlength=self.size)


@dataclass(frozen=True)
class LayerInfo:
    """Static description of a convolution, linear or batch-norm layer for exact counting.

    ``spatial`` is the number of output positions per sample summed over the layer's calls
    in one forward pass (``H_out * W_out`` for a 2-d convolution called once; 1 for a linear
    layer on ``(batch, features)``). Per sample, with ``cin = in_channels // groups``:
    MACs = ``spatial * kernel * cin * out_channels`` (conv, linear; 0 for batch norm),
    params = ``kernel * cin * out_channels + bias * out_channels`` (conv, linear) or
    ``2 * out_channels`` (affine batch norm), volume = ``spatial * out_channels`` (conv,
    linear; 0 for batch norm) -- the same definitions as :func:`lightning_prune.count_cost`.
    ``bias``: the layer has a bias (batch norm: it is affine, with a weight and a bias).
    """

    name: str
    type: str
    kind: str  # "conv" | "linear" | "norm"
    in_channels: int
    out_channels: int
    groups: int
    kernel: int
    bias: bool
    spatial: int

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @property
    def grouped(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and not self.depthwise

    def coefficients(self, cost: str) -> tuple[int, int]:
        """``(a, b)`` with ``cost = a * cin * out_channels + b * out_channels`` per sample,
        ``cin = in_channels // groups`` (1 for batch norm)."""
        if cost == "macs":
            return (0 if self.kind == "norm" else self.spatial * self.kernel), 0
        if cost == "params":
            if self.kind == "norm":
                return 0, 2 * int(self.bias)
            return self.kernel, int(self.bias)
        if cost == "volume":
            return 0, (0 if self.kind == "norm" else self.spatial)
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")

    @property
    def cost_in(self) -> int:
        return 1 if self.kind == "norm" else self.in_channels // self.groups

    def cost(self, cost: str) -> int:
        a, b = self.coefficients(cost)
        return a * self.cost_in * self.out_channels + b * self.out_channels


@dataclass
class ChannelGraph:
    """The prunable channel groups of a model, plus what is needed to count its cost.

    Plain data: module names, not module objects, so the same graph applies to a copy of
    the model (``lightning_prune.core.surgery.shrink`` checks that the sizes still match).
    Built by :func:`lightning_prune.core.trace.build_graph`.
    Iterating yields the groups in ``named_modules()`` order of their names.

    Attributes:
        groups: ``{name: ChannelGroup}`` of the prunable groups.
        excluded: ``{name: reason}`` of the groups that are never pruned.
        layers: ``{module name: LayerInfo}`` of every convolution, linear and batch-norm layer.
        untracked: ``{"macs": int, "params": int}``: cost of everything else (e.g. a
            functional matmul, a LayerNorm outside every group); constant under pruning.
        input_shapes, input_dtypes: of the example input (used to replay a pruning history).
        ignore: the ``ignore=`` module names.
        execution_order: the layers of ``layers`` in the order of their first call.
        model_name: class name of the traced model.
        unreached: modules with parameters that the example's forward did not reach (all of
            them in ``ignore=``); no group knows which channels they read (see
            :mod:`lightning_prune.core.trace`).
        residual: ``"tied"`` (a residual stream and every branch adding into it are one
            group) or ``"mixed"`` (each branch's last layer is a group of its own, see
            :class:`ChannelGroup`).
        zero_outputs: ``{module name: stream group}`` of the removed branches' last layers
            (:class:`lightning_prune.core.residual.RemovedLayer`), which return zeros with
            as many channels as their stream group has.
    """

    groups: dict[str, ChannelGroup]
    excluded: dict[str, str]
    layers: dict[str, LayerInfo]
    untracked: dict[str, int]
    input_shapes: tuple[tuple[int, ...], ...]
    input_dtypes: tuple[str, ...]
    ignore: tuple[str, ...] = ()
    execution_order: tuple[str, ...] = ()
    model_name: str = ""
    unreached: tuple[str, ...] = ()
    residual: str = "tied"
    zero_outputs: dict[str, str] = field(default_factory=dict)

    # -- container protocol -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups.values())

    def __contains__(self, name: object) -> bool:
        return name in self.groups

    def __getitem__(self, name: str) -> ChannelGroup:
        try:
            return self.groups[name]
        except KeyError:
            hint = f" (it is not pruned: {self.excluded[name]})" if name in self.excluded else ""
            raise KeyError(f"no channel group named {name!r}{hint}; groups: {', '.join(self.groups)}") from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.groups)

    @property
    def num_channels(self) -> int:
        """Total number of prunable channels (sum of group sizes)."""
        return sum(g.size for g in self.groups.values())

    def example_input(self) -> tuple[Tensor, ...]:
        """Zero tensors with the shapes and dtypes of the example input the graph was built with."""
        return zero_inputs({"input_shapes": self.input_shapes, "input_dtypes": self.input_dtypes})

    # -- masks ----------------------------------------------------------------------------
    def full_masks(self) -> dict[str, Tensor]:
        """Keep-everything masks: ``{name: ones(size, dtype=bool)}``."""
        return {name: torch.ones(g.size, dtype=torch.bool) for name, g in self.groups.items()}

    def check_masks(self, masks: Mapping[str, Any], *, allow_empty: bool = False, argument: str = "masks") -> dict[str, Tensor]:
        """Validate keep-masks and return ``{name: bool tensor (size,)}`` for *every* group
        (groups not in ``masks`` keep all their channels). Entries may be bool tensors,
        0/1 tensors or sequences of bools. ``allow_empty=False`` rejects a mask that keeps no
        channel of a group (a layer with zero channels cannot be built), except for the branch
        groups of mixed-connectivity residual blocks (the branch is then removed)."""
        if not isinstance(masks, Mapping):
            raise TypeError(f"{argument} must be a mapping from group name to a boolean mask, got {type(masks).__name__}")
        out = self.full_masks()
        for name, mask in masks.items():
            if name not in self.groups:
                hint = f" (it is not pruned: {self.excluded[name]})" if name in self.excluded else ""
                raise ValueError(f"{argument}: unknown channel group {name!r}{hint}; groups: {', '.join(self.groups)}")
            m = torch.as_tensor(mask).detach().cpu()
            if m.dtype != torch.bool:
                if m.is_floating_point() or m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
                    raise ValueError(f"{argument}[{name!r}] must be boolean (or 0/1), got dtype {m.dtype}")
                m = m.bool()
            size = self.groups[name].size
            if m.shape != (size,):
                raise ValueError(f"{argument}[{name!r}] must have shape ({size},), got {tuple(m.shape)}")
            if not allow_empty and not bool(m.any()) and not self.groups[name].is_branch:
                raise ValueError(
                    f"{argument}[{name!r}] keeps no channel of group {name!r}; keep at least one channel of every group"
                    + (" (only the branch groups of mixed residual blocks may be emptied)" if self.residual == "mixed" else "")
                )
            out[name] = m
        return out

    # -- mixed-connectivity residual blocks --------------------------------------------------
    @property
    def branch_names(self) -> tuple[str, ...]:
        """Names of the branch groups (mixed-connectivity residual blocks; none when tied)."""
        return tuple(name for name, g in self.groups.items() if g.is_branch)

    def effective_masks(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """For checked full masks: the same masks with each branch channel kept only where its
        stream channel is kept too (a branch channel adding into a removed stream channel
        contributes nothing and is not computed). Without branch groups: ``masks`` as they are."""
        out = dict(masks)
        for name, group in self.groups.items():
            if group.is_branch:
                out[name] = masks[name] & masks[group.stream][torch.tensor(group.into, dtype=torch.long)]
        return out

    def removed_branches(self, masks: Mapping[str, Tensor]) -> tuple[str, ...]:
        """Branch groups that keep no channel under the checked full ``masks`` (their branch
        is removed)."""
        effective = self.effective_masks(masks)
        return tuple(name for name in self.branch_names if not bool(effective[name].any()))

    def removed_layers(self, masks: Mapping[str, Tensor]) -> set[str]:
        """Layers that checked full ``masks`` remove entirely: every layer of the removed branches."""
        return {layer for name in self.removed_branches(masks) for layer in self.groups[name].branch_layers}

    def removed_positions(self, masks: Mapping[str, Tensor]) -> dict[tuple[str, str], list[int]]:
        """``{(module, dim): sorted removed indices}`` with ``dim`` one of ``"out"``, ``"in"``,
        ``"channel"``, for already checked full masks (layers removed entirely,
        :meth:`removed_layers`, are left out)."""
        effective = self.effective_masks(masks)
        gone = self.removed_layers(masks) if self.branch_names else set()
        removed: dict[tuple[str, str], set[int]] = {}
        for name, group in self.groups.items():
            if bool(effective[name].all()):
                continue
            keep = effective[name].tolist()
            for member in group.members:
                if member.module in gone:
                    continue
                pos = [p for p, c in zip(member.positions, member.channels) if not keep[c]]
                if pos:
                    removed.setdefault((member.module, member.role), set()).update(pos)
        return {key: sorted(v) for key, v in removed.items()}

    def shrunk(self, masks: Mapping[str, Any]) -> ChannelGraph:
        """The graph of the model after removing the channels that ``masks`` drop (no tracing:
        positions and channels are renumbered, layer sizes reduced; removed branches and
        their layers are dropped)."""
        masks = self.check_masks(masks)
        effective = self.effective_masks(masks)
        gone = self.removed_layers(masks) if self.branch_names else set()
        removed = self.removed_positions(masks)
        renumber: dict[tuple[str, str], list[int]] = {}
        for (module, role), pos in removed.items():
            layer = self.layers[module]
            n = layer.in_channels if role == "in" else layer.out_channels
            keep = torch.ones(n, dtype=torch.bool)
            keep[pos] = False
            renumber[(module, role)] = (torch.cumsum(keep.long(), 0) - 1).tolist()
        new_channels = {name: (torch.cumsum(m.long(), 0) - 1).tolist() for name, m in effective.items()}
        groups = {}
        for name, group in self.groups.items():
            members_left = [m for m in group.members if m.module not in gone]
            if not members_left or (group.is_branch and not bool(effective[name].any())):
                continue  # a removed branch, or a group living inside one
            extra: dict[str, Any] = {}
            if len(members_left) != len(group.members):
                extra["gate_sites"] = tuple(s for s in group.gate_sites if s not in gone)
            if bool(effective[name].all()):
                members = [
                    replace(m, positions=tuple(renumber[(m.module, m.role)][p] for p in m.positions))
                    if (m.module, m.role) in renumber
                    else m
                    for m in members_left
                ]
                if group.is_branch:
                    stream_channel = new_channels[group.stream]
                    extra["into"] = tuple(stream_channel[c] for c in group.into)
                groups[name] = replace(group, members=tuple(members), **extra)
                continue
            keep = effective[name].tolist()
            new_channel = new_channels[name]
            members = []
            for member in members_left:
                ren = renumber.get((member.module, member.role))
                kept = [(p, c) for p, c in zip(member.positions, member.channels) if keep[c]]
                members.append(
                    Member(
                        member.module,
                        member.role,
                        tuple(ren[p] if ren is not None else p for p, _ in kept),
                        tuple(new_channel[c] for _, c in kept),
                    )
                )
            if group.is_branch:
                stream_channel = new_channels[group.stream]
                extra["into"] = tuple(stream_channel[c] for c, k in zip(group.into, keep) if k)
            groups[name] = replace(group, size=int(effective[name].sum()), members=tuple(members), **extra)
        layers = {}
        for name, layer in self.layers.items():
            if name in gone:
                continue
            n_out = len(removed.get((name, "out"), ())) + len(removed.get((name, "channel"), ()))
            n_in = len(removed.get((name, "in"), ())) + len(removed.get((name, "channel"), ()))
            new = replace(layer, out_channels=layer.out_channels - n_out, in_channels=layer.in_channels - n_in)
            if layer.depthwise:
                new = replace(new, groups=new.out_channels)
            layers[name] = new
        if not gone:
            return replace(self, groups=groups, layers=layers)
        zero_outputs = dict(self.zero_outputs)
        for name in self.removed_branches(masks):
            zero_outputs[self.groups[name].branch_output] = self.groups[name].stream
        order = tuple(n for n in self.execution_order if n not in gone)
        return replace(self, groups=groups, layers=layers, execution_order=order, zero_outputs=zero_outputs)

    def check_model(self, model: nn.Module, argument: str = "model") -> None:
        """Raise ``ValueError`` unless ``model`` has the layers and sizes this graph describes."""
        modules = dict(model.named_modules())
        for name, layer in self.layers.items():
            module = modules.get(name)
            if module is None:
                raise ValueError(f"{argument} has no layer {name!r}: the channel graph was built for another architecture")
            sizes = layer_sizes(module)
            if sizes != (layer.in_channels, layer.out_channels):
                raise ValueError(
                    f"{argument}: layer {name!r} has (in, out) channels {sizes}, the channel graph expects "
                    f"{(layer.in_channels, layer.out_channels)}; the graph is stale (use the graph returned by shrink) "
                    "or was built for another model"
                )


def layer_sizes(module: nn.Module) -> tuple[int, int]:
    """``(in_channels, out_channels)`` of a convolution, linear or batch-norm layer."""
    if isinstance(module, _ConvNd):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, _BatchNorm):
        return module.num_features, module.num_features
    raise TypeError(f"not a convolution, linear or batch-norm layer: {type(module).__name__}")


def layer_kind(module: nn.Module) -> str | None:
    """``"conv"`` (not transposed), ``"linear"``, ``"norm"`` (batch norm) or ``None`` (any other module)."""
    if isinstance(module, _ConvNd) and not module.transposed:
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _BatchNorm):
        return "norm"
    return None


def zero_inputs(record: Mapping[str, Any]) -> tuple[Tensor, ...]:
    """Zero example inputs of the ``input_shapes`` / ``input_dtypes`` (default float32) a
    record holds (a pruning history, a GateSet's extra state, a budget record)."""
    shapes = record["input_shapes"]
    dtypes = record.get("input_dtypes") or ["float32"] * len(shapes)
    return tuple(torch.zeros(tuple(s), dtype=getattr(torch, d)) for s, d in zip(shapes, dtypes))


def random_masks(
    graph: ChannelGraph, keep: float, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Random keep-masks keeping ``max(1, round(keep * size))`` channels of every group."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")
    masks = {}
    for name, group in graph.groups.items():
        k = max(1, int(round(keep * group.size)))
        idx = torch.randperm(group.size, generator=generator)[:k]
        m = torch.zeros(group.size, dtype=torch.bool)
        m[idx] = True
        masks[name] = m
    return masks
