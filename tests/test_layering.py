"""The layers of the design (imports point down only), checked by parsing every module's
imports with ``ast``: the engine, codec and stores never import the rendezvous, launcher,
CLI or interop layers; the sans-I/O core (engine, codec, endpoints) imports neither the
client nor the server; the server never imports the client; the client imports the server
only inside the code that starts one (``is_master``); the rendezvous never imports the
launcher or the CLI; nothing outside interop imports :mod:`rdzv.interop` at all (it is
imported only when torch is used, and torch's own plug-in discovery imports it); and the
imports run at import time form no cycle."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_python

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "rdzv"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _deferred(node: ast.AST) -> bool:
    """Whether the imports inside ``node`` run later than the module's import."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        return True
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path) -> Iterator[tuple[str, int, bool]]:
    """(imported module, line, at import time) for every import of the module at ``path``;
    imports inside functions and ``if TYPE_CHECKING:`` blocks are not at import time."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))

    def walk(node: ast.AST, eager: bool) -> Iterator[tuple[str, int, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child.lineno, eager
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                yield base, child.lineno, eager
                for alias in child.names:  # `from rdzv import interop` imports rdzv.interop
                    yield f"{base}.{alias.name}", child.lineno, eager
            else:
                yield from walk(child, eager and not _deferred(child))

    yield from walk(tree, True)


def _modules() -> list[tuple[str, Path]]:
    return sorted((_module_name(p), p) for p in PACKAGE.rglob("*.py"))


def _in(module: str, *layers: str) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


UPPER = ("rdzv.rendezvous", "rdzv.launcher", "rdzv.cli", "rdzv.interop")
RULES = [
    # (importer layers, layers they never import, even inside a function)
    (("rdzv.engine", "rdzv.wire", "rdzv.store"), UPPER),
    (("rdzv.engine", "rdzv.wire", "rdzv.errors"), ("rdzv.store", "rdzv.server")),
    (("rdzv.endpoint",), ("rdzv",)),  # below everything: imports nothing of rdzv
    (("rdzv.server",), ("rdzv.store", "rdzv.observe", *UPPER)),
    (("rdzv.rendezvous",), ("rdzv.launcher", "rdzv.cli")),
]


@pytest.mark.parametrize("importers, forbidden", RULES)
def test_imports_point_down(importers: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    found = [
        f"{name}:{line} imports {target}"
        for name, path in _modules()
        if _in(name, *importers)
        for target, line, _ in _imports(path)
        if _in(target, *forbidden)
    ]
    assert found == []


def test_nothing_outside_interop_imports_it() -> None:
    found = [
        f"{name}:{line} imports {target}"
        for name, path in _modules()
        if not _in(name, "rdzv.interop")
        for target, line, _ in _imports(path)
        if _in(target, "rdzv.interop")
    ]
    assert found == []


def test_the_checker_sees_imports() -> None:
    """The parser finds a known lazy and a known eager import (so the rules above can fail)."""
    imports = set(_imports(PACKAGE / "interop" / "torch.py"))
    assert any(t == "rdzv.rendezvous.registry" and not eager for t, _, eager in imports)
    assert any(t == "rdzv.rendezvous.api" and eager for t, _, eager in imports)


def test_the_client_imports_the_server_only_to_start_one() -> None:
    """TCPStore / AsyncTCPStore import :mod:`rdzv.server` inside the code that starts a
    master's server, never at import time; no other store module imports it."""
    found = [
        (name, line, eager)
        for name, path in _modules()
        if _in(name, "rdzv.store")
        for target, line, eager in _imports(path)
        if _in(target, "rdzv.server")
    ]
    assert {name for name, _, _ in found} == {"rdzv.store.tcp", "rdzv.store.async_tcp"}
    assert [f"{name}:{line}" for name, line, eager in found if eager] == []


def test_a_client_process_does_not_load_the_server() -> None:
    """At run time too: importing and using the TCP clients loads no ``rdzv.server`` module
    (only starting a master does)."""
    code = (
        "import sys, rdzv, rdzv.store.tcp, rdzv.store.async_tcp\n"
        "rdzv.TCPStore, rdzv.AsyncTCPStore\n"
        "print(sorted(m for m in sys.modules if m.startswith('rdzv.server')))"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _eager_graph() -> dict[str, set[str]]:
    """Module -> the rdzv modules it imports at import time (a submodule importing its own
    package is left out: the package is being initialised already)."""
    modules = dict(_modules())
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, set())
        for target, _, eager in _imports(path):
            while target and target not in modules:  # `from m import function` -> m
                target = target.rpartition(".")[0]
            if eager and target and target != name and not name.startswith(target + "."):
                edges.add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
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
                    work.append((child, iter(sorted(graph.get(child, ())))))
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


def test_no_import_cycles() -> None:
    assert _cycles(_eager_graph()) == []


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
