"""Export a pruned network as a plain ``nn.Module``, save it and load it back.

Files written by :func:`save_pruned` hold only plain data and tensors, so they load with
``torch.load(path, weights_only=True)`` (no pickled modules)::

    {"format": "lightning-prune", "version": 2,
     "architecture": {"_target_": "lightning_prune.models.CifarResNet", "depth": 20, ...} or None,
     "history": the pruning history (see lightning_prune.core.surgery.pruning_history) or None,
     "decompositions": [{"kind": "svd", "layer": "classifier.1", "ranks": [50], "after_steps": 1},
                        {"kind": "tucker2", "layer": "features.2", "ranks": [10, 12], "after_steps": 1}, ...],
     "inference": {"folded": [["features.0", "features.1"], ...]},  (version 3 only)
     "state_dict": the compressed network's state dict}

``architecture`` is a Hydra-style description (``_target_`` plus keyword arguments, e.g. the
``model`` section of a config with ``num_classes`` added) of the network *before* any
structural step; an Architecture Compression network is
``{"_target_": "lightning_prune.archcomp.models.build", "tokens": [[t, k, o, s, p], ...],
"input_shape": [C, H, W]}``. The structural steps are plain data and replay onto a fresh
instance in their order: channel pruning (the ``steps`` of ``history``, see
:func:`lightning_prune.core.surgery.replay`) and low-rank decompositions of single layers
(``"svd"``: rank ``[r]``, ``"tucker2"``: ranks ``[r_in, r_out]``, each applied after
``after_steps`` pruning steps; see :mod:`lightning_prune.core.decomposition`). Then the weights
are loaded. Version 1 files (no ``decompositions``) are read too.

A network exported for inference (``export(..., inference=True)``, see
:mod:`lightning_prune.core.inference`) has batch norms folded into the layers before them; its
file records the folded ``[layer, batch norm]`` pairs under ``inference`` and is written as
version 3 (a file without folded batch norms stays version 2, readable by earlier releases).
:func:`load_pruned` rebuilds the network, replays its structural steps, folds the same pairs and
then loads the weights.

:func:`load_pruned` rebuilds ``architecture`` only for targets inside ``ALLOWED_TARGETS``
(``lightning_prune.models``, ``lightning_prune.archcomp.models`` and ``torchvision.models``:
building an arbitrary callable named in a file would defeat the point of ``weights_only``); for
any other architecture pass ``model=`` a fresh instance. Loading never downloads anything: an
architecture asking for pretrained weights (``weights``, ``weights_backbone``, ``pretrained``,
``pretrained_backbone`` other than None / False) is refused, and torchvision builders are
called with every such argument set to None (e.g. the ImageNet backbone that detection and
segmentation builders load by default).

A file that cannot be read (empty, truncated, not written by ``torch.save``, holding pickled
objects) or that does not have the layout above raises one ``ValueError`` naming the file.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.core.cost import count_cost
from lightning_prune.core.cost.latency import LATENCY
from lightning_prune.core.graph import zero_inputs
from lightning_prune.core.decomposition import KINDS as DECOMPOSITION_KINDS
from lightning_prune.core.decomposition import decompositions, replay_decomposition

from lightning_prune._checks import check_bool
from lightning_prune.core.gating import GateSet, attached_gates
from lightning_prune.core.folding import shrink_as_masked
from lightning_prune.core.inference import fold_batchnorm, fold_pairs, folded_layers
from lightning_prune.core.surgery import BUDGET_ATTR, enable_pruned_loading, pruned_loading_enabled, pruning_history, replay

__all__ = ["export", "save_pruned", "load_pruned", "load_checkpoint", "ALLOWED_TARGETS"]

FORMAT = "lightning-prune"
VERSION = 2
INFERENCE_VERSION = 3  # version 2 plus "inference" (folded batch norms); written only when something was folded
READABLE_VERSIONS = (1, 2, 3)  # version 1: no "decompositions"
ALLOWED_TARGETS = ("lightning_prune.models.", "lightning_prune.archcomp.models.", "torchvision.models.")
# Constructor arguments that make a builder load pretrained weights (a download for torchvision);
# a file may only set them to None or False.
PRETRAINED_KEYS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")


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




def record_budget(network: nn.Module, cost: str, target: float, full: float, example_input: tuple[Tensor, ...]) -> None:
    """Note on ``network`` the budget it is pruned to, so that :func:`export` can check it
    (a plain attribute: copies of the network carry it, its forward never sees it)."""
    network.__dict__[BUDGET_ATTR] = {
        "cost": cost, "target": float(target), "full": float(full),
        "input_shapes": [list(t.shape) for t in example_input],
        "input_dtypes": [str(t.dtype).removeprefix("torch.") for t in example_input],
    }


def record_hardened(network: nn.Module, cost: float) -> None:
    """Note on ``network`` that it was hard-pruned, and the cost its keep-masks were given
    (for a latency budget, which cannot be counted on the exported network, the prediction
    that :func:`export` checks)."""
    budget = network.__dict__.get(BUDGET_ATTR)
    if budget is not None:
        budget["hardened"] = float(cost)


def inference_channels_last(module: nn.Module) -> bool:
    """Whether the inference export stores ``module``'s weights ``channels_last`` by default:
    when it has a 2-D convolution."""
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def export(
    module: nn.Module,
    *,
    allow_over_budget: bool = False,
    inference: bool = False,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    channels_last: bool | None = None,
) -> nn.Module:
    """A plain copy of the pruned network inside ``module``, physically shrunk, without gates.

    - If gates are attached (to ``module`` or to a network inside it, e.g. a LightningModule's
      ``net``), the gated network is copied and shrunk to the channels the gates keep
      (``GateSet.alive()``); ``module`` itself is not changed.
    - Otherwise the already shrunk network is copied: when ``module`` holds no pruning history
      of its own but exactly one of its submodules does (e.g. a LightningModule whose ``net``
      was shrunk), that submodule; in every other case ``module`` itself.

    The copy carries its pruning history (``lightning_prune.core.surgery.pruning_history``).

    Args:
        allow_over_budget: export even if the network costs more than the budget a pruning
            callback set for it (a run that ended before hard pruning). By default that is
            a ``ValueError``.
        inference: return the network for inference: in eval mode, with every batch norm that
            directly follows a convolution or linear layer feeding only it folded into that
            layer (:func:`lightning_prune.core.inference.fold_batchnorm`; the others stay).
        example_input: with ``inference=True``, a batch on which the folding is traced and
            checked; default: random inputs of the shapes the pruning history records (a
            network that was never pruned needs it).
        channels_last: store the weights of 2-D convolutions in ``torch.channels_last`` memory
            format (``module.to(memory_format=torch.channels_last)``; the outputs are the same).
            Default ``None``: yes with ``inference=True`` when the network has a 2-D convolution,
            no otherwise. On a CPU (one thread, batch 256, timed interleaved) a shrunk ResNet-20
            ran in 0.57-0.59 of its time with contiguous weights.
    """
    check_bool("allow_over_budget", allow_over_budget)
    check_bool("inference", inference)
    if channels_last is not None and not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool or None, got {type(channels_last).__name__}")
    if example_input is not None and not inference:
        raise ValueError("example_input is used only with inference=True (to fold the batch norms)")
    out = _plain_copy(module)
    budget = out.__dict__.get(BUDGET_ATTR)
    if budget is not None and not allow_over_budget:
        example = zero_inputs(budget)
        device = next(out.parameters(), torch.empty(0)).device
        was_training = out.training
        if budget["cost"] == LATENCY:  # not countable: the prediction recorded at hard pruning, if it happened
            spent = budget.get("hardened", math.inf)
        else:
            spent = count_cost(out.eval(), tuple(t.to(device) for t in example))[budget["cost"]]
        out.train(was_training)
        if spent > budget["target"]:
            raise ValueError(
                f"module: the network costs {budget['cost']} {spent:,}, over its budget {budget['target']:,.0f} "
                f"({100 * spent / budget['full']:.1f}% of {budget['full']:,.0f}): it was not hard-pruned (did the run "
                "end before HardPruning's at_epoch?); pass allow_over_budget=True to export it anyway"
            )
    if inference:
        fold_batchnorm(out, example_input)
    if channels_last is None:
        channels_last = inference and inference_channels_last(out)
    if channels_last:
        out.to(memory_format=torch.channels_last)
    return out


def _plain_copy(module: nn.Module) -> nn.Module:
    """The network inside ``module`` as a plain, shrunk copy, as :func:`export` describes."""
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
        shrink_as_masked(out, masks, graph=graph)  # folds what masking keeps, checks masked == shrunk
        return out
    # Which network, without knowing about Lightning: a module that was not shrunk itself but
    # holds exactly one shrunk submodule (a training wrapper's network) exports that submodule.
    holders = [name for name, m in module.named_modules() if pruning_history(m) is not None]
    if pruning_history(module) is None and len(holders) == 1:
        out = copy.deepcopy(module.get_submodule(holders[0]))
    else:
        out = copy.deepcopy(module)
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


def save_pruned(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    architecture: Mapping[str, Any] | None = None,
    inference: bool = False,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
) -> None:
    """Export ``module`` (see :func:`export`) and save it to ``path`` in a ``weights_only`` file
    (layout: the module docstring). The structural steps recorded on the network (its pruning
    history, its decompositions, its folded batch norms) are saved with it.

    Args:
        architecture: ``{"_target_": "package.Constructor", **kwargs}`` rebuilding the
            network before any structural step, so that :func:`load_pruned` needs no ``model=``.
        inference: save the inference form (``export(..., inference=True)``: batch norms folded);
            :func:`load_pruned` folds the same batch norms before loading the weights.
        example_input: with ``inference=True``, as for :func:`export`.
    """
    if architecture is not None:
        if not isinstance(architecture, Mapping) or not isinstance(architecture.get("_target_"), str):
            raise ValueError("architecture must be a mapping with a '_target_' string (and constructor keyword arguments)")
        _check_plain(architecture, "architecture")
        architecture = _plain(architecture)
    net = export(module, inference=inference, example_input=example_input, channels_last=False)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": architecture,
        "history": pruning_history(net),
        "decompositions": copy.deepcopy(decompositions(net) or []),
        "state_dict": net.state_dict(),
    }
    folded = folded_layers(net)  # also when module itself was folded earlier
    if folded:
        payload.update(version=INFERENCE_VERSION, inference={"folded": [list(pair) for pair in folded]})
    torch.save(payload, path)


def load_checkpoint(module: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a Lightning checkpoint (or a plain state dict) into ``module``, a fresh instance of
    the LightningModule or network that was trained, including checkpoints taken after
    :class:`~lightning_prune.callbacks.HardPruning` shrank the network: the pruning history
    they carry is replayed onto ``module`` first. Use it where ``MyModule.load_from_checkpoint``
    fails with a size mismatch (it copies the smaller tensors into a full-size module)::

        module = lightning_prune.load_checkpoint(MyModule(...), "epoch=9.ckpt")

    Checkpoints of the soft phase hold the gates too: resume those with the callbacks
    (``trainer.fit(..., ckpt_path=...)``). Returns ``module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    payload = read_torch_file(path, "a Lightning checkpoint or a state dict", prefix="load_checkpoint: ")
    state = payload.get("state_dict", payload) if isinstance(payload, Mapping) else payload
    if not isinstance(state, Mapping):
        raise ValueError(f"load_checkpoint: {os.fspath(path)} holds a {type(state).__name__}, not a checkpoint or state dict")
    if not pruned_loading_enabled(module):
        enable_pruned_loading(module)
    try:
        module.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        raise ValueError(f"load_checkpoint: the weights in {os.fspath(path)} do not fit {type(module).__name__}: {error}") from None
    return module


def read_torch_file(path: str | os.PathLike, what: str, *, prefix: str = "", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors naming the file.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        ValueError: ``path`` is not a regular file, or ``torch.load`` cannot read it (empty,
            truncated, random bytes, not written by ``torch.save``, or holding pickled objects
            other than tensors and plain data); the message says the file is not ``what``
            (e.g. ``"a lightning-prune file"``).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{prefix}no file {p}")
    if not p.is_file():
        raise ValueError(f"{prefix}cannot read {p}: it is not a file, so it is not {what}")
    if p.stat().st_size == 0:
        raise ValueError(f"{prefix}cannot read {p}: the file is empty, so it is not {what}")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except OSError:
        raise  # permissions and the like: the message already names the file
    except pickle.UnpicklingError:
        # torch's message suggests loading with weights_only=False, i.e. running whatever the file holds.
        raise ValueError(
            f"{prefix}cannot read {p}: it is not {what} (it holds something other than tensors and plain data, "
            "or it is corrupt)"
        ) from None
    except EOFError as error:
        raise ValueError(f"{prefix}cannot read {p}: it is not {what} (the data ends early: truncated?)") from error
    except Exception as error:  # torch.load raises RuntimeError, KeyError, ValueError, ... on foreign bytes
        raise ValueError(
            f"{prefix}cannot read {p}: it is not {what} (not a complete file written by torch.save: truncated or "
            f"corrupt; torch.load raised {type(error).__name__})"
        ) from error


def _without_pretrained(factory: Any, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """``kwargs`` checked and completed so that ``factory(**kwargs)`` loads no pretrained weights."""
    for key in PRETRAINED_KEYS:
        if key not in kwargs:
            continue
        if kwargs[key] is None or kwargs[key] is False:
            del kwargs[key]  # the default (no weights) or set to None below
            continue
        raise ValueError(
            f"{where}: architecture argument {key}={kwargs[key]!r} asks for pretrained weights; lightning-prune never "
            "downloads weights (the saved state_dict holds them): remove it, or build the model yourself and pass model="
        )
    try:
        import torchvision.models as tvm
        from torchvision.models import WeightsEnum
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return kwargs
    builder = factory
    if factory is tvm.get_model and isinstance(kwargs.get("name"), str):
        try:
            builder = tvm.get_model_builder(kwargs["name"])
        except ValueError:
            return kwargs  # get_model raises its own "unknown model" error
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return kwargs
    for param in params:
        if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and (
            param.name in PRETRAINED_KEYS or isinstance(param.default, WeightsEnum)
        ):
            kwargs[param.name] = None  # e.g. weights_backbone, whose default is an ImageNet backbone
    return kwargs


def _build(architecture: Mapping[str, Any], where: str = "architecture") -> nn.Module:
    """The unpruned network described by ``architecture``; ``where`` (the file) prefixes errors."""
    if not isinstance(architecture, Mapping) or not isinstance(architecture.get("_target_"), str):
        raise ValueError(f"{where}: 'architecture' must be a mapping with a '_target_' string, or None")
    target = architecture["_target_"]
    if not any(target.startswith(prefix) for prefix in ALLOWED_TARGETS):
        raise ValueError(
            f"{where}: architecture target {target!r} is not in {ALLOWED_TARGETS}; build the model yourself and pass model="
        )
    module_path, _, attr = target.rpartition(".")
    if any(not part or part.startswith("_") for part in target.split(".")):
        raise ValueError(f"{where}: architecture target {target!r} names a private or empty path; it must be a public "
                         "model class or builder")
    try:
        module = importlib.import_module(module_path)
    except ImportError as error:
        raise ValueError(f"{where}: architecture target {target!r}: cannot import {module_path!r} ({error})") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{where}: architecture target {target!r} does not name a callable")
    # A name re-exported from elsewhere (torch.hub functions, functools.partial, ...) is not a model builder.
    home = getattr(factory, "__module__", None) or ""
    if not any(home == prefix[:-1] or home.startswith(prefix) for prefix in ALLOWED_TARGETS):
        raise ValueError(
            f"{where}: architecture target {target!r} is defined in {home!r}, not in {ALLOWED_TARGETS}; build the model "
            "yourself and pass model="
        )
    kwargs = _without_pretrained(factory, {k: v for k, v in architecture.items() if k != "_target_"}, where)
    try:
        model = factory(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: cannot build the architecture {target!r}: {error}") from error
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: architecture target {target!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _check_payload(payload: Any, where: str) -> None:
    """The layout of a lightning-prune file (see the module docstring); ValueError naming ``where``."""
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise ValueError(
            f"cannot read {where}: it is not a lightning-prune file (no 'format': {FORMAT!r} entry); write one with "
            "lightning_prune.save_pruned"
        )
    if payload.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{where}: unsupported lightning-prune file version {payload.get('version')!r} (this reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))})")
    state = payload.get("state_dict")
    if not isinstance(state, Mapping):
        raise ValueError(f"{where}: 'state_dict' must be a mapping of names to tensors, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}: 'state_dict' keys must be strings, got {key!r}")
        if not isinstance(value, torch.Tensor) and not key.endswith("_extra_state"):
            raise ValueError(f"{where}: 'state_dict'[{key!r}] must be a tensor, got {type(value).__name__}")
    history = payload.get("history")
    if history is not None and not isinstance(history, Mapping):
        raise ValueError(f"{where}: 'history' must be a pruning history (a mapping) or None, got {type(history).__name__}")
    architecture = payload.get("architecture")
    if architecture is not None and (
        not isinstance(architecture, Mapping) or not isinstance(architecture.get("_target_"), str)
    ):
        raise ValueError(f"{where}: 'architecture' must be a mapping with a '_target_' string, or None")
    _check_decompositions(payload.get("decompositions", []), history, where)
    _check_inference(payload.get("inference"), where)


def _check_inference(record: Any, where: str) -> None:
    """The ``inference`` entry: ``None`` or ``{"folded": [[layer, batch norm], ...]}``."""
    if record is None:
        return
    if not isinstance(record, Mapping) or set(record) != {"folded"} or not isinstance(record["folded"], (list, tuple)):
        raise ValueError(f"{where}: 'inference' must be a mapping {{'folded': [[layer, batch norm], ...]}} or None, "
                         f"got {record!r}")
    for i, pair in enumerate(record["folded"]):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(n, str) and n for n in pair):
            raise ValueError(f"{where}: 'inference'['folded'][{i}] must be a [layer, batch norm] pair of module "
                             f"names, got {pair!r}")


def _check_decompositions(steps: Any, history: Mapping[str, Any] | None, where: str) -> None:
    """The ``decompositions`` entry: a list of plain-data steps in replay order."""
    if not isinstance(steps, (list, tuple)):
        raise ValueError(f"{where}: 'decompositions' must be a list of decomposition steps, got {type(steps).__name__}")
    recorded = history.get("steps") if history is not None else None
    pruned = len(recorded) if isinstance(recorded, (list, tuple)) else 0
    previous = 0
    for i, step in enumerate(steps):
        at = f"{where}: 'decompositions'[{i}]"
        if not isinstance(step, Mapping) or set(step) != {"kind", "layer", "ranks", "after_steps"}:
            raise ValueError(f"{at} must be a mapping with exactly 'kind', 'layer', 'ranks' and 'after_steps', got {step!r}")
        if step["kind"] not in DECOMPOSITION_KINDS:
            raise ValueError(f"{at}: 'kind' must be one of {DECOMPOSITION_KINDS}, got {step['kind']!r}")
        if not isinstance(step["layer"], str) or not step["layer"]:
            raise ValueError(f"{at}: 'layer' must be a layer name, got {step['layer']!r}")
        ranks = step["ranks"]
        if (not isinstance(ranks, (list, tuple)) or len(ranks) != DECOMPOSITION_KINDS.index(step["kind"]) + 1
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks)):
            raise ValueError(f"{at}: 'ranks' of {step['kind']} must be {DECOMPOSITION_KINDS.index(step['kind']) + 1} "
                             f"positive int(s), got {ranks!r}")
        after = step["after_steps"]
        if not isinstance(after, int) or isinstance(after, bool) or not previous <= after <= pruned:
            raise ValueError(f"{at}: 'after_steps' must be an int from {previous} (the previous step's) to {pruned} "
                             f"(the pruning history's steps), got {after!r}")
        previous = after


def _rebuild(model: nn.Module, payload: Mapping[str, Any], where: str) -> None:
    """Replay the structural steps of ``payload`` onto the fresh ``model``, in their order."""
    history = payload.get("history")
    steps = list(history.get("steps") or []) if history is not None else []
    replayed_all = False

    def prune(count: int) -> None:
        nonlocal replayed_all
        # Biases that folding created belong to the network as exported, after all its pruning steps.
        part = history if count == len(steps) else {k: v for k, v in history.items() if k != "created_biases"} | {
            "steps": steps[:count]}
        try:
            replay(model, part)
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as error:
            raise ValueError(f"{where}: its pruning history does not apply to {type(model).__name__}: {error}") from error
        replayed_all = count == len(steps)

    done = 0
    for i, step in enumerate(payload.get("decompositions") or []):
        if history is not None and step["after_steps"] > done:
            prune(step["after_steps"])
            done = step["after_steps"]
        try:
            replay_decomposition(model, step, where=f"{where}: decomposition {i} ({step['kind']} of {step['layer']!r})")
        except (TypeError, RuntimeError, AttributeError) as error:
            raise ValueError(f"{where}: decomposition {i} does not apply to {type(model).__name__}: {error}") from error
    if history is not None and not replayed_all:
        prune(len(steps))


def load_pruned(
    path: str | os.PathLike, *, model: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load a file written by :func:`save_pruned` (with ``torch.load(weights_only=True)``): the
    network is built, its structural steps (channel pruning, decompositions) are replayed, the
    batch norms of an inference export are folded (see :mod:`lightning_prune.core.inference`) and
    the saved weights are loaded.

    Args:
        model: a fresh, unpruned instance of the architecture; built from the recorded
            ``architecture`` when ``None`` (never with pretrained weights, never downloading).

    Returns:
        The compressed network with the saved weights, in eval mode.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming the file, when it is not a readable lightning-prune file, when its
            content does not have the documented layout, when its architecture is not allowed
            or asks for pretrained weights, or when its history, decompositions or weights do not
            fit the model.
    """
    where = os.fspath(path)
    payload = read_torch_file(path, "a lightning-prune file", prefix="load_pruned: ", map_location=map_location)
    _check_payload(payload, where)
    if model is None:
        if payload.get("architecture") is None:
            raise ValueError(f"{where!r} records no architecture; pass model= a fresh instance of the network")
        model = _build(payload["architecture"], where)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
    _rebuild(model, payload, where)
    if payload.get("inference") is not None:
        try:
            fold_pairs(model, payload["inference"]["folded"])
        except ValueError as error:
            raise ValueError(f"{where}: its folded batch norms do not fit {type(model).__name__}: {error}") from error
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise ValueError(f"{where}: its weights do not fit {type(model).__name__}: {error}") from error
    return model.eval()
