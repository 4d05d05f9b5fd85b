"""Where the tests' own files are, for test modules in any folder below tests/."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DATA = TESTS / "data"
ARTIFACTS = TESTS / "artifacts"
