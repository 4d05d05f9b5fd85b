"""Fixtures shared by every test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tls_pki import Pki, make_pki

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, the node's server certificate, a client certificate it signed, a rogue one (tests/tls_pki.py)."""
    return make_pki(tmp_path_factory.mktemp("pki"))
