"""Attach per-channel gates to the channel groups of a model, without editing its code.

:func:`attach_gates` puts one gate (any :class:`lightning_prune.core.gates.ChannelGate`) on each
chosen group and returns a :class:`GateSet`, an ``nn.Module`` holding the gates in a
``ModuleDict`` keyed by group name. The GateSet is registered as a submodule of ``owner``
when one is given (the LightningModule, so that its checkpoints save the gate parameters,
its optimizer sees them and DDP synchronises their gradients); by default it is registered
nowhere (the caller holds it), so that no container's ``forward`` (an ``nn.Sequential``
calls every child) ever sees it.

How the gates act (forward hooks, removed again by :meth:`GateSet.detach`):

- one sample per forward pass: a forward pre-hook on the first gate site that runs (in the
  order recorded when the graph was built) draws a fresh value from every gate; all sites of
  a group then use that same value, so a residual stream gated at several layers sees one
  mask. (This is robust to a LightningModule calling ``self.net(x)`` instead of ``self(x)``.)
  When the gated model is in eval mode (``model.eval()``) the gates return their
  deterministic value, wherever the GateSet is registered.
- each site's output (see :class:`lightning_prune.core.graph.ChannelGroup` for where they are)
  is multiplied channel-wise by its groups' values; a layer read by several groups (a batch
  norm after a concatenation) gets each group's values at that group's positions. With 0/1
  gates in eval mode the gated network computes exactly what the shrunk network computes.
- mixed-connectivity residual blocks: a branch's last layer is multiplied by its own gate
  *and* by the gate of the stream channel each of its channels adds into (Lemaire, Achkar and
  Jodoin, CVPR 2019, supplementary material, Algorithm 1: a branch channel whose stream
  channel is removed contributes nothing), so that ``z_branch * z_stream`` scales the delta
  that the block adds to the stream.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor, nn

from lightning_prune.core.gates import ChannelGate
from lightning_prune.core.graph import ChannelGraph, ChannelGroup
from lightning_prune.core.residual import is_scattered

__all__ = ["GateSet", "attach_gates", "attached_gates", "masks_in_state_dict"]

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, GateSet] = weakref.WeakKeyDictionary()


def attached_gates(model: nn.Module) -> GateSet | None:
    """The :class:`GateSet` currently attached to ``model`` (the module its graph was built on), if any."""
    return _ATTACHED.get(model)


def _key(name: str) -> str:
    return name.replace(".", "/")  # ModuleDict keys cannot contain dots


def masks_in_state_dict(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """``{group name: bool mask}`` of the fixed-mask gates saved in ``state_dict`` by a GateSet
    whose own keys start with ``prefix`` (e.g. ``"prune_gates."``)."""
    start, end = f"{prefix}gates.", ".mask"
    return {k[len(start) : -len(end)].replace("/", "."): v.bool() for k, v in state_dict.items() if k.startswith(start) and k.endswith(end)}


class GateSet(nn.Module):
    """One gate per channel group, keyed by group name (``gates[name]``).

    A deep copy of a GateSet is detached. (A deep copy of a *gated model* keeps the forward
    hooks, which still read the original GateSet: use :func:`lightning_prune.core.export` for a
    standalone copy.)

    Args:
        gates: ``{group name: ChannelGate}``.
    """

    def __init__(self, gates: Mapping[str, ChannelGate]) -> None:
        super().__init__()
        if not isinstance(gates, Mapping):
            raise TypeError(f"gates must be a mapping from group name to a ChannelGate, got {type(gates).__name__}")
        for name, gate in gates.items():
            if not isinstance(name, str):
                raise TypeError(f"gates: group names must be strings, got {type(name).__name__}")
            if not isinstance(gate, ChannelGate):
                raise TypeError(f"gates[{name!r}] must be a ChannelGate, got {type(gate).__name__}")
        self.group_names: list[str] = list(gates)
        self.gates = nn.ModuleDict({_key(n): g for n, g in gates.items()})
        self._sample: dict[str, Tensor] | None = None
        self._handles: list = []
        self._model_ref: Callable[[], nn.Module | None] | None = None
        self._owner_ref: Callable[[], nn.Module | None] | None = None
        self._owner_name: str | None = None
        self.graph: ChannelGraph | None = None

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) holds the same gate values but is not attached: hooks and
        # the last sample (a non-leaf tensor, which deepcopy refuses) stay with the original.
        state = super().__getstate__()
        state.update(_sample=None, _handles=[], _model_ref=None, _owner_ref=None, _owner_name=None)
        return state

    # -- mapping-like access ------------------------------------------------------------
    def __getitem__(self, name: str) -> ChannelGate:
        if name not in self.group_names:
            raise KeyError(f"no gate for group {name!r}; gated groups: {', '.join(self.group_names)}")
        return self.gates[_key(name)]

    def __contains__(self, name: object) -> bool:
        return name in self.group_names

    def __iter__(self) -> Iterator[str]:
        return iter(self.group_names)

    def __len__(self) -> int:
        return len(self.group_names)

    def items(self) -> Iterator[tuple[str, ChannelGate]]:
        for name in self.group_names:
            yield name, self.gates[_key(name)]

    # -- gate values --------------------------------------------------------------------
    def sample(self) -> dict[str, Tensor]:
        """``{group: gate()}``: a sample per gate in training mode, deterministic values in eval mode."""
        return {name: gate() for name, gate in self.items()}

    def open_probabilities(self) -> dict[str, Tensor]:
        """``{group: gate.open_probability()}`` (differentiable), for the expected cost."""
        return {name: gate.open_probability() for name, gate in self.items()}

    def alive(self) -> dict[str, Tensor]:
        """``{group: bool mask}`` of the channels kept if pruned now: the masks for ``shrink``."""
        return {name: gate.alive().detach().bool() for name, gate in self.items()}

    # -- attachment ---------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def model(self) -> nn.Module | None:
        """The gated model, while attached."""
        return self._model_ref() if self._model_ref is not None and self.attached else None

    def _current(self) -> dict[str, Tensor]:
        if self._sample is None:
            self._sample = self.sample()
        return self._sample

    def _install(self, model: nn.Module, graph: ChannelGraph) -> None:
        modules = dict(model.named_modules())
        sites: dict[str, list[tuple[str, Tensor, Tensor, bool, bool]]] = {}
        for name in self.group_names:
            group = graph.groups[name]
            for member in group.members:
                if member.module in group.gate_sites and member.role != "in":
                    ident = member.positions == member.channels == tuple(range(group.size))
                    ident = ident and graph.layers[member.module].out_channels == group.size
                    pos = torch.tensor(member.positions, dtype=torch.long)
                    chan = torch.tensor(member.channels, dtype=torch.long)
                    sites.setdefault(member.module, []).append((name, pos, chan, ident, group.is_branch))
        # Mixed-connectivity residual blocks: a branch's output is also multiplied by the gates of
        # the stream channels it adds into (a branch channel whose stream channel is removed
        # contributes nothing), whether or not the branch itself is gated.
        for group in graph.groups.values():
            if not group.is_branch or group.stream not in self.group_names:
                continue
            into = torch.tensor(group.into, dtype=torch.long)
            for member in group.members:
                if member.module in group.gate_sites and member.role != "in":
                    pos = torch.tensor(member.positions, dtype=torch.long)
                    chan = into[torch.tensor(member.channels, dtype=torch.long)]
                    sites.setdefault(member.module, []).append((group.stream, pos, chan, False, True))
        if not sites:
            return
        ordered = [m for m in graph.execution_order if m in sites]
        first = ordered[0] if ordered else next(iter(sites))

        def resample(module: nn.Module, _args: object) -> None:
            self._sample = None
            # the gates follow the gated model's mode (not the first site's: a caller may hold
            # batch norms in eval mode while the network trains, as Dirichlet's switch phase does)
            root = self.model
            training = root.training if root is not None else module.training
            if self.training != training:
                self.train(training)

        self._handles.append(modules[first].register_forward_pre_hook(resample))
        for module_name, entries in sites.items():
            layer, module = graph.layers[module_name], modules[module_name]
            if is_scattered(module):  # a shrunk branch's last layer: its output is in stream positions
                index = module.scatter_index.cpu()
                entries = [(n, index[pos], chan, False, multiply) for n, pos, chan, _, multiply in entries]
                layer = replace(layer, out_channels=module.scatter_width)
            self._handles.append(module.register_forward_hook(self._make_hook(layer, entries)))

    def _make_hook(self, layer, entries) -> Callable:
        channels = layer.out_channels
        channel_dim = -1 if layer.kind == "linear" else 1
        on_device: dict[torch.device, list[tuple[Tensor, Tensor]]] = {}  # index tensors, moved once

        def hook(_module: nn.Module, _args: object, out: Tensor) -> Tensor:
            values = self._current()
            if len(entries) == 1 and entries[0][3]:
                mult = values[entries[0][0]]
            else:
                ref = values[entries[0][0]]
                if ref.device not in on_device:
                    on_device[ref.device] = [(pos.to(ref.device), chan.to(ref.device)) for _, pos, chan, _, _ in entries]
                mult = torch.ones(channels, dtype=ref.dtype, device=ref.device)
                for (name, *_, multiply), (pos, chan) in zip(entries, on_device[ref.device]):
                    value = values[name][chan]
                    mult = mult.index_put((pos,), mult[pos] * value if multiply else value)
            shape = [1] * out.dim()
            shape[channel_dim] = channels
            return out * mult.to(device=out.device, dtype=out.dtype).view(shape)

        return hook

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._sample = None

    def reinstall(self) -> None:
        """Hook the gates again onto the layers the gated model has now, found by name (after
        a strategy replaced some, e.g. BatchNorm by SyncBatchNorm)."""
        model, graph = self.model, self.graph
        if model is None or graph is None:
            return
        self._remove_hooks()
        self._install(model, graph)

    # -- checkpoints --------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        """The example input's shapes and dtypes, so a checkpoint can rebuild the graph."""
        if self.graph is None:
            return {}
        return {"input_shapes": [list(s) for s in self.graph.input_shapes], "input_dtypes": list(self.graph.input_dtypes)}

    def set_extra_state(self, state: dict) -> None:
        pass  # read from the state dict by whoever rebuilds the graph; the attached graph stays

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Temporarily remove the hooks (e.g. to deep-copy the bare model); restored on exit."""
        model, graph = self.model, self.graph
        if model is None or graph is None:
            yield
            return
        self._remove_hooks()
        try:
            yield
        finally:
            self._install(model, graph)

    def detach(self) -> None:
        """Remove the hooks and unregister this GateSet from its owner. The gates keep their values."""
        model = self._model_ref() if self._model_ref is not None else None
        self._remove_hooks()
        if model is not None and _ATTACHED.get(model) is self:
            del _ATTACHED[model]
        owner = self._owner_ref() if self._owner_ref is not None else None
        if owner is not None and self._owner_name is not None and getattr(owner, self._owner_name, None) is self:
            delattr(owner, self._owner_name)
        self._model_ref = self._owner_ref = None
        self._owner_name = None

    def extra_repr(self) -> str:
        return f"groups={len(self.group_names)}, attached={self.attached}"


GateFactory = Callable[[ChannelGroup], ChannelGate]


def attach_gates(
    model: nn.Module,
    graph: ChannelGraph,
    gates: GateSet | Mapping[str, ChannelGate] | GateFactory,
    *,
    owner: nn.Module | None = None,
    name: str = "prune_gates",
) -> GateSet:
    """Gate the channel groups of ``model`` and return the :class:`GateSet`.

    Args:
        model: the module ``graph`` was built on (or an identical copy).
        graph: its :class:`~lightning_prune.core.graph.ChannelGraph`.
        gates: a GateSet, ``{group name: gate}`` (a subset of the groups is allowed; ungated
            groups keep every channel), or a factory called with each
            :class:`~lightning_prune.core.graph.ChannelGroup`, e.g.
            ``lambda group: HardConcreteGate(group.size)``.
        owner: module to register the GateSet under as ``owner.<name>`` (default: none, the
            caller holds the returned GateSet); pass the LightningModule so checkpoints,
            optimizers and DDP see the gates. Not a container whose ``forward`` calls its
            children (``nn.Sequential``).
        name: attribute name on ``owner``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(graph, ChannelGraph):
        raise TypeError(f"graph must be a ChannelGraph (from build_graph), got {type(graph).__name__}")
    if owner is not None and not isinstance(owner, nn.Module):
        raise TypeError(f"owner must be an nn.Module or None, got {type(owner).__name__}")
    if isinstance(owner, nn.Sequential):
        raise ValueError("owner: an nn.Sequential calls every child in its forward, the gates too; pass owner=None or another module")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be a valid attribute name, got {name!r}")
    if owner is not None and hasattr(owner, name):
        raise ValueError(f"name: {type(owner).__name__} already has an attribute {name!r}")
    if attached_gates(model) is not None:
        raise ValueError("model already has gates attached; detach them first (GateSet.detach())")
    graph.check_model(model)
    if isinstance(gates, GateSet):
        gate_set = gates
        if gate_set.attached:
            raise ValueError("gates: this GateSet is already attached to a model")
    elif isinstance(gates, Mapping):
        gate_set = GateSet(gates)
    elif callable(gates):
        made = {}
        for group in graph:
            gate = gates(group)
            if not isinstance(gate, ChannelGate):
                raise TypeError(f"gates factory returned {type(gate).__name__} for group {group.name!r}, not a ChannelGate")
            made[group.name] = gate
        gate_set = GateSet(made)
    else:
        raise TypeError(f"gates must be a GateSet, a mapping or a factory, got {type(gates).__name__}")
    for group_name, gate in gate_set.items():
        if group_name not in graph.groups:
            hint = f" (it is not pruned: {graph.excluded[group_name]})" if group_name in graph.excluded else ""
            raise ValueError(f"gates: unknown channel group {group_name!r}{hint}")
        if gate.num_channels != graph.groups[group_name].size:
            raise ValueError(
                f"gates[{group_name!r}] has {gate.num_channels} channels, group {group_name!r} has {graph.groups[group_name].size}"
            )
    if owner is not None:
        owner.add_module(name, gate_set)
        gate_set._owner_ref = weakref.ref(owner)
        gate_set._owner_name = name
    gate_set.graph = graph
    gate_set._model_ref = weakref.ref(model)
    gate_set._install(model, graph)
    _ATTACHED[model] = gate_set
    return gate_set
