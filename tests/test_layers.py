"""The package's layers point down (docs: the module map in the README and DESIGN): a module imports
only from its own layer or below, and no modules import each other in a cycle, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "ternchat"
# From the bottom up; the top-level name of each module under ternchat/ (a folder or a file).
LAYERS = (
    ("config", "paths", "__init__"),
    ("data", "model"),
    ("verify", "eval", "export"),
    ("optim",),
    ("train",),
    ("runs", "plan", "evaluation", "speedrun"),
    ("bench",),
    ("cli", "__main__"),
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    top = top.removesuffix(".py")
    for level, names in enumerate(LAYERS):
        if top in names:
            return level
    raise AssertionError(f"{module} is in no layer of LAYERS: add its top-level name there")


def import_graph() -> dict[str, set[str]]:
    """Each ternchat module and the ternchat modules it imports, at any depth of its code."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                            for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_imports_only_point_down():
    graph = import_graph()
    climbing = sorted(f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
                      for m, targets in graph.items() for t in targets if _layer(t) > _layer(m))
    assert not climbing, "imports that climb:\n" + "\n".join(climbing)


def test_no_import_cycles():
    assert not cycles(import_graph())


def test_the_checks_see_a_climb_and_a_cycle():
    graph = {"ternchat.data.a": {"ternchat.train.b"}, "ternchat.train.b": {"ternchat.data.a"}, "ternchat.cli": set()}
    assert cycles(graph) == [["ternchat.data.a", "ternchat.train.b"]]
    assert _layer("ternchat.train.b") > _layer("ternchat.data.a")
    assert cycles({"ternchat.x": {"ternchat.y"}, "ternchat.y": set()}) == []
