"""The packages' imports form a DAG (read from the source: nothing is imported or run).

Every ``import`` counts, at module level or inside a function: an import deferred into a
function body to dodge a cycle is still a cycle in the design. ``from pkg import x`` is an
edge to the package ``pkg`` (its ``__init__``: ``x`` is read from its namespace) and, when
``x`` is a submodule, to ``pkg.x`` as well; ``import pkg.x [as y]`` is an edge to
``pkg.x``. So a package whose ``__init__`` re-exports a submodule (``deepseek_jax`` serves
``from_pretrained``) closes a cycle as soon as anything that submodule imports reaches the
package by ``from pkg import ...``: inside the packages, write ``import pkg.x as x`` or
``from pkg.x import name``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("deepseek_jax", "pallas_kernels", "cpu_kernels")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _targets(node: ast.AST, module: str, is_pkg: bool, known: set[str]) -> list[str]:
    """The known modules one import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: resolve against the importing module's package
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        src = ".".join(base + ([node.module] if node.module else []))
    else:
        src = node.module or ""
    subs = [f"{src}.{a.name}" for a in node.names if f"{src}.{a.name}" in known]
    return subs + ([src] if src in known else [])


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        edges = {t for node in ast.walk(tree) for t in _targets(node, name, is_pkg, known)}
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (iterative DFS, three colours)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
            elif state.get(child) == 1:
                path = [n for n, _ in stack]
                return path[path.index(child) :] + [child]
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def test_the_walker_sees_imports_and_finds_a_planted_cycle():
    graph = import_graph()
    assert "deepseek_jax.fp8_gemm" in graph["deepseek_jax.fp8_vjp"]
    assert "cpu_kernels.build" in graph["cpu_kernels.attention"]
    assert "deepseek_jax.interop.pretrained" in graph["deepseek_jax"]  # lazy, still an edge
    known = set(graph) | {"p", "p.m"}
    from_pkg = ast.parse("from p import m").body[0]
    assert sorted(_targets(from_pkg, "q", False, known)) == ["p", "p.m"]
    assert _targets(ast.parse("import p.m as m").body[0], "q", False, known) == ["p.m"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_form_a_dag():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
