"""The package's layers, checked on its source (AST): errors, core <- patch <- {checkpoint, onnx, runtime} <- edit <- cli.

Every import of a package module counts, at module level or inside a function (a lazy import is
still a dependency). A package may import
packages of its own rank or below, never above; the package graph has no cycle; no module imports
itself back through others; the bottom layer imports no torch and nothing above it; no torch._C.
There are no exceptions.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "roselora_export"

# Rank of each top-level package or module: a package imports only ranks <= its own.
RANK = {
    "errors": 0, "core": 0,
    "patch": 1, "method": 1, "models": 1, "signing": 1, "chat": 1,
    "checkpoint": 2, "onnx": 2, "runtime": 2, "devices": 2,
    "edit": 3, "serve": 3,
    "cli": 4,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _imports() -> dict[str, set[str]]:
    """Module -> package modules it imports (anywhere in the file), resolved to existing modules."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[:len(here) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                cands = [f"{mod}.{a.name}" for a in node.names] + [mod]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            for c in cands:
                if c.startswith("roselora_export"):
                    while c and c not in modules:
                        c = c.rpartition(".")[0]
                    if c and c != name:
                        found.add(c)
                        break
        out[name] = found
    return out


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_package_has_a_rank():
    tops = {_top(m) for m in _imports()} - {""}
    assert tops <= set(RANK), f"give these a rank in RANK: {sorted(tops - set(RANK))}"


def test_no_package_imports_a_package_above_it():
    upward = sorted((a, b) for a, bs in _imports().items() for b in bs
                    if _top(a) and _top(b) and RANK[_top(b)] > RANK[_top(a)])
    assert upward == []


def test_the_package_graph_has_no_cycle():
    graph: dict[str, set[str]] = {}
    for a, bs in _imports().items():
        for b in bs:
            if _top(a) and _top(b) and _top(a) != _top(b):
                graph.setdefault(_top(a), set()).add(_top(b))
    assert _cycles(graph) == []


def test_no_module_imports_itself_back():
    graph = {a: {b for b in bs if b != a.rpartition(".")[0]}  # a module may use its own package's lazy __init__
             for a, bs in _imports().items()}
    assert _cycles(graph) == []


def test_the_bottom_layer_imports_neither_torch_nor_anything_above_it():
    """No torch at import time (only core.dtypes.torch_dtype imports it, when called)."""
    for path in (PKG / "core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        top_level = [n for stmt in tree.body if not isinstance(stmt, (ast.FunctionDef, ast.ClassDef))
                     for n in ast.walk(stmt)]
        for node in top_level:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n == "torch" or n.startswith("torch.") for n in names), f"{path.name} imports torch"
    for a, bs in _imports().items():
        if _top(a) in ("core", "errors"):
            assert {_top(b) for b in bs} <= {"core", "errors"}, f"{a} imports {sorted(bs)}"


def test_no_private_torch_api():
    users = {_module_name(p) for p in PKG.rglob("*.py") if "torch._C" in p.read_text()}
    assert users == set()
