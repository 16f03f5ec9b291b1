"""Installing real distributions for entry-point tests: a package directory with a
``<name>-<version>.dist-info`` (METADATA + entry_points.txt) that ``importlib.metadata``
discovers once the directory is on ``sys.path`` / ``PYTHONPATH``. No mocking."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tests.conftest import REPO


def make_distribution(
    root: Path,
    name: str,
    entry_points: dict[str, dict[str, str]],
    modules: dict[str, str] | None = None,
    version: str = "0.1.0",
) -> Path:
    """Write the distribution ``name`` into ``root`` (created if needed) and return ``root``.

    ``entry_points``: group -> {entry point name: "module:object"}; ``modules``: relative
    file path -> Python source.
    """
    root.mkdir(parents=True, exist_ok=True)
    for rel, source in (modules or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
    )
    lines: list[str] = []
    for group, points in entry_points.items():
        lines.append(f"[{group}]")
        lines.extend(f"{ep_name} = {value}" for ep_name, value in points.items())
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines), encoding="utf-8")
    return root


def rdzv_entry_points() -> dict[str, dict[str, str]]:
    """The ``[project.entry-points.*]`` tables of this checkout's pyproject.toml."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    if sys.version_info >= (3, 11):
        import tomllib

        project = tomllib.loads(text)["project"]
        return {g: dict(eps) for g, eps in project.get("entry-points", {}).items()}
    # Python 3.10: the tables are simple `name = "value"` lines.
    tables: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        header = re.fullmatch(r'\[project\.entry-points\."?([^"\]]+)"?\]', line.strip())
        if header:
            current = tables.setdefault(header.group(1), {})
        elif line.startswith("["):
            current = None
        elif current is not None and "=" in line and not line.lstrip().startswith("#"):
            key, value = (part.strip() for part in line.split("=", 1))
            current[key] = value.strip('"')
    return tables
