"""The layers of the design (imports point down only), checked by parsing every module's
imports with ``ast``: the engine, codec and stores never import the rendezvous, launcher,
CLI or interop layers; the rendezvous never imports the launcher or the CLI; and nothing
outside interop imports :mod:`rdzv.interop` at all (it is imported only when torch is used,
and torch's own plug-in discovery imports it)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

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
