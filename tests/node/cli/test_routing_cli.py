"""``segnode route test`` in-process, and rules reload on SIGHUP via RulesHolder."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from pathlib import Path

import pydicom
import pytest
from segnode.errors import ConfigError
from segnode.node.cli import main as cli
from segnode.routing import RulesHolder, install_sighup

from tests.paths import DATA

HEAD = DATA / "gantry_tilt"
RULES = """\
rules:
  - name: head-ct
    match:
      all:
        - {tag: Modality, equals: CT}
        - {tag: BodyPartExamined, one_of: [HEAD, BRAIN]}
        - {calling_ae: {glob: "ER_CT*"}}
    action: {profile: brain, destinations: ["@sender", pacs_main], harvest: brain_v1}
  - name: chest
    match: {tag: BodyPartExamined, equals: CHEST}
    action: {profile: lungs, backend: totalsegmentator}
"""


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(RULES)
    return path


def test_registered() -> None:
    assert "segnode.node.cli.route" in cli.COMMAND_MODULES


def test_route_test_matches(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["route", "test", "--rules", str(rules), "--calling-ae", "ER_CT2", str(HEAD)])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[0] == f"rules: {rules}"
    assert out[1].startswith(f"{HEAD / 'I210'} (+3 more files of series 1.3.46.670589.33.")
    assert out[2].startswith("  MATCH head-ct: Modality: 'CT' is 'CT' and BodyPartExamined: 'BRAIN'")
    assert out[3] == (
        "  => rule head-ct: profile brain, backend (from profile), "
        "destinations @sender, pacs_main, harvest brain_v1"
    )
    assert len(out) == 4


def test_route_test_explains_earlier_rules(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["route", "test", "--rules", str(rules), str(DATA / "thorax_cta" / "CT0001.dcm")])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[2:] == [
        "  no    head-ct: BodyPartExamined: 'CHEST' is not one of ['HEAD', 'BRAIN']",
        "  MATCH chest: BodyPartExamined: 'CHEST' is 'CHEST'",
        "  => rule chest: profile lungs, backend totalsegmentator, destinations (none), harvest (no)",
    ]


def test_route_test_not_routed(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # default calling AE STORESCU: the head rule fails on its AE condition, no fallback
    rc = cli.main(["route", "test", "--rules", str(rules), str(HEAD / "I210")])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[2:] == [
        "  no    head-ct: calling AE: 'STORESCU' does not match glob 'ER_CT*'",
        "  no    chest: BodyPartExamined: 'BRAIN' is not 'CHEST'",
        "  => not routed",
    ]


def test_route_test_with_node_config(rules: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules.write_text(RULES.replace("profile: brain,", "profile: brain, backend: hu_based,") + (
        "  - name: from-research\n    match: {all: [{sender_host: 10.20.0.0/16}, {called_ae: SEGRES}]}\n"
        "    action: {profile: liver}\n"
        "  - name: fallback\n    fallback: true\n    action: {profile: lungs}\n"))
    config = tmp_path / "node.yaml"
    config.write_text(
        "ae_title: SEGRES\nroutes: routes.yaml\n"
        "destinations:\n  - {name: pacs_main, ae_title: PACS, host: 127.0.0.1, port: 11113}\n"
    )
    rc = cli.main(["route", "test", "--config", str(config), "--host", "10.20.3.4", str(HEAD / "I220")])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[1:] == [
        str(HEAD / "I220"),
        "  no    head-ct: calling AE: 'STORESCU' does not match glob 'ER_CT*'",
        "  no    chest: BodyPartExamined: 'BRAIN' is not 'CHEST'",
        "  MATCH from-research: sender host '10.20.3.4' is in 10.20.0.0/16 and called AE: 'SEGRES' is 'SEGRES'",
        "  => rule from-research: profile liver, backend (from profile), destinations (none), harvest (no)",
    ]
    # the config's destinations are enforced: the rules name one it does not have
    config.write_text("routes: routes.yaml\n")
    rc = cli.main(["route", "test", "--config", str(config), str(HEAD / "I220")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{rules}:8: rules[0].action.destinations[1]: unknown destination 'pacs_main'" in err


def test_route_test_default_rules_and_skips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(HEAD / "I230", tmp_path / "I230")
    (tmp_path / "notes.txt").write_text("not DICOM")
    rc = cli.main(["route", "test", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out == [
        "rules: (built-in default)",
        "skipped 1 files that are not readable as DICOM (-v lists them)",
        str(tmp_path / "I230"),
        "  MATCH fallback: fallback rule",
        "  => rule fallback: profile lungs, backend (from profile), destinations (none), harvest (no)",
    ]


def test_route_test_errors(rules: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["route", "test", "--rules", str(rules), str(tmp_path / "missing")]) == 3
    assert "missing: no such file or folder" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not DICOM")
    assert cli.main(["route", "test", str(tmp_path)]) == 3
    assert "no readable DICOM file found" in capsys.readouterr().err
    rules.write_text(RULES.replace("profile: brain", "profile: brian"))
    assert cli.main(["route", "test", "--rules", str(rules), str(HEAD)]) == 2
    assert f"{rules}:8: rules[0].action.profile: unknown profile 'brian'" in capsys.readouterr().err


@pytest.fixture
def sighup_holder(rules: Path):
    holder = RulesHolder(rules, profiles={"brain", "lungs", "liver"}, destinations={"pacs_main"})
    previous = install_sighup(holder)
    try:
        yield holder
    finally:
        signal.signal(signal.SIGHUP, previous)


def _decide(rules, ds) -> str | None:
    decision = rules.evaluate(ds, calling_ae="ER_CT1", called_ae="SEGNODE", sender_host="127.0.0.1")
    return decision and decision.profile


def test_sighup_reloads(sighup_holder: RulesHolder, rules: Path) -> None:
    head = pydicom.dcmread(HEAD / "I210", stop_before_pixels=True)
    in_flight = sighup_holder.current  # what an association in progress holds
    assert _decide(in_flight, head) == "brain"
    rules.write_text(RULES.replace("profile: brain", "profile: liver"))
    os.kill(os.getpid(), signal.SIGHUP)
    assert _decide(sighup_holder.current, head) == "liver"
    assert _decide(in_flight, head) == "brain"  # the old rules are untouched


def test_sighup_keeps_old_rules_on_error(
    sighup_holder: RulesHolder, rules: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = sighup_holder.current
    rules.write_text(RULES.replace("BodyPartExamined, one_of", "BodyPart, one_of"))
    with caplog.at_level(logging.ERROR, logger="segnode.routing"):
        os.kill(os.getpid(), signal.SIGHUP)
    assert sighup_holder.current is before
    assert f"keeping the previous ones: {rules}:6: rules[0].match.all[1].tag: unknown DICOM keyword" in caplog.text
    assert sighup_holder.reload() is False
    rules.write_text(RULES)
    assert sighup_holder.reload() is True
    assert sighup_holder.current is not before


def test_holder_fails_at_start_and_defaults(rules: Path) -> None:
    rules.write_text("rules:\n  - name: x\n")
    with pytest.raises(ConfigError, match=r"routes.yaml:2: rules\[0\].action: Field required"):
        RulesHolder(rules)
    holder = RulesHolder(None)
    assert holder.current.rules[0].action.profile == "lungs"
    assert holder.reload() is True


def test_reload_while_evaluating(rules: Path) -> None:
    holder = RulesHolder(rules)
    head = pydicom.dcmread(HEAD / "I210", stop_before_pixels=True)
    seen: set[str | None] = set()
    stop = threading.Event()

    def evaluate() -> None:
        while not stop.is_set():
            seen.add(_decide(holder.current, head))

    reader = threading.Thread(target=evaluate)
    reader.start()
    try:
        for i in range(20):
            rules.write_text(RULES.replace("profile: brain", f"profile: {'liver' if i % 2 else 'brain'}"))
            assert holder.reload()
    finally:
        stop.set()
        reader.join()
    assert seen <= {"brain", "liver"} and seen


def test_route_test_on_a_study_folder_shows_completion_and_selection(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from tests.study_fixtures import build_study

    study = build_study(tmp_path / "study")
    routes = tmp_path / "routes.yaml"
    routes.write_text("rules:\n- name: chest\n  fallback: true\n  action:\n"
                      "    profiles: [liver, spleen, kidneys]\n    select: {prefer: [thinnest]}\n")
    assert cli.main(["route", "test", "--rules", str(routes), str(tmp_path / "study")]) == 0
    out = capsys.readouterr().out
    assert "on release: whole (164 slices gap-free, ImagesInAcquisition=164)" in out
    assert "profile liver, spleen, kidneys" in out
    thin = pydicom.dcmread(next(study["thin"].glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID
    selection = out.split("study selection")[1]
    assert f"run    {thin}: rule chest, selected: axial, 164 slices, 1.5 mm" in selection
    assert "localizer (ImageType LOCALIZER)" in selection and "secondary capture" in selection
    assert "not selected: coronal, not axial" in selection and f"series {thin} is preferred" in selection
