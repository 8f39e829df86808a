"""The layout is the architecture: one folder per layer, imports pointing down, no circles.

Every import in the package is read from the source (module-level and inside functions alike)
and resolved to a typedcoll module; the graph must have no cycle, and no module may import from
a layer above its own (docs/architecture.md has the map).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "typedcoll"

# Lowest first. A module may import from its own layer's package and from lower layers.
LAYERS = [
    {"codecs"},
    {"core"},
    {"transports"},
    {"tensor", "diagnostics"},
    {"_comm_tensors", "_comm_p2p"},  # TypedComm's bases
    {"_comm", "_version"},
    {"executor", "compat", "testing"},
    {"demo"},
    {"cli", "__init__"},
    {"__main__"},
]
ISOLATED = {"lint"}  # imports nothing of ours


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_only(tree: ast.Module) -> Set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:``: annotations, never executed."""
    skipped: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            skipped.update(id(n) for n in ast.walk(node))
    return skipped


def imports_of(path: Path) -> Set[str]:
    """Every typedcoll module ``path`` imports at run time, wherever the statement sits."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("typedcoll"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("typedcoll"):
                continue
            for alias in node.names:  # "from . import x" may name a module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES or candidate in EXTENSIONS
                          else target)
    return {m for m in found if m != name}


MODULES: Dict[str, Path] = {module_name(p): p for p in PACKAGE.rglob("*.py")}
# C extensions (core/_speedups.c, codecs/_ints.c) import nothing of ours: edges to them end there.
EXTENSIONS: Set[str] = {module_name(p) for p in PACKAGE.rglob("*.c")}


def resolve(name: str) -> str:
    """The module a name refers to (a package resolves to its __init__; "" for a C extension)."""
    if name in EXTENSIONS:
        return ""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def graph() -> Dict[str, Set[str]]:
    return {m: {resolve(t) for t in imports_of(p)} - {m, ""} for m, p in MODULES.items()}


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if top(module) in names:
            return i
    raise AssertionError(f"{module}: in no layer of tests/test_layout.py")


def test_no_import_circles():
    edges = graph()
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert cycles == []


def test_imports_point_down():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            if top(module) in ISOLATED or top(target) in ISOLATED:
                if top(module) != top(target) and top(module) in ISOLATED:
                    wrong.append(f"{module} -> {target} (lint imports nothing of ours)")
                continue
            same_package = top(module) == top(target)
            if layer(target) > layer(module) or (layer(target) == layer(module)
                                                 and not same_package):
                wrong.append(f"{module} -> {target}")
    assert sorted(wrong) == []


def test_the_distribution_and_the_package_give_one_version():
    """``pip show typedcoll`` and ``typedcoll --version`` must agree (pyproject.toml and
    _version.py each hold the number)."""
    from importlib.metadata import version

    import typedcoll
    assert version("typedcoll") == typedcoll.__version__
