"""No module of the package touches a private part of another library (or of another object), or swaps a class.

Parsed from the source (:mod:`ast`, every module of every folder that
installs as ``segnode.*``), so nothing imported late or reached through an
attribute chain hides:

* ``from pynetdicom... import _x`` / ``from highdicom._x import ...`` /
  ``import pydicom._x``: a private name or module of any library that is not
  the standard library;
* ``x._name`` where ``x`` is not ``self`` or ``cls`` (dunders allowed): a
  private attribute of something else, ``super()._method`` included;
* an assignment to ``__class__`` (``x.__class__ = ...``, ``setattr(x, "__class__", ...)``).

The standard library's few private names with no public spelling are allowed
by name in :data:`ALLOWED`, each with its reason.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: the folders that install as the package (pyproject.toml's package-dir)
FOLDERS = ("base", "storage", "profiles", "routing", "models", "node")
#: private attributes of the standard library that are documented or have no public spelling
ALLOWED = {
    "os._exit",  # documented: exit without cleanup (a forked/spawned child after its work)
    "argparse._SubParsersAction",  # the type add_subparsers() returns; argparse exports no public name for it
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _library_module(module: str) -> bool:
    root = module.split(".")[0]
    return root != "segnode" and root not in sys.stdlib_module_names


def offences(source: str, filename: str = "<module>") -> list[str]:
    """Every private-API touch and ``__class__`` assignment in ``source``, as ``line: what``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        found.extend(f"{node.lineno}: {what}" for what in _offences_of(node))  # type: ignore[attr-defined]
    return sorted(found, key=lambda item: int(item.split(":")[0]))


def _offences_of(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and _library_module(node.module):
        if any(_private(part) for part in node.module.split(".")):
            return [f"imports the private module {node.module}"]
        return [f"imports the private name {node.module}.{a.name}" for a in node.names if _private(a.name)]
    if isinstance(node, ast.Import):
        return [f"imports the private module {a.name}" for a in node.names
                if _library_module(a.name) and any(_private(part) for part in a.name.split("."))]
    if isinstance(node, ast.Attribute):
        return _attribute_offences(node)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" \
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value == "__class__":
        return ["assigns __class__ (setattr)"]
    return []


def _attribute_offences(node: ast.Attribute) -> list[str]:
    out = []
    if node.attr == "__class__" and isinstance(node.ctx, ast.Store):
        out.append(f"assigns {ast.unparse(node)}")
    if _private(node.attr):
        owner = node.value
        if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")) and ast.unparse(node) not in ALLOWED:
            out.append(f"touches the private attribute {ast.unparse(node)}")
    return out


def _modules() -> list[Path]:
    return sorted(path for folder in FOLDERS for path in (REPO / folder).rglob("*.py"))


def test_no_module_touches_a_private_api_or_swaps_a_class() -> None:
    found = [f"{path.relative_to(REPO)}:{offence}" for path in _modules()
             for offence in offences(path.read_text(encoding="utf-8"), str(path))]
    assert found == []


def test_the_scan_reads_every_module_of_the_package() -> None:
    modules = {str(path.relative_to(REPO)) for path in _modules()}
    assert {"node/dicom_in/receiver.py", "node/ingest/store.py", "base/errors.py"} <= modules
    assert not any(path.endswith("dicom_in/scp.py") for path in modules)  # the pynetdicom receiver is gone


PLANTED = '''\
from pynetdicom._globals import STATUS_SUCCESS
from pynetdicom.dimse_primitives import _PrivateThing, C_STORE
from pydicom.uid import UID
import pynetdicom._handlers
import os


class Guarded(Base):
    def recv(self):
        self._deadline = 1.0
        return super()._serve_request(self.x)


def patch(assoc, sock):
    assoc.__class__ = Guarded
    setattr(sock, "__class__", Guarded)
    assoc.dul._run_loop_delay = 0
    assoc.ae._servers.append(sock)
    print(type(assoc).__name__, cls._fine, os._exit)
    from highdicom._standard_utils import get_module_attribute_map
'''


@pytest.mark.parametrize("line, what", [
    (1, "imports the private module pynetdicom._globals"),
    (2, "imports the private name pynetdicom.dimse_primitives._PrivateThing"),
    (4, "imports the private module pynetdicom._handlers"),
    (11, "touches the private attribute super()._serve_request"),
    (15, "assigns assoc.__class__"),
    (16, "assigns __class__ (setattr)"),
    (17, "touches the private attribute assoc.dul._run_loop_delay"),
    (18, "touches the private attribute assoc.ae._servers"),
    (20, "imports the private module highdicom._standard_utils"),
])
def test_the_scan_finds_each_planted_offence(line: int, what: str) -> None:
    assert f"{line}: {what}" in offences(PLANTED)


def test_the_planted_sample_has_nothing_else() -> None:
    """``self._x``, ``cls._x``, dunders, public imports and the allowed ``os._exit`` pass."""
    assert len(offences(PLANTED)) == 9
