"""The shape of the package (docs/architecture.md), checked from the source tree.

- no module under ``nccli/`` over 600 lines, no function over 80;
- ``h5py`` is imported only under ``nccli/io/``;
- the storage and numerics layers (``nccli/io/``, ``nccli/stats.py``, ``nccli/metrics/``)
  never import the extraction, the CLI, the use cases or the package face;
- the module import graph has no cycles.

These read the code with :mod:`ast`; nothing is imported, so they take milliseconds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "nccli"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
#: layers that must stay below extract / cli / the use cases
LOW_LAYERS = ("nccli.io", "nccli.stats", "nccli.metrics")
FORBIDDEN_FOR_LOW = (
    "nccli.extract",
    "nccli.cli",
    "nccli.compare",
    "nccli.measure",
    "nccli.theory",
    "nccli.report",
    "nccli.track",
)
#: storage does not compute metrics, and numerics do not read files
FORBIDDEN_PAIRS = {
    "nccli.io": ("nccli.metrics",),
    "nccli.metrics": ("nccli.io",),
    "nccli.stats": ("nccli.io", "nccli.metrics"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """Modules of ``nccli`` that ``name`` imports (absolute and relative, any depth)."""
    tree = ast.parse(MODULES[name].read_text())
    base = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                root = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{root}.{node.module}" if node.module else root
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES]
            found.update(subs)  # `from nccli.io import cache` imports the module only
            if len(subs) < len(node.names):
                found.add(mod)
    return {m for m in found if m == "nccli" or m.startswith("nccli.")}


def test_module_sizes() -> None:
    big = {
        n: len(p.read_text().splitlines())
        for n, p in MODULES.items()
        if len(p.read_text().splitlines()) > MAX_MODULE_LINES
    }
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_function_sizes() -> None:
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_h5py_only_in_io() -> None:
    outside = []
    for name, path in MODULES.items():
        if name.startswith("nccli.io"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "h5py" or n.startswith("h5py.") for n in names):
                outside.append(name)
    assert not outside, f"h5py imported outside nccli/io: {sorted(set(outside))}"


@pytest.mark.parametrize("low", LOW_LAYERS)
def test_low_layers_import_nothing_above(low: str) -> None:
    bad = []
    for name in MODULES:
        if name != low and not name.startswith(low + "."):
            continue
        for dep in _imports(name):
            banned = FORBIDDEN_FOR_LOW + FORBIDDEN_PAIRS.get(low, ())
            if dep == "nccli" or any(dep == f or dep.startswith(f + ".") for f in banned):
                bad.append(f"{name} -> {dep}")
    assert not bad, f"{low} imports from above it: {bad}"


def test_no_import_cycles() -> None:
    graph = {n: {d for d in _imports(n) if d in MODULES and d != n} for n in MODULES}
    # importing a submodule runs its package's __init__ first; that edge is implicit, and a
    # package importing its own submodules is how packages are built: not a cycle
    for n in graph:
        graph[n] = {d for d in graph[n] if not (n.startswith(d + ".") and _is_package(d))}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])
