"""Organ profiles: the seven built-ins load; bad ones fail with file, line, key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from segnode.errors import ConfigError
from segnode.node.cli.main import main
from segnode.profiles import Backend, load_all, load_profile, load_profile_file

GOOD = """\
organ: {organ}
description: test
model_type: hu_based
tissues:
  - name: lung_left
    description: Left lung
    color: [1, 2, 3]
    codes_from: lung_upper_lobe_left
options:
  hu_based: {{method: lungs}}
"""


def test_seven_builtin_profiles() -> None:
    profiles = load_all()
    assert set(profiles) >= {"brain", "lungs", "liver", "kidneys", "spleen", "heart", "bone"}
    assert [t.name for t in profiles["brain"].tissues] == ["brain", "shell"]
    assert [t.name for t in profiles["kidneys"].tissues] == ["kidney_left", "kidney_right"]
    kidney_left = profiles["kidneys"].tissues[0]
    assert kidney_left.type.value == "64033007" and kidney_left.modifier.meaning == "Left"


def test_codes_from_fills_codes_and_keeps_explicit_colour(tmp_path: Path) -> None:
    path = tmp_path / "lungs.yaml"
    path.write_text(GOOD.format(organ="lungs"))
    profile = load_profile_file(path)
    tissue = profile.tissues[0]
    assert tissue.color == (1, 2, 3)
    assert tissue.type.meaning == "Upper lobe of lung" and tissue.modifier.value == "7771000"
    assert profile.model_type is Backend.HU_BASED


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        (("description: test", "description: test\ncolour: red"), r"lungs\.yaml:\d+: colour: Extra inputs are not permitted"),
        (("[1, 2, 3]", "[1, 2, 300]"), r"lungs\.yaml:7: tissues\[0\]\.color\[2\]: Input should be less than or equal to 255"),
        (("model_type: hu_based", "model_type: magic"), r"lungs\.yaml:3: model_type: Input should be 'hu_based'"),
        (("    codes_from: lung_upper_lobe_left\n", ""), r"lungs\.yaml:1: .*no SNOMED category/type codes"),
        (("codes_from: lung_upper_lobe_left", "codes_from: lung_nowhere"), r"unknown TotalSegmentator structure 'lung_nowhere'"),
        (("organ: lungs", "organ: liver"), r"must match the file name"),
        (("  hu_based: {method: lungs}", "  hu_based: {}"), r"options\.hu_based\.method: Field required"),
        (("tissues:", "tissues: ["), r"invalid YAML"),
    ],
)
def test_bad_profiles_name_file_line_key_and_reason(tmp_path: Path, replace: tuple[str, str], expected: str) -> None:
    path = tmp_path / "lungs.yaml"
    path.write_text(GOOD.format(organ="lungs").replace(*replace))
    with pytest.raises(ConfigError, match=expected):
        load_profile_file(path)


def test_unknown_profile_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="unknown profile 'pancreas'; available: .*lungs"):
        load_profile("pancreas")


def test_cli_profiles_list_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles", "list"]) == 0
    listing = capsys.readouterr().out
    assert "kidneys" in listing and "kidney_left, kidney_right" in listing
    assert main(["profiles", "show", "lungs"]) == 0
    shown = capsys.readouterr().out
    assert "meaning: Left" in shown and "organ: lungs" in shown
    assert main(["profiles", "show", "nope"]) == 2
    assert "unknown profile" in capsys.readouterr().err
