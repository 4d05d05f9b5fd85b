"""``segnode run`` end to end, in-process: outputs, summary, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from segnode.models.series import load_series
from segnode.node.cli.main import main

from tests.dicomtools import dciodvfy, seg_labelmap_on_source


@pytest.mark.peer
def test_run_writes_a_valid_seg_and_a_summary(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--organ", "lungs", "--model", "hu_based", str(data_dir / "thorax_cta"), "-o", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "164 slices of 126x120, spacing 1.5 x 1.5 x 1.5 mm" in err  # says what it found
    seg_path = Path(out.split("wrote ")[1].split()[0])
    assert seg_path.parent == tmp_path and dciodvfy(seg_path) == []
    summary = json.loads(next(tmp_path.glob("summary_lungs_*.json")).read_text())
    assert summary["backend"] == "hu_based" and summary["input"]["slices"] == 164
    volume = load_series(data_dir / "thorax_cta")
    labels = seg_labelmap_on_source(seg_path, volume)
    for segment in summary["segments"]:
        mask = labels == segment["segment_number"]
        assert segment["voxels"] == int(mask.sum())
        assert segment["volume_ml"] == pytest.approx(mask.sum() * 1.5**3 / 1000, rel=1e-3)
        if mask.any():
            assert segment["mean_hu"] == pytest.approx(float(volume.hu[mask].mean()), abs=0.1)
    assert "Synthetic" not in json.dumps(summary)  # no patient name in the summary


def test_run_nifti_format(data_dir: Path, tmp_path: Path) -> None:
    assert main(["run", "--organ", "bone", "--format", "nifti", str(data_dir / "thorax_cta"), "-o", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("labels_bone_*.nii.gz"))) == 1


def test_run_output_kinds(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--organ", "lungs", "--model", "hu_based", "--output", "rtstruct, overlay,sr"]
    assert main([*argv, str(data_dir / "thorax_cta"), "-o", str(tmp_path)]) == 0
    counts = {kind: len(list(tmp_path.glob(f"{kind}_lungs_*.dcm"))) for kind in ("SEG", "RTSTRUCT", "OVERLAY", "SR")}
    assert counts == {"SEG": 1, "RTSTRUCT": 1, "OVERLAY": 164, "SR": 1}  # the SR brings the SEG it refers to
    summary = json.loads(next(tmp_path.glob("summary_lungs_*.json")).read_text())
    assert {o["kind"] for o in summary["outputs"]} == {"seg", "rtstruct", "overlay", "sr"}
    assert "(rtstruct)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--organ", "pancreas", "thorax_cta"], 2, "unknown profile 'pancreas'"),
        (["--organ", "lungs", "--model", "magic", "thorax_cta"], 2, "invalid choice: 'magic'"),
        (["--organ", "lungs", "--output", "seg,rtstrct", "thorax_cta"], 2, "unknown output kind(s) rtstrct"),
        (["--organ", "lungs", "edge_cases/pydicom_data/eCT_Supplemental.dcm"], 3, "PERFUSION/RCBF"),
        (["--organ", "lungs", "upper_abdomen"], 3, "empty SeriesInstanceUID"),
        (["--organ", "lungs", "nowhere"], 3, "no such file or folder"),
        (["--organ", "liver", "--model", "totalsegmentator", "--no-fallback", "--weights-dir", "WEIGHTS", "thorax_cta"],
         4, "segnode models import"),
    ],
)
def test_exit_codes_and_messages(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, message: str
) -> None:
    *options, source = [str(tmp_path / "weights") if a == "WEIGHTS" else a for a in argv]
    assert main(["run", *options, str(data_dir / source), "-o", str(tmp_path / "out")]) == code
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
