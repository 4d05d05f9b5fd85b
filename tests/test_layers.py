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


# -- wings of the node ------------------------------------------------------------------------
#
# node/ is a hub (service, config, completion, sweep, dispatch policy, review decision, events,
# status table) and one folder per thing the node serves.  ``service`` composes them all and the
# CLI may use any; the others keep to their side (docs/architecture.md, "Wings").

WINGS = ("cli", "dicom_in", "http_in", "ingest", "jobs", "ops", "remote", "sending", "sources", "writers")
ALL_WINGS = frozenset(WINGS)
MODELS = "models"
#: what each part of node/ must not import: wings, "service", and "models" (the models layer)
FORBIDDEN: dict[str, frozenset[str]] = {
    "hub": ALL_WINGS | {"service"},
    "writers": (ALL_WINGS - {"writers"}) | {"service", "hub"},
    "ingest": (ALL_WINGS - {"ingest"}) | {"service", MODELS},
    "dicom_in": (ALL_WINGS - {"dicom_in", "ingest"}) | {"service", MODELS},
    "http_in": (ALL_WINGS - {"http_in", "ingest"}) | {"service", MODELS},
    "sending": (ALL_WINGS - {"sending"}) | {"service", MODELS},
    "sources": (ALL_WINGS - {"sources", "ingest"}) | {"service", MODELS},
    "jobs": frozenset({"cli", "dicom_in", "http_in", "ingest", "sending", "remote", "service"}),
    "remote": frozenset({"cli", "dicom_in", "ingest", "sending", "service"}),
    "ops": frozenset({"cli", "dicom_in", "jobs", "sending", "writers", "service", MODELS}),
    "cli": frozenset(),
    "service": frozenset(),
}


def part_of(module: str) -> str | None:
    """Which part of node/ a ``segnode.node.…`` module belongs to (``models`` for the models layer)."""
    parts = module.split(".")
    if parts[:2] == ["segnode", "models"]:
        return MODELS
    if parts[:2] != ["segnode", "node"] or len(parts) < 3:
        return None
    if parts[2] in WINGS:
        return parts[2]
    return "service" if parts[2] == "service" else "hub"


def wing_offenders(root: Path) -> set[str]:
    offenders = set()
    for path in sorted((root / "node").rglob("*.py")):
        rel = path.relative_to(root / "node").with_suffix("").parts
        own = part_of(".".join(("segnode", "node", *rel)))
        assert own is not None
        for name in imported_modules(path):
            other = part_of(name)
            if other is not None and other != own and other in FORBIDDEN[own]:
                offenders.add(f"{path.relative_to(root)} ({own}) imports {name} ({other})")
    return offenders


def test_wings_import_only_what_their_side_may() -> None:
    assert not wing_offenders(REPO), sorted(wing_offenders(REPO))


def test_the_wing_check_sees_a_planted_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that imports the jobs wing, DICOM-in that imports HTTP-in, sending that imports a model."""
    planted = {"writers/bad.py": "from segnode.node.jobs.pipeline import run_pipeline\n",
               "dicom_in/bad.py": "def f():\n    from segnode.node.http_in import stow\n",
               "sending/bad.py": "import segnode.models.nnunet\n",
               "completion.py": "from segnode.node.ops.metrics import NodeMetrics\n",
               "writers/good.py": "from segnode.node.writers.common import EncodedResult\nimport segnode.models.volume\n"}
    for name, text in planted.items():
        (tmp_path / "node" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "node" / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = wing_offenders(tmp_path)
    assert {line.split(" ")[0] for line in found} == {
        "node/writers/bad.py", "node/dicom_in/bad.py", "node/sending/bad.py", "node/completion.py"}
