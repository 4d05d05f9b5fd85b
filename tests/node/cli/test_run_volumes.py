"""``segnode run`` on the issue's head CT (tilted, 4 mm and 7 mm steps): one volume everywhere it appears.

``--seg-type labelmap --output rtstruct,overlay,sr`` exits 0 (it exited 4 when
the SR could not reference a LABELMAP SEG); the printed line, the summary, QC
and the SR carry the volume the test computes from the written files' geometry
and the SEG read back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from segnode.models.series import load_series
from segnode.node.cli.main import main

from tests.dicomtools import seg_labelmap_on_source
from tests.geometry_cases import write_tilted_head

pytestmark = pytest.mark.peer  # the SEG is read back with highdicom; run writes every kind


def _reference_ml(paths: list[Path], labels: np.ndarray, value: int) -> float:
    """Each file's slice: half-way to each neighbour along the normal (end slices: their one gap)."""
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    iop = np.asarray(datasets[0].ImageOrientationPatient, float)
    z = np.array([np.asarray(ds.ImagePositionPatient, float) @ np.cross(iop[:3], iop[3:]) for ds in datasets])
    gaps = np.diff(z)
    extents = (np.r_[gaps[0], gaps] + np.r_[gaps, gaps[-1]]) / 2
    dy, dx = (float(v) for v in datasets[0].PixelSpacing)
    return float((labels == value).reshape(len(z), -1).sum(axis=1) @ extents) * dx * dy / 1000


def _sr_volumes(path: Path) -> dict[str, float]:
    out = {}
    for group in pydicom.dcmread(path).ContentSequence:
        for item in group.get("ContentSequence") or []:
            children = list(item.get("ContentSequence") or [])
            names = [str(c.TextValue) for c in children if c.ConceptNameCodeSequence[0].CodeValue == "112039"]
            for c in children:
                if c.ValueType == "NUM" and c.ConceptNameCodeSequence[0].CodeValue == "118565006":
                    out[names[0]] = float(c.MeasuredValueSequence[0].NumericValue)
    return out


def test_labelmap_run_reports_the_geometric_volume_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_tilted_head(tmp_path / "ct")
    argv = ["run", "--organ", "brain", "--model", "hu_based", "--seg-type", "labelmap", "--output", "rtstruct,overlay,sr"]
    code = main([*argv, str(tmp_path / "ct"), "-o", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    volume = load_series(tmp_path / "ct")
    assert volume.source is not None and list(volume.source.files) == paths
    summary = json.loads(next((tmp_path / "out").glob("summary_brain_*.json")).read_text())
    assert {o["kind"] for o in summary["outputs"]} == {"seg", "rtstruct", "overlay", "sr"}
    seg = next(tmp_path / "out" / o["path"] for o in summary["outputs"] if o["kind"] == "seg")
    sr = next(tmp_path / "out" / o["path"] for o in summary["outputs"] if o["kind"] == "sr")
    labels = seg_labelmap_on_source(seg, volume)
    reported = _sr_volumes(sr)
    qc = {f["tissue"]: f["figure"] for f in summary["qc"] if f["check"] == "volume_ml"}
    for segment in summary["segments"]:
        if segment["empty"]:
            continue
        name = segment["tissue"]
        expected = _reference_ml(paths, labels, segment["segment_number"])
        median_step = int((labels == segment["segment_number"]).sum()) * volume.voxel_volume_ml
        assert median_step < 0.9 * expected  # what the summary, QC and SR said before
        assert segment["volume_ml"] == pytest.approx(expected, abs=1e-3), name
        assert reported[name] == pytest.approx(expected, rel=0.005), name
        assert f"{name:16} {segment['volume_ml']:10.1f} mL" in out
        if name in qc:
            assert qc[name] == pytest.approx(expected, abs=0.05), name
