"""TID 1500 SR writer: dciodvfy, read back by dcmqi's tid1500reader (independent C++ reader)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from segnode.models.measurements import segment_statistics
from segnode.node.writers.seg import write_seg
from segnode.node.writers.sr import write_sr

from tests.dicomtools import dciodvfy
from tests.output_fixtures import (
    dcmqi_tool,
    labels_on,
    thorax,
    thorax_labels,
    writer_profile,
)

pytestmark = pytest.mark.peer  # dciodvfy, dcmqi


def _tid1500reader(sr: Path, out: Path) -> dict:
    subprocess.run([dcmqi_tool("tid1500reader"), "--inputDICOM", str(sr), "--outputMetadata", str(out)], check=True, capture_output=True, timeout=120)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sr")
    profile = writer_profile(tmp)
    volume = thorax()
    labels = thorax_labels(volume, profile)
    seg = write_seg(volume, labels, profile, tmp / "seg")
    stats = segment_statistics(volume, labels)
    sr = write_sr(volume, labels, profile, tmp / "sr", seg_path=seg.path, statistics=stats)
    return volume, profile, seg, stats, sr, tmp


def test_sr_is_valid_and_dcmqi_reads_our_volumes_and_mean_hu(written) -> None:
    volume, profile, seg, stats, sr, tmp = written
    assert dciodvfy(sr.path) == []
    report = _tid1500reader(sr.path, tmp / "sr.json")
    groups = {m["TrackingIdentifier"]: m for m in report["Measurements"]}
    present = {s["tissue"]: s for s in stats if not s["empty"]}
    assert set(groups) == set(present) == {"aorta", "vertebrae_t12"}  # the empty iliac artery has no group
    for name, stat in present.items():
        group = groups[name]
        assert group["ReferencedSegment"] == stat["segment_number"]
        assert group["segmentationSOPInstanceUID"] == seg.sop_instance_uid
        assert group["Finding"]["CodeValue"] == profile.tissue(name).type.value
        items = {i["quantity"]["CodeValue"]: i for i in group["measurementItems"]}
        assert items["118565006"]["units"]["CodeValue"] == "ml"
        assert float(items["118565006"]["value"]) == stat["volume_ml"]  # aorta 245.734 mL, T12 32.457 mL
        assert items["112031"]["units"]["CodeValue"] == "[hnsf'U]"
        assert float(items["112031"]["value"]) == stat["mean_hu"]  # aorta 352.6 HU, T12 259.5 HU
        assert items["112031"]["derivationModifier"]["CodeValue"] == "373098007"


def test_sr_header_references_and_deterministic_uids(written) -> None:
    volume, profile, seg, stats, sr, tmp = written
    ds = pydicom.dcmread(sr.path)
    assert ds.StudyInstanceUID == volume.source.study_instance_uid and ds.Manufacturer == "segnode"
    assert "SR" in ds.SeriesDescription and profile.organ in ds.SeriesDescription
    evidence = {
        i.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert seg.sop_instance_uid in evidence and {d.SOPInstanceUID for d in volume.source.datasets} <= evidence
    again = write_sr(volume, thorax_labels(volume, profile), profile, tmp / "again", seg_path=seg.path, statistics=stats)
    assert again.sop_instance_uid == sr.sop_instance_uid != seg.sop_instance_uid
    assert (sr.kind, sr.sop_class_uid) == ("sr", "1.2.840.10008.5.1.4.1.1.88.34")  # Comprehensive 3D SR


def test_our_seg_is_read_by_dcmqi_segimage2itkimage(written) -> None:
    volume, profile, seg, stats, sr, tmp = written
    out = tmp / "dcmqi"
    out.mkdir()
    subprocess.run(
        [dcmqi_tool("segimage2itkimage"), "--inputDICOM", str(seg.path), "--outputDirectory", str(out), "--outputType", "nii"],
        check=True, capture_output=True, timeout=300,
    )
    labels = thorax_labels(volume, profile)
    for value in (1, 2):  # aorta, T12 (dcmqi writes one image per segment)
        mask = labels_on(out / f"{value}.nii.gz", volume) > 0
        assert np.array_equal(mask, labels.array == value)


def test_sr_refuses_a_missing_seg(written) -> None:
    from segnode.errors import EncodeError

    volume, profile, seg, stats, sr, tmp = written
    with pytest.raises(EncodeError, match="cannot read the SEG"):
        write_sr(volume, thorax_labels(volume, profile), profile, tmp / "x", seg_path=tmp / "nope.dcm", statistics=stats)
