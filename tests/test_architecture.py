"""The package keeps the shape docs/architecture.md gives it: every module is in the map, and each imports only
modules listed above it (function-level imports included), so the import graph has no cycle and reads bottom-up."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "longrope_search"


def map_order() -> list[str]:
    """The modules in the order docs/architecture.md lists them (`builtin/` as builtin)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    return [name.removesuffix(".py").rstrip("/") for name in re.findall(r"^\| `([a-z_]+(?:\.py|/))` \|", text, re.M)]


def imported(path: Path) -> set[str]:
    """The package modules `path` imports anywhere in it (top level, functions, TYPE_CHECKING blocks)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("longrope_search"):
            parts = node.module.split(".")
            if len(parts) > 1:
                names.add(parts[1])
            else:
                names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("longrope_search."))
    return names


def test_every_module_is_in_the_map_once():
    order = map_order()
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"} | {"builtin"}
    assert len(order) == len(set(order)), [m for m in order if order.count(m) > 1]
    assert set(order) == modules, (sorted(modules - set(order)), sorted(set(order) - modules))


def test_each_module_imports_only_modules_above_it():
    order = map_order()
    rank = {name: i for i, name in enumerate(order)}
    upward = []
    for name in order:
        path = PACKAGE / f"{name}.py" if name != "builtin" else PACKAGE / "builtin" / "__init__.py"
        upward += [f"{name} imports {other}" for other in sorted(imported(path))
                   if other in rank and rank[other] >= rank[name] and other != name]
    assert upward == []
