"""A command group's options mean the same before and after its verb (``segnode models --weights-dir W import X``
and ``segnode models import X --weights-dir W``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from segnode.node.cli.main import build_parser, main

from tests.dl_fixtures import COMMITTED

CASES = [
    (["models"], ["list"], "--weights-dir", "weights_dir"),
    (["models"], ["import", "x.zip"], "--weights-dir", "weights_dir"),
    (["models"], ["compare", "a", "b", "--dataset", "D@1"], "--weights-dir", "weights_dir"),
    (["dataset"], ["freeze", "Liver"], "--store", "store"),
    (["dataset"], ["add", "in", "--dataset", "Liver"], "--secret-file", "secret_file"),
    (["jobs"], ["show", "3"], "--config", "config"),
    (["jobs"], ["list"], "--state-dir", "state_dir"),
]


@pytest.mark.parametrize(("group", "verb", "flag", "dest"), CASES)
def test_group_option_before_or_after_the_verb(group: list[str], verb: list[str], flag: str, dest: str) -> None:
    parser = build_parser()
    before = parser.parse_args([*group, flag, "/somewhere", *verb])
    after = parser.parse_args([*group, *verb, flag, "/somewhere"])
    neither = parser.parse_args([*group, *verb])
    assert getattr(before, dest) == getattr(after, dest) == Path("/somewhere")
    assert getattr(neither, dest) is None


def test_models_import_with_the_weights_dir_after_the_verb(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = COMMITTED / "monai_tiny.ts"
    root = tmp_path / "weights"
    assert main(["models", "import", str(model), "--name", "tiny", "--weights-dir", str(root)]) == 0
    assert main(["models", "list", "--weights-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"weights directory: {root}" in out and "monai" in out and "tiny" in out
