"""The layout's rules, read from the modules' own imports: the core (``pipeline/*.py``,
``pipeline/models``) imports neither program, the restore job never imports training, and no
modules import each other in a circle. A change that breaks one fails here."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

PIPELINE = REPO / "pipeline"


def _module(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Each module under ``pipeline/`` -> the ``pipeline`` modules it imports, anywhere in it
    (a function's import counts: it runs too)."""
    modules = {_module(p, root): p for p in (root / "pipeline").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:  # `from pipeline.restore import ledger` names a module
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if sub in modules else node.module)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("restore", "training") else "core"


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph`` (one path around each strongly connected component)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_core_imports_neither_program_and_restore_never_imports_training():
    graph = import_graph()
    wrong = [(m, i) for m, imports in graph.items() for i in imports
             if (layer(m), layer(i)) in {("core", "restore"), ("core", "training"),
                                         ("restore", "training")}]
    assert wrong == []
    assert {layer(m) for m in graph} == {"core", "restore", "training"}


def test_no_modules_import_each_other_in_a_circle():
    assert circles(import_graph()) == []


def test_the_checks_catch_what_they_look_for():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("pipeline.restore.run") == "restore" and layer("pipeline.storage") == "core"
    assert layer("pipeline.training.trainer") == "training"


def test_infra_holds_deployment_only():
    assert not list((REPO / "infra").rglob("*.py"))
