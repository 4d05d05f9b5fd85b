"""A corrected SEG read back onto the source grid, and the refusals (geometry, segments), without peers.

The SEG is the node's own (:func:`segnode.node.writers.seg.write_seg`) on a small
synthetic CT, edited as a viewer's export would be: frames' pixels changed, a
segment renamed, positions moved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from segnode.models.series import load_series
from segnode.models.volume import LabelMap, Volume
from segnode.node.correction_seg import CorrectionRefused, labels_on_grid, segment_values
from segnode.node.writers.seg import write_seg
from segnode.profiles import load_profile

from tests.phantoms import write_ct_series

LUNGS = load_profile("lungs")


def _series(tmp_path: Path) -> Volume:
    hu = np.full((6, 24, 20), -800, dtype=np.int16)
    write_ct_series(hu, tmp_path / "ct", (0.8, 0.8, 2.5), (-10.0, -12.0, 40.0))
    return load_series(tmp_path / "ct")


def _model(volume: Volume) -> np.ndarray:
    array = np.zeros(volume.shape, dtype=np.uint8)
    array[1:5, 4:12, 2:9] = 1  # lung_left
    array[1:5, 4:12, 11:18] = 2  # lung_right
    return array


def _seg(tmp_path: Path, volume: Volume, seg_type: str = "binary") -> Dataset:
    labels = LabelMap(_model(volume), LUNGS.label_values(), backend="hu_based")
    out = tmp_path / f"seg-{seg_type}"
    out.mkdir()
    return dcmread(write_seg(volume, labels, LUNGS, out, seg_type=seg_type).path)


@pytest.mark.parametrize("seg_type", ["binary", "labelmap"])
def test_the_model_seg_reads_back_onto_the_source_grid(tmp_path: Path, seg_type: str) -> None:
    volume = _series(tmp_path)
    seg = _seg(tmp_path, volume, seg_type)
    assert np.array_equal(labels_on_grid(seg, volume, LUNGS), _model(volume))


def test_an_edited_frame_is_the_corrected_label(tmp_path: Path) -> None:
    volume = _series(tmp_path)
    seg = _seg(tmp_path, volume)
    frames = seg.pixel_array.copy()
    first_left = next(i for i, f in enumerate(seg.PerFrameFunctionalGroupsSequence)
                      if f.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 1)
    frames[first_left] = 0  # a viewer erased the left lung on that slice
    seg.PixelData = _pack(frames)
    corrected = labels_on_grid(seg, volume, LUNGS)
    assert (corrected == 1).sum() == (_model(volume) == 1).sum() - 8 * 7
    assert (corrected == 2).sum() == (_model(volume) == 2).sum()


def _pack(frames: np.ndarray) -> bytes:
    bits = np.packbits(frames.astype(np.uint8).ravel(), bitorder="little")
    return bits.tobytes() + (b"\0" if len(bits) % 2 else b"")


def test_segments_map_by_label_or_by_code(tmp_path: Path) -> None:
    seg = _seg(tmp_path, _series(tmp_path))
    seg.SegmentSequence[0].SegmentLabel = "Lung Left"  # OHIF keeps the label; case and spaces differ
    seg.SegmentSequence[1].SegmentLabel = "Segment 2"  # only the property codes say right lung
    assert segment_values(seg, LUNGS) == {1: 1, 2: 2}


def test_an_unknown_segment_is_refused(tmp_path: Path) -> None:
    seg = _seg(tmp_path, _series(tmp_path))
    seg.SegmentSequence[1].SegmentLabel = "spleen"
    seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue = "78961009"
    with pytest.raises(CorrectionRefused, match="segment 'spleen' unknown to profile lungs") as refused:
        segment_values(seg, LUNGS)
    assert refused.value.reason == "correction_segments"


@pytest.mark.parametrize(("edit", "message"), [
    ("shift", "frame 1 lies 0.80 mm off the source grid"),
    ("frame_of_reference", "frame of reference differs from the source series"),
    ("orientation", "image orientation differs from the source series"),
    ("rows", "23x20 frames on a 24x20 series"),
])
def test_a_seg_off_the_source_grid_is_refused(tmp_path: Path, edit: str, message: str) -> None:
    volume = _series(tmp_path)
    seg = _seg(tmp_path, volume)
    if edit == "shift":
        for frame in seg.PerFrameFunctionalGroupsSequence:
            x, y, z = frame.PlanePositionSequence[0].ImagePositionPatient
            frame.PlanePositionSequence[0].ImagePositionPatient = [float(x) + 0.8, y, z]
    elif edit == "frame_of_reference":
        seg.FrameOfReferenceUID = "1.2.3.4.5"
    elif edit == "orientation":
        seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient = [0, 1, 0, 1, 0, 0]
    else:
        seg.Rows = 23
    with pytest.raises(CorrectionRefused, match=message) as refused:
        labels_on_grid(seg, volume, LUNGS)
    assert refused.value.reason == "correction_geometry"
