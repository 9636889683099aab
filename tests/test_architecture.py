"""Architecture rules of the package, checked on its source (``ast``, nothing is imported):

- no import cycle between the modules of ``lightning_prune`` (module-level and function-level
  imports alike, so that a local import cannot hide one);
- the core (``lightning_prune/core/``) never imports Lightning;
- only ``core/trace.py``, ``core/surgery.py`` (and the benchmark's peers, ``bench/methods.py``)
  import Torch-Pruning, and nothing uses a
  private (``_``-prefixed) Torch-Pruning name.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

PACKAGE = "lightning_prune"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
# The builder and surgery are where lightning-prune itself uses Torch-Pruning; the benchmark's
# methods run Torch-Pruning's own pruners as the peers we compare against (public API only).
TORCH_PRUNING_IMPORTERS = {f"{PACKAGE}.core.trace", f"{PACKAGE}.core.surgery", f"{PACKAGE}.bench.methods"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, tuple[Path, ast.Module]]:
    """``{dotted name: (path, parsed source)}`` of every module of the package."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        found[_module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def _imported(module: str, path: Path, tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """Every import anywhere in ``tree`` (module level, functions, ``if TYPE_CHECKING``) as
    ``(absolute module, imported names, line)``; relative imports are resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, [alias.name for alias in node.names], node.lineno))
    return out


def _import_graph() -> dict[str, dict[str, int]]:
    """``{module: {imported package module: line}}``; ``from package import submodule`` is an
    edge to the submodule, ``from module import name`` an edge to the module."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, (path, tree) in modules.items():
        for target, names, line in _imported(name, path, tree):
            targets = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            if len(targets) < len(names) or not names:  # some names are not submodules
                targets.append(target)
            for t in targets:
                if t in modules and t != name:
                    graph[name].setdefault(t, line)
    return graph


def _find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or ``None`` (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_import_graph_sees_the_package() -> None:
    graph = _import_graph()
    assert f"{PACKAGE}.core.trace" in graph and f"{PACKAGE}.core.graph" in graph
    assert f"{PACKAGE}.core.graph" in graph[f"{PACKAGE}.core.trace"]
    # the checker itself finds a cycle when there is one
    assert _find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1}}) is None


def test_no_import_cycle() -> None:
    graph = _import_graph()
    cycle = _find_cycle(graph)
    if cycle is not None:
        steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle: " + "; ".join(steps))


def _imports_anywhere(tree: ast.Module, module: str, path: Path) -> list[tuple[str, int]]:
    return [(target, line) for target, _, line in _imported(module, path, tree)]


LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")


def _in_core(module: str) -> bool:
    return module == f"{PACKAGE}.core" or module.startswith(f"{PACKAGE}.core.")


def test_the_core_never_imports_lightning() -> None:
    modules, graph = _modules(), _import_graph()
    direct = {}  # module -> "path:line imports lightning..."
    for name, (path, tree) in modules.items():
        for target, line in _imports_anywhere(tree, name, path):
            if target.split(".")[0] in LIGHTNING:
                direct.setdefault(name, f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    offenders = [direct[name] for name in modules if _in_core(name) and name in direct]
    assert not offenders, "the core must not import Lightning:\n" + "\n".join(offenders)
    # nor through another module of the package (e.g. the callbacks)
    for name in filter(_in_core, modules):
        seen, stack = {name}, [name]
        while stack:
            for target in graph[stack.pop()]:
                if target not in seen:
                    seen.add(target)
                    stack.append(target)
        assert not seen & direct.keys(), f"{name} imports Lightning through {sorted(seen & direct.keys())}"


def _torch_pruning_aliases(tree: ast.Module) -> set[str]:
    """Local names bound to Torch-Pruning modules or objects (``import torch_pruning as tp``,
    ``from torch_pruning.pruner import function as tpf``)."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch_pruning":
                    aliases.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch_pruning":
            aliases.update(alias.asname or alias.name for alias in node.names)
    return aliases


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# Private attribute names of the Torch-Pruning objects the builder handles (dependency graph,
# nodes, dependencies, groups), e.g. ``DependencyGraph._param_to_name``; computed from the
# installed Torch-Pruning so that a newly used private attribute is caught too.
def _torch_pruning_private_attributes() -> set[str]:
    tp = pytest.importorskip("torch_pruning")
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 1, 4, 4))
    objects: list = [dg]
    for group in dg.get_all_groups():
        objects.append(group)
        for item in group.items:
            objects += [item, item.dep, item.dep.source, item.dep.target]
    names = set()
    for obj in objects:
        names.update(n for n in dir(obj) if _private(n))
        names.update(n for n in vars(obj) if _private(n))
    names -= {"_asdict", "_fields", "_field_defaults", "_make", "_replace"}  # the public namedtuple API
    names -= set(dir(nn.Module))  # torch's own module internals (_modules, _parameters, ...)
    return names


def test_only_the_builder_and_surgery_import_torch_pruning() -> None:
    importers = set()
    for name, (path, tree) in _modules().items():
        if any(target.split(".")[0] == "torch_pruning" for target, _ in _imports_anywhere(tree, name, path)):
            importers.add(name)
    assert importers <= TORCH_PRUNING_IMPORTERS, f"only {sorted(TORCH_PRUNING_IMPORTERS)} may import torch_pruning"
    assert f"{PACKAGE}.core.trace" in importers


def test_no_private_torch_pruning_name_is_used() -> None:
    private_attributes = _torch_pruning_private_attributes()
    assert private_attributes  # e.g. _param_to_name, which the builder used to read
    offenders = []
    for name, (path, tree) in _modules().items():
        where = path.relative_to(ROOT.parent)
        source = path.read_text(encoding="utf-8")
        aliases = _torch_pruning_aliases(tree)
        for node in ast.walk(tree):
            # torch_pruning._helpers, from torch_pruning.ops import _OutputOp, ...
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch_pruning":
                names = (node.module or "").split(".") + [a.name for a in node.names]
                if any(_private(n) for n in names):
                    offenders.append(f"{where}:{node.lineno} imports a private Torch-Pruning name")
            elif isinstance(node, ast.Import):
                parts = [a.name.split(".") for a in node.names]
                if any(p[0] == "torch_pruning" and any(map(_private, p)) for p in parts):
                    offenders.append(f"{where}:{node.lineno} imports a private Torch-Pruning module")
            elif isinstance(node, ast.Attribute):
                chain, base = [node.attr], node.value  # tp.ops._OutputOp: a private name on a Torch-Pruning module
                while isinstance(base, ast.Attribute):
                    chain.append(base.attr)
                    base = base.value
                if isinstance(base, ast.Name) and base.id in aliases and any(map(_private, chain)):
                    offenders.append(f"{where}:{node.lineno} uses {ast.unparse(node)}")
                elif aliases and node.attr in private_attributes:
                    # dg._param_to_name: a private attribute of a Torch-Pruning object. Only the
                    # modules importing torch_pruning handle its objects (the builder returns
                    # plain data), so only they are checked: elsewhere ``self._trace`` is ours.
                    offenders.append(f"{where}:{node.lineno} uses the private Torch-Pruning attribute {node.attr}")
        # and, belt and braces, in the text (comments and strings aside, nothing should match)
        for match in re.finditer(r"\btp[a-z]*\.[A-Za-z_.]*\._[A-Za-z]", source):
            offenders.append(f"{where}:{source.count(chr(10), 0, match.start()) + 1} matches {match.group(0)!r}")
    assert not offenders, "private Torch-Pruning names:\n" + "\n".join(offenders)
