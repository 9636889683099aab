"""Export a pruned network as a plain ``nn.Module``, save it and load it back.

Files written by :func:`save_pruned` hold only plain data and tensors, so they load with
``torch.load(path, weights_only=True)`` (no pickled modules)::

    {"format": "lightning-prune", "version": 1,
     "architecture": {"_target_": "lightning_prune.models.CifarResNet", "depth": 20, ...} or None,
     "history": the pruning history (see lightning_prune.surgery.PruningHistory) or None,
     "state_dict": the shrunk network's state dict}

``architecture`` is a Hydra-style description (``_target_`` plus keyword arguments, e.g. the
``model`` section of a config with ``num_classes`` added). :func:`load_pruned` rebuilds it
only for targets inside ``lightning_prune.models`` and ``torchvision.models`` (building an
arbitrary callable named in a file would defeat the point of ``weights_only``); for any
other architecture pass ``model=`` a fresh instance.
"""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_prune.gating import GateSet, attached_gates
from lightning_prune.surgery import HISTORY_ATTR, PruningHistory, pruning_history, replay, shrink

__all__ = ["export", "save_pruned", "load_pruned", "ALLOWED_TARGETS"]

FORMAT = "lightning-prune"
VERSION = 1
ALLOWED_TARGETS = ("lightning_prune.models.", "torchvision.models.")


def _gate_sets(module: nn.Module) -> list[GateSet]:
    found: dict[int, GateSet] = {}
    for m in module.modules():
        if isinstance(m, GateSet) and m.attached:
            found[id(m)] = m
        gs = attached_gates(m)
        if gs is not None:
            found[id(gs)] = gs
    return list(found.values())


def _strip_gate_sets(module: nn.Module) -> None:
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GateSet):
                delattr(parent, name)


def export(module: nn.Module) -> nn.Module:
    """A plain copy of the pruned network inside ``module``, physically shrunk, without gates.

    - If gates are attached (to ``module`` or to a network inside it, e.g. a LightningModule's
      ``net``), the gated network is copied and shrunk to the channels the gates keep
      (``GateSet.alive()``); ``module`` itself is not changed.
    - Otherwise the already shrunk network is copied: the submodule holding a pruning
      history, or ``module`` itself when it is a plain ``nn.Module``.

    The copy carries its pruning history (``lightning_prune.surgery.pruning_history``).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    gate_sets = _gate_sets(module)
    if len(gate_sets) > 1:
        raise ValueError(f"module has {len(gate_sets)} attached GateSets; export the gated networks one at a time")
    if gate_sets:
        gs = gate_sets[0]
        net, graph = gs.model, gs.graph
        masks = {name: mask.cpu() for name, mask in gs.alive().items() if not bool(mask.all())}
        with gs.suspended():
            out = copy.deepcopy(net)
        _strip_gate_sets(out)
        shrink(out, masks, graph=graph)
        return out
    if pruning_history(module) is not None or not isinstance(module, pl.LightningModule):
        out = copy.deepcopy(module)
        _strip_gate_sets(out)
        return out
    holders = [name for name, m in module.named_modules() if isinstance(getattr(m, HISTORY_ATTR, None), PruningHistory)]
    if len(holders) != 1:
        raise ValueError(
            f"{type(module).__name__} has no attached gates and "
            + ("no shrunk network" if not holders else f"{len(holders)} shrunk networks ({', '.join(holders)})")
            + "; pass the network to export itself"
        )
    out = copy.deepcopy(module.get_submodule(holders[0]))
    _strip_gate_sets(out)
    return out


def _check_plain(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, got {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} must hold only None, bool, int, float, str, lists and dicts; got {type(value).__name__}")


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_pruned(module: nn.Module, path: str | os.PathLike, *, architecture: Mapping[str, Any] | None = None) -> None:
    """Export ``module`` (see :func:`export`) and save it to ``path`` in a ``weights_only`` file.

    Args:
        architecture: ``{"_target_": "package.Constructor", **kwargs}`` rebuilding the
            *unpruned* network, so that :func:`load_pruned` needs no ``model=``.
    """
    if architecture is not None:
        if not isinstance(architecture, Mapping) or not isinstance(architecture.get("_target_"), str):
            raise ValueError("architecture must be a mapping with a '_target_' string (and constructor keyword arguments)")
        _check_plain(architecture, "architecture")
        architecture = _plain(architecture)
    net = export(module)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": architecture,
        "history": pruning_history(net),
        "state_dict": net.state_dict(),
    }
    torch.save(payload, path)


def _build(architecture: Mapping[str, Any]) -> nn.Module:
    target = architecture["_target_"]
    if not any(target.startswith(prefix) for prefix in ALLOWED_TARGETS):
        raise ValueError(
            f"architecture target {target!r} is not in {ALLOWED_TARGETS}; build the model yourself and pass model="
        )
    module_path, _, attr = target.rpartition(".")
    factory = getattr(importlib.import_module(module_path), attr, None)
    if not callable(factory):
        raise ValueError(f"architecture target {target!r} does not name a callable")
    model = factory(**{k: v for k, v in architecture.items() if k != "_target_"})
    if not isinstance(model, nn.Module):
        raise TypeError(f"architecture target {target!r} returned {type(model).__name__}, not an nn.Module")
    return model


def load_pruned(
    path: str | os.PathLike, *, model: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load a file written by :func:`save_pruned` (with ``torch.load(weights_only=True)``).

    Args:
        model: a fresh, unpruned instance of the architecture; built from the recorded
            ``architecture`` when ``None``.

    Returns:
        The shrunk network with the saved weights, in eval mode.
    """
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a lightning-prune file (save it with lightning_prune.save_pruned)")
    if payload.get("version") != VERSION:
        raise ValueError(f"{os.fspath(path)!r}: unsupported lightning-prune file version {payload.get('version')!r}")
    if model is None:
        if payload.get("architecture") is None:
            raise ValueError(f"{os.fspath(path)!r} records no architecture; pass model= a fresh instance of the network")
        model = _build(payload["architecture"])
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
    if payload.get("history") is not None:
        replay(model, payload["history"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()
