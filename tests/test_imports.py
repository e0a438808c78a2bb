"""The import boundaries of docs/architecture.md ("Module map"), read from the source with `ast` (nothing is
imported, so torch and Celery stay out of this test).

The graph. Its nodes are the modules of `app/` and `workers/` (a package is its `__init__.py`). Module A has an
edge to module B when A's source holds an import statement, anywhere in the file (at the top, inside a function or
a method: a lazy import closes a circle just as well, only later), that names B:
- `import B` (`import a.b.c` names the deepest of `a.b.c`, `a.b`, `a` that is one of the nodes);
- `from B import name` where `B.name` is not a node (a function, class or constant of B, or a name B re-exports);
- `from P import name` where `P.name` is a node: the submodule `P.name` (not P).
Relative imports are resolved against the importing module's package. Not edges: the package above a module (its
`__init__` runs first, but a package re-exporting its own submodules is not a circle unless a submodule in turn
imports a name from the package), imports under `if TYPE_CHECKING:` (never run), imports of a module by itself,
and modules named in strings (`importlib.import_module("...")`, Celery's `include=[...]`).

The rules:
(a) no module of `app/` imports `workers/`, except the CLI (`app/cli.py`, `app/commands/**`): the CLI starts
    workers; the library sends tasks by name (app/dispatch.py);
(b) no cycle: the graph restricted to `app/` and `workers/` has no strongly connected component of more than one
    module;
(c) the library never imports the outer rooms (`app/serve/`, `app/transfer/`, `app/clip_model.py`): they use the
    library; only the CLI (and the rooms themselves) import them.

`python tests/test_imports.py [ROOT]` prints the app->workers edges and the cycles of another tree (e.g. an old
commit unpacked with `git archive COMMIT app workers | tar -x -C DIR`).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "workers")
CLI = ("app.cli", "app.commands")  # the CLI may import workers/ (`reco worker` starts one)
ROOMS = ("app.serve", "app.transfer", "app.clip_model")  # outer rooms: they use the library, never the reverse


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for every module of the packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _type_checking_imports(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:`."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def _deepest(name: str, known) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return None


def edges(root: Path = ROOT) -> dict[str, dict[str, list[int]]]:
    """module -> {imported module: the lines of its imports}, by the rules above."""
    mods = modules(root)
    graph: dict[str, dict[str, int]] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        skip = _type_checking_imports(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        out: dict[str, list[int]] = {}

        def add(target: str | None, line: int) -> None:
            if target is not None and target != mod and line not in out.setdefault(target, []):
                out[target].append(line)

        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(_deepest(alias.name, mods), node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    add(sub if sub in mods else _deepest(source, mods), node.lineno)
        graph[mod] = {t: sorted(lines) for t, lines in sorted(out.items(), key=lambda kv: min(kv[1]))}
    return graph


def _under(mod: str, prefixes) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _is_cli(mod: str) -> bool:
    return _under(mod, CLI)


def library_to_rooms(graph) -> list[str]:
    """`app.x:LINE -> app.serve...` for every import of a room by the library (not the CLI, not a room)."""
    return [f"{mod}:{line} -> {target}" for mod, out in sorted(graph.items())
            if mod.split(".")[0] == "app" and not _is_cli(mod) and not _under(mod, ROOMS)
            for target, lines in out.items() if _under(target, ROOMS) for line in lines]


def library_to_workers(graph) -> list[str]:
    """`app.x:LINE -> workers.y` for every import of workers/ by a module of app/ outside the CLI."""
    return [f"{mod}:{line} -> {target}" for mod, out in sorted(graph.items())
            if mod.split(".")[0] == "app" and not _is_cli(mod)
            for target, lines in out.items() if target.split(".")[0] == "workers" for line in lines]


def cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted, largest first."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []
    counter = [0]

    def visit(v):  # recursive: the graph has ~100 nodes
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(comps, key=lambda c: (-len(c), c))


def describe(graph, comp: list[str]) -> str:
    """One circle through the component's first module, then every import inside the component, with lines."""
    start, members = comp[0], set(comp)
    # shortest path back to start (BFS inside the component)
    prev, frontier, seen = {}, [start], {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    path.reverse()
                    steps = [f"{a}:{graph[a][b][0]}" for a, b in zip(path, path[1:] + [start])]
                    inside = [f"{a}:{','.join(map(str, lines))} -> {b}" for a in comp
                              for b, lines in graph[a].items() if b in members]
                    return " -> ".join(steps + [start]) + "\n    imports inside it: " + "; ".join(inside)
                if w in members and w not in seen:
                    seen.add(w)
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return ", ".join(comp)


def test_the_graph_sees_lazy_and_relative_imports():
    graph = edges()
    assert "app.memory" in graph["app.build"]  # `from .memory import ...` at the top
    assert "app.ingest" in graph["app.build"]  # `from .ingest import run_shard` inside run_in_process
    assert "app.store.base" in graph["app.build"]  # `from .store.base import Storage`
    assert "app.celery_app" not in graph["workers.tasks"] and "workers.celery_app" in graph["workers.tasks"]


def test_the_library_never_imports_workers():
    found = library_to_workers(edges())
    assert not found, "app/ (outside app/cli.py and app/commands/) imports workers/:\n" + "\n".join(found)


def test_the_library_never_imports_the_rooms():
    found = library_to_rooms(edges())
    assert not found, "the library imports serve/transfer/clip_model:\n" + "\n".join(found)


def test_no_import_cycles():
    graph = edges()
    found = [describe(graph, c) for c in cycles(graph)]
    assert not found, "import cycles among app/ and workers/:\n" + "\n".join(found)


if __name__ == "__main__":
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    g = edges(root)
    print(f"{len(g)} modules under {root}")
    print("app -> workers (outside the CLI):")
    for line in library_to_workers(g) or ["none"]:
        print(f"  {line}")
    print("library -> rooms:")
    for line in library_to_rooms(g) or ["none"]:
        print(f"  {line}")
    print("cycles:")
    for c in cycles(g) or [["none"]]:
        print(f"  {describe(g, c) if c != ['none'] else 'none'}")
