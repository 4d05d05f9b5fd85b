"""The type check: mypy on the package ``segnode`` as it installs, with pyproject's ``[tool.mypy]``.

The source folders install under other names (``base/`` is ``segnode``, ``node/`` is
``segnode.node``, ...), so mypy cannot read the repository as it lies. The test builds the
installed tree from symlinks in a temporary folder, following pyproject's
``[tool.setuptools.package-dir]`` (so it stays true when a folder is added or moved), copies
pyproject.toml beside it for the configuration, and runs ``python -m mypy -p segnode`` with the
interpreter running the tests. Any error fails the test with mypy's report.

The cache sits in the repository's (ignored) ``.mypy_cache/``: third-party packages such as
numpy and torch are checked once, not on every run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = REPO / "pyproject.toml"
ROOT_PACKAGE = "segnode"

pytestmark = pytest.mark.typecheck


def package_dirs() -> dict[str, Path]:
    """Package name -> the source folder it installs from (pyproject's package-dir)."""
    config = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    mapping: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    return {package: REPO / folder for package, folder in mapping.items()}


def build_tree(root: Path, dirs: dict[str, Path]) -> None:
    """Lay out under ``root`` the package tree the wheel installs, as symlinks to the sources.

    A package with mapped subpackages becomes a real folder holding links to its folder's
    entries (except those subpackages' names); any other package is one link to its folder.
    """
    for package in sorted(dirs, key=lambda name: name.count(".")):
        target = root.joinpath(*package.split("."))
        target.parent.mkdir(parents=True, exist_ok=True)
        children = {name.rpartition(".")[2] for name in dirs if name.rpartition(".")[0] == package}
        if not children:
            target.symlink_to(dirs[package], target_is_directory=True)
            continue
        target.mkdir()
        for entry in dirs[package].iterdir():
            if entry.name not in children and entry.name != "__pycache__":
                (target / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())


def test_build_tree_follows_the_package_dir(tmp_path: Path) -> None:
    dirs = package_dirs()
    build_tree(tmp_path, dirs)
    for package, folder in dirs.items():
        assert tmp_path.joinpath(*package.split("."), "__init__.py").resolve() == folder / "__init__.py"
    assert (tmp_path / ROOT_PACKAGE / "py.typed").is_file()


def test_mypy_passes_on_the_installed_package(tmp_path: Path) -> None:
    build_tree(tmp_path, package_dirs())
    (tmp_path / "pyproject.toml").write_bytes(PYPROJECT.read_bytes())
    env = {**os.environ, "MYPY_FORCE_COLOR": "0", "PYTHONPATH": ""}
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml",
         "--cache-dir", str(REPO / ".mypy_cache"), "-p", ROOT_PACKAGE],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800,
    )
    if run.returncode != 0:
        pytest.fail(f"mypy exit {run.returncode}:\n{(run.stdout + run.stderr).strip()}", pytrace=False)
