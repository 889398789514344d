"""Find import cycles inside a package, counting imports inside functions too (they run as well), and
imports across the layers LAYER_RULES forbids.

    python tools/check_import_cycles.py [PACKAGE_DIR] [--no-allow]

Reads every module of the package with `ast` (nothing is imported or run), draws an edge for each
`import` / `from ... import` of one of the package's own modules wherever it stands (module level,
function, method, `try`; only `if TYPE_CHECKING:` blocks are left out, since they never run), and
prints each group of modules that import one another (a strongly connected component) with one cycle
through it and the line of every import on it. Exits 1 when a cycle remains with the imports named in
ALLOWED_IMPORTS left out, when an entry there no longer closes a cycle (then delete the entry), or when a
module imports across a layer LAYER_RULES forbids (each such import printed with its line).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from dataclasses import dataclass

# Known cycles this branch tolerates: the one import (importer, imported) that closes each, with why.
# A cycle is tolerated only when it disappears with these imports left out.
ALLOWED_IMPORTS: list[tuple[tuple[str, str], str]] = []


# Layers: (importers, exempt importers, imported, why): no module under `importers` (a dotted prefix), except
# those under an exempt prefix, imports a module under `imported`.
LAYER_RULES: list[tuple[str, tuple[str, ...], str, str]] = [
    ("blip2_ray.model", (), "blip2_ray.weights", "the network reads no weights: weights/ depends on model/"),
    ("blip2_ray", ("blip2_ray.fixtures", "blip2_ray.cli"), "blip2_ray.fixtures",
     "fixtures serve the demo, tests and benchmarks (and the make-sample-data command), never the library"),
]


@dataclass(frozen=True)
class Edge:
    """`source` imports `target` at `path`:`line`."""

    source: str
    target: str
    path: str
    line: int


def module_names(package_dir: str) -> dict[str, str]:
    """{dotted module name: file path} for every .py file under `package_dir` (a package: __init__.py)."""
    package_dir = os.path.abspath(package_dir)
    root = os.path.dirname(package_dir)
    out = {}
    for folder, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node that can run (all but those under `if TYPE_CHECKING:`)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_edges(modules: dict[str, str]) -> list[Edge]:
    """The edges between the package's own modules (an import of a package's name counts for the
    package's `__init__`; `from pkg import mod` counts for the module `pkg.mod` when it exists)."""
    edges = []
    for name, path in modules.items():
        is_package = os.path.basename(path) == "__init__.py"
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the importing module's package
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base else alias.name
                    targets.append(sub if sub in modules else base)
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.append(Edge(name, target, path, node.lineno))
    return edges


def cycle_groups(edges: list[Edge]) -> list[list[str]]:
    """Groups of two or more modules that import one another (Tarjan's strongly connected components)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_violations(edges: list[Edge], rules=None) -> list[tuple[Edge, str]]:
    """The imports that cross a layer `rules` (default LAYER_RULES) forbids, each with the rule's reason."""
    out = []
    for e in sorted(edges, key=lambda e: (e.path, e.line)):
        for importers, exempt, imported, why in LAYER_RULES if rules is None else rules:
            if (_under(e.source, importers) and _under(e.target, imported)
                    and not any(_under(e.source, x) for x in exempt)):
                out.append((e, why))
    return out


def one_cycle(group: list[str], edges: list[Edge]) -> list[Edge]:
    """A shortest cycle through the group's first module, as the edges that make it."""
    members = set(group)
    first: dict[tuple[str, str], Edge] = {}
    for e in sorted(edges, key=lambda e: (e.path, e.line)):
        if e.source in members and e.target in members:
            first.setdefault((e.source, e.target), e)
    start = group[0]
    paths: dict[str, list[Edge]] = {start: []}
    frontier = [start]
    while frontier:  # breadth first from `start`, back to `start`
        nxt = []
        for v in frontier:
            for (s, t), e in sorted(first.items()):
                if s != v:
                    continue
                if t == start:
                    return paths[v] + [e]
                if t not in paths:
                    paths[t] = paths[v] + [e]
                    nxt.append(t)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in its own group")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("package", nargs="?", default="blip2_ray", help="the package directory")
    p.add_argument("--no-allow", action="store_true", help="tolerate no cycle, not even those ALLOWED_IMPORTS names")
    args = p.parse_args(argv)
    modules = module_names(args.package)
    edges = import_edges(modules)
    groups = cycle_groups(edges)
    allowed = {} if args.no_allow else dict(ALLOWED_IMPORTS)
    remaining = {frozenset(g) for g in cycle_groups([e for e in edges if (e.source, e.target) not in allowed])}
    failed = False
    for group in groups:
        tolerated = not any(r <= set(group) for r in remaining)
        failed |= not tolerated
        closing = [f"{s} -> {t} ({why})" for (s, t), why in allowed.items() if s in group and t in group]
        status = f"allowed: it closes only through {'; '.join(closing)}" if tolerated else "error"
        print(f"import cycle [{status}] among {', '.join(group)}:")
        for e in one_cycle(group, edges):
            print(f"  {os.path.relpath(e.path)}:{e.line}: {e.source} imports {e.target}")
    for (source, target), why in allowed.items():
        if not any(source in g and target in g for g in groups) or not any(
                e.source == source and e.target == target for e in edges):
            failed = True
            print(f"ALLOWED_IMPORTS entry {source} -> {target} ({why}) closes no cycle any more: delete it")
    for e, why in layer_violations(edges):
        failed = True
        print(f"layer [error] {os.path.relpath(e.path)}:{e.line}: {e.source} imports {e.target}: {why}")
    print(f"{len(groups)} import cycle(s) in {len(modules)} modules of {args.package}"
          + (f", {len(remaining)} with the allowed imports left out" if allowed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
