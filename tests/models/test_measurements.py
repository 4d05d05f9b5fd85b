"""Volumes from geometry (models/measurements.py): each slice counts with its own extent.

Expected figures come from the written files (tests/series_shapes.py), never
from the code under test.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from segnode.models.measurements import label_volumes_ml, segment_statistics
from segnode.models.qc import check_tissue, run_qc
from segnode.models.series import load_series
from segnode.models.volume import LabelMap, Volume
from segnode.profiles.schema import TissueQC

from tests.geometry_cases import THICK, write_tilted_head
from tests.output_fixtures import writer_profile
from tests.series_shapes import (
    SEGMENTS,
    SHAPES,
    WrittenShape,
    reference_volumes_ml,
    write_shape,
)


def labels_for(volume: Volume, shape: WrittenShape) -> LabelMap:
    """The shape's per-file label map in the volume's slice order (matched by file)."""
    assert volume.source is not None
    index = [shape.paths.index(f) for f in volume.source.files]
    return LabelMap(shape.labels[index], dict(SEGMENTS), backend="totalsegmentator", model_version="test-1")


@pytest.mark.parametrize("name", SHAPES)
def test_segment_volumes_equal_the_files_geometry(tmp_path: Path, name: str) -> None:
    shape = write_shape(name, tmp_path / name)
    volume = load_series(tmp_path / name)
    stats = {s["segment_number"]: s for s in segment_statistics(volume, labels_for(volume, shape))}
    expected = reference_volumes_ml(shape)
    for value in (1, 2):
        assert expected[value] > 0
        assert stats[value]["volume_ml"] == pytest.approx(expected[value], rel=1e-6, abs=1e-3), (name, value)
        assert stats[value]["voxels"] == int((shape.labels == value).sum())
    assert stats[3]["empty"] and stats[3]["volume_ml"] == 0.0


@pytest.mark.parametrize("name", ["uneven", "tilted_uneven", "single_slice"])
def test_qc_measures_with_the_same_function(tmp_path: Path, name: str) -> None:
    shape = write_shape(name, tmp_path / name)
    volume = load_series(tmp_path / name)
    labels = labels_for(volume, shape)
    expected = reference_volumes_ml(shape)[1]
    spec = TissueQC(volume_ml=(0.001, 10_000.0), max_components=1, min_component_ml=expected * 0.999)
    found = {f.check: f for f in check_tissue(volume, labels.array == 1, "aorta", spec)}
    assert found["volume_ml"].figure == pytest.approx(expected, abs=0.05)  # QC rounds to 0.1 mL
    assert found["components"].figure == 1.0  # the one disk stack, measured slice by slice, reaches the minimum


def test_uneven_series_is_not_measured_at_the_median_step(tmp_path: Path) -> None:
    """The defect: voxel count × the median step reports an unevenly spaced series low."""
    shape = write_shape("tilted_uneven", tmp_path / "ct")
    volume = load_series(tmp_path / "ct")
    labels = labels_for(volume, shape)
    expected = reference_volumes_ml(shape)[1]
    at_median = int((labels.array == 1).sum()) * volume.voxel_volume_ml
    assert at_median < 0.9 * expected  # what was reported before
    assert segment_statistics(volume, labels)[0]["volume_ml"] == pytest.approx(expected, abs=5e-4)  # 3 decimals


def test_head_ct_of_the_issue(tmp_path: Path) -> None:
    """The gantry-tilted head: 4 mm steps, 7 mm over slices 15–28; everything above -500 HU, slice by slice."""
    paths = write_tilted_head(tmp_path / "ct")
    volume = load_series(tmp_path / "ct")
    assert volume.source is not None and list(volume.source.files) == paths
    mask = volume.hu > -500
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])  # axial planes: the normal is z
    gaps = np.diff(z)
    assert np.allclose(gaps[min(THICK) - 1], 7 * np.cos(np.radians(20)), atol=1e-3)
    extents = (np.r_[gaps[0], gaps] + np.r_[gaps, gaps[-1]]) / 2
    dy, dx = (float(v) for v in datasets[0].PixelSpacing)
    expected = float(mask.reshape(len(z), -1).sum(axis=1) @ extents) * dx * dy / 1000
    counts, ml = label_volumes_ml(volume, mask.astype(np.uint8), 2)
    assert ml[1] == pytest.approx(expected, rel=1e-9)
    assert counts[1] * volume.voxel_volume_ml < 0.8 * expected  # the median step: more than 20% low


def test_single_slice_uses_slice_thickness_or_says_it_assumed_one_mm(tmp_path: Path, caplog) -> None:
    shape = write_shape("single_slice", tmp_path / "ct")
    volume = load_series(tmp_path / "ct")
    assert volume.slice_extents_mm().tolist() == [3.0]
    at_3mm = reference_volumes_ml(shape)[1]
    ds = pydicom.dcmread(shape.paths[0])
    del ds.SliceThickness
    ds.save_as(shape.paths[0])
    bare = load_series(tmp_path / "ct")
    assert bare.slice_extents_mm().tolist() == [1.0]
    with caplog.at_level(logging.WARNING, logger="segnode.models.measurements"):
        stats = segment_statistics(bare, labels_for(bare, shape))
    assert "no SliceThickness" in caplog.text
    assert stats[0]["volume_ml"] == pytest.approx(at_3mm / 3, abs=5e-4)


def test_run_qc_volume_finding_on_an_uneven_series(tmp_path: Path) -> None:
    profile = writer_profile(tmp_path)
    shape = write_shape("uneven", tmp_path / "ct")
    volume = load_series(tmp_path / "ct")
    labels = labels_for(volume, shape)
    assert labels.labels == profile.label_values()
    expected = reference_volumes_ml(shape)[1]
    tight = profile.model_copy(update={"qc": profile.qc.model_copy(update={"tissues": {
        "aorta": TissueQC(volume_ml=(expected * 0.995, expected * 1.005))}})})
    found = [f for f in run_qc(volume, labels, tight) if f.check == "volume_ml"]
    assert [f.outcome.value for f in found] == ["pass"]


def test_evaluation_on_a_dicom_grid_measures_slice_by_slice(tmp_path: Path) -> None:
    """``segnode-eval`` on a SEG over its unevenly spaced source reports the geometric volume too."""
    from segnode.models.evaluate import evaluate_case
    from segnode.models.segmentation_io import read_seg
    from segnode.node.writers.seg import write_seg

    profile = writer_profile(tmp_path)
    shape = write_shape("tilted_uneven", tmp_path / "ct")
    volume = load_series(tmp_path / "ct")
    seg = write_seg(volume, labels_for(volume, shape), profile, tmp_path / "seg")
    on_source = read_seg(seg.path, source=volume)
    rows = {r.segment: r for r in evaluate_case(on_source, on_source).rows}
    expected = reference_volumes_ml(shape)
    assert rows["aorta"].pred_ml == pytest.approx(expected[1], rel=1e-9)
    assert rows["vertebrae_t12"].ref_ml == pytest.approx(expected[2], rel=1e-9)
    assert rows["aorta"].volume_diff_ml == 0.0
