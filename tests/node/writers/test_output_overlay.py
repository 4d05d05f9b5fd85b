"""Overlay (RGB Secondary Capture) writer: dciodvfy, outline colours, one image per source slice, geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from segnode.node.writers.outline import outline
from segnode.node.writers.overlay import write_overlay

from tests.dicomtools import dciodvfy
from tests.output_fixtures import thorax, thorax_labels, tilted_uneven, writer_profile

pytestmark = pytest.mark.peer  # dciodvfy


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overlay")
    profile = writer_profile(tmp)
    volume = thorax()
    labels = thorax_labels(volume, profile)
    return volume, labels, profile, write_overlay(volume, labels, profile, tmp / "out")


def test_one_valid_instance_per_source_slice_with_its_position(written) -> None:
    volume, labels, profile, results = written
    assert len(results) == volume.shape[0] == 164
    assert len({r.sop_instance_uid for r in results}) == 164 and len({r.series_instance_uid for r in results}) == 1
    for k in (0, 80, 163):
        assert dciodvfy(results[k].path) == []
    for k, (result, src) in enumerate(zip(results, volume.source.datasets)):
        ds = pydicom.dcmread(result.path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], [float(v) for v in src.ImagePositionPatient], atol=1e-5)
        assert np.allclose([float(v) for v in ds.ImageOrientationPatient], [float(v) for v in src.ImageOrientationPatient])
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.BurnedInAnnotation == "YES"
        assert "NOT FOR DIAGNOSIS" in ds.SeriesDescription and "NOT FOR DIAGNOSIS" in ds.ImageComments
        assert ds.Manufacturer == "segnode" and ds.InstanceNumber == k + 1


def test_outline_pixels_have_the_tissue_colours_and_the_rest_is_grey(written) -> None:
    volume, labels, profile, results = written
    checked = 0
    for k in range(0, volume.shape[0], 7):
        rgb = pydicom.dcmread(results[k].path).pixel_array
        image = rgb[: volume.shape[1]]  # the legend band is below the source rows
        edges = {v: outline(labels.array[k] == v) for v in labels.labels}
        for value, edge in edges.items():
            only = edge & ~np.logical_or.reduce([e for v, e in edges.items() if v != value])
            colour = profile.tissue(labels.labels[value]).color
            assert (image[only] == colour).all()
            checked += int(only.sum())
        rest = image[~np.logical_or.reduce(list(edges.values()))]
        assert (rest[:, 0] == rest[:, 1]).all() and (rest[:, 1] == rest[:, 2]).all()
    assert checked > 500  # measured 2,120 outline pixels on these 24 slices


def test_legend_band_holds_the_tissue_colours_and_the_warning(written) -> None:
    volume, labels, profile, results = written
    band = pydicom.dcmread(results[0].path).pixel_array[volume.shape[1] :]
    colours = {tuple(c) for c in band.reshape(-1, 3)}
    for tissue in profile.tissues:
        assert tuple(tissue.color) in colours, tissue.name
    assert (255, 255, 0) in colours  # NOT FOR DIAGNOSIS, yellow


def test_diagnostic_overlay_without_warning_and_tilted_geometry(tmp_path: Path) -> None:
    profile = writer_profile(tmp_path)
    volume, labels = tilted_uneven(tmp_path / "ct", profile)
    results = write_overlay(volume, labels, profile, tmp_path / "out", not_for_diagnosis=False)
    assert len(results) == volume.shape[0]
    assert dciodvfy(results[0].path) == []
    for result, src in zip(results, volume.source.datasets):
        ds = pydicom.dcmread(result.path)
        assert "NOT FOR DIAGNOSIS" not in ds.SeriesDescription
        assert (255, 255, 0) not in {tuple(c) for c in ds.pixel_array.reshape(-1, 3)}
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], [float(v) for v in src.ImagePositionPatient], atol=1e-5)


def test_results_name_their_kind_and_class(written) -> None:
    results = written[3]
    assert {(r.kind, r.sop_class_uid) for r in results} == {("overlay", "1.2.840.10008.5.1.4.1.1.7")}
