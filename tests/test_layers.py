"""The layers import downwards only: base <- storage, profiles, routing, models <- node.

Parsed from the source (every ``import`` and ``from ... import``, also those
inside functions), so a late import cannot hide a dependency.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: source folder -> the package it installs as (pyproject.toml's package-dir)
FOLDERS = {"base": "segnode", "storage": "segnode.storage", "profiles": "segnode.profiles",
           "routing": "segnode.routing", "models": "segnode.models", "node": "segnode.node"}
BASE_MODULES = {f"segnode.{p.stem}" for p in (REPO / "base").glob("*.py") if p.stem != "__init__"}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    parts = path.relative_to(REPO).with_suffix("").parts
    package = ".".join((FOLDERS[parts[0]], *parts[1:-1]))  # the package holding the module
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                names.add(f"{parent}.{node.module}" if node.module else parent)
            else:
                names.add(node.module or "")
    return names


def sources(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def ours(name: str) -> bool:
    return name == "segnode" or name.startswith("segnode.")


@pytest.mark.parametrize("folder", ["storage", "profiles", "routing", "models"])
def test_lower_layers_never_import_the_node(folder: str) -> None:
    offenders = {f"{path.relative_to(REPO)} imports {name}"
                 for path in sources(folder) for name in imported_modules(path)
                 if name == "segnode.node" or name.startswith("segnode.node.")}
    assert not offenders, sorted(offenders)


def test_base_imports_nothing_of_ours_but_itself() -> None:
    offenders = {f"{path.relative_to(REPO)} imports {name}"
                 for path in sources("base") for name in imported_modules(path)
                 if ours(name) and name not in BASE_MODULES | {"segnode"}}
    assert not offenders, sorted(offenders)


def test_no_module_imports_the_old_top_level_names() -> None:
    """``node``, ``models``, ... are not importable once installed; only ``segnode.*`` is."""
    old = {"node", "models", "storage", "routing", "profiles", "base"}
    offenders = {f"{path.relative_to(REPO)} imports {name}"
                 for folder in FOLDERS for path in sources(folder) for name in imported_modules(path)
                 if name.split(".")[0] in old}
    assert not offenders, sorted(offenders)


def test_the_check_sees_a_forbidden_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parser finds late and relative imports (so the tests above can fail)."""
    folder = tmp_path / "storage"
    folder.mkdir()
    module = folder / "bad.py"
    module.write_text("def f():\n    from segnode.node.config import load_config\n"
                      "from ..node import service\nimport segnode.errors\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert imported_modules(module) == {"segnode.node.config", "segnode.node", "segnode.errors"}
