"""The package's shape: entry points are leaves that nothing imports."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

from commands import REPO

PACKAGE = REPO / "src" / "crate_lit"


def _imported_modules(path: Path) -> set[str]:
    """Every crate_lit module ``path`` imports, as dotted names (relative imports resolved)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}  # `from . import train`
    return {name for name in found if name.startswith("crate_lit")}


def test_no_module_imports_an_entry_point() -> None:
    scripts = importlib.metadata.distribution("crate-lit").entry_points
    entry_points = {script.module for script in scripts if script.group == "console_scripts"}
    assert entry_points == {"crate_lit.train", "crate_lit.analyze", "crate_lit.bench", "crate_lit.pack"}
    importers = {
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in PACKAGE.rglob("*.py")
        for name in _imported_modules(path) & entry_points
    }
    assert not importers, sorted(importers)
