"""CT series → Volume: real files, edge cases and synthetic geometry."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from segnode.errors import InputError, SegnodeError
from segnode.models.series import load_series, scan

from tests.paths import DATA


def test_thorax_series_geometry_matches_its_nifti(data_dir: Path) -> None:
    import SimpleITK as sitk

    volume = load_series(data_dir / "thorax_cta")
    assert volume.shape == (164, 126, 120)
    assert volume.spacing == pytest.approx((1.5, 1.5, 1.5))
    reference = sitk.ReadImage(str(data_dir / "thorax_cta_labels" / "aorta.nii.gz"))
    assert volume.origin == pytest.approx(reference.GetOrigin(), abs=1e-4)
    assert np.allclose(volume.direction.ravel(), reference.GetDirection(), atol=1e-6)
    assert volume.hu.min() == -1078 and volume.hu.max() == 3343  # the values PROVENANCE.md gives
    positions = [float(ds.ImagePositionPatient[2]) for ds in volume.source.datasets]
    assert positions == sorted(positions)


def test_shuffled_files_are_sorted_along_the_normal(data_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    files = sorted((data_dir / "thorax_cta").glob("*.dcm"))[:20]
    for i, f in enumerate(rng.permutation(len(files))):
        shutil.copy(files[f], tmp_path / f"x{i:03d}.dcm")
    shuffled = load_series(tmp_path)
    ordered = load_series(data_dir / "thorax_cta")
    assert np.array_equal(shuffled.hu, ordered.hu[:20])


@pytest.fixture()
def repaired_upper_abdomen(data_dir: Path, tmp_path: Path) -> Path:
    """The JPEG 2000 slices with their empty UIDs repaired (as PROVENANCE.md describes)."""
    out = tmp_path / "repaired"
    out.mkdir()
    study, series = generate_uid(), generate_uid()
    for file in sorted((data_dir / "upper_abdomen").iterdir()):
        ds = pydicom.dcmread(file)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.save_as(out / file.name)
    return out


def test_jpeg2000_series_decodes_to_hu(repaired_upper_abdomen: Path) -> None:
    volume = load_series(repaired_upper_abdomen)
    assert volume.shape == (20, 512, 512)
    assert volume.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert volume.hu.min() == -1024  # 12-bit unsigned with intercept −1024
    assert volume.hu.dtype == np.int16


def test_empty_uids_are_refused_with_the_file_named(data_dir: Path) -> None:
    with pytest.raises(InputError, match="empty SeriesInstanceUID .*CT\\.1\\.3\\.12"):
        load_series(data_dir / "upper_abdomen")


def test_gantry_tilt_gives_a_sheared_grid(data_dir: Path) -> None:
    volume = load_series(data_dir / "gantry_tilt")
    assert any("gantry tilt 18.5" in n for n in volume.notes)
    # the slice axis follows the image positions, not the normal
    ipp = [np.array(ds.ImagePositionPatient, float) for ds in volume.source.datasets]
    world_last = volume.affine() @ np.array([0, 0, volume.shape[0] - 1, 1.0])
    assert np.allclose(world_last[:3], ipp[-1], atol=1e-3)


def test_enhanced_ct_multiframe(data_dir: Path) -> None:
    volume = load_series(data_dir / "seg_objects" / "23x38x3" / "multiframe" / "mf.dcm")
    singles = load_series(data_dir / "seg_objects" / "23x38x3" / "image")
    assert volume.source.multiframe and volume.source.frame_order is not None
    assert np.array_equal(volume.hu, singles.hu)
    assert volume.origin == pytest.approx(singles.origin)


def test_mixed_folder_picks_the_only_ct_series(data_dir: Path) -> None:
    volume = load_series(data_dir / "liver_3slice")  # 3 CT slices + a SEG
    assert volume.shape == (3, 512, 512)


def test_two_ct_series_need_a_choice(data_dir: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        shutil.copytree(data_dir / "seg_objects" / "23x38x3" / "image", tmp_path / name)
    series_b = generate_uid()
    for file in (tmp_path / "b").iterdir():
        ds = pydicom.dcmread(file)
        ds.SeriesInstanceUID = series_b
        ds.save_as(file)
    with pytest.raises(InputError, match="2 series found, choose one with --series"):
        load_series(tmp_path)
    assert load_series(tmp_path, series_uid=series_b).source.series_instance_uid == series_b
    assert set(scan(tmp_path)) == {series_b, pydicom.dcmread(next((tmp_path / "a").iterdir())).SeriesInstanceUID}


def test_missing_slices_are_named(data_dir: Path, tmp_path: Path) -> None:
    files = sorted((data_dir / "thorax_cta").glob("*.dcm"))[:12]
    for f in files[:5] + files[8:]:
        shutil.copy(f, tmp_path / f.name)
    with pytest.raises(InputError, match="missing slices: a gap of 6.00 mm between CT0005.dcm and CT0009.dcm"):
        load_series(tmp_path)


def test_variable_spacing_is_accepted_with_a_note(data_dir: Path, tmp_path: Path) -> None:
    files = sorted((data_dir / "thorax_cta").glob("*.dcm"))[:12]
    for f in files[:6] + files[7:]:  # one slice missing: 3 mm step among 1.5 mm steps
        shutil.copy(f, tmp_path / f.name)
    volume = load_series(tmp_path)
    assert volume.shape[0] == 11
    assert any("variable slice spacing 1.50–3.00 mm" in n for n in volume.notes)


def test_nifti_input(data_dir: Path) -> None:
    volume = load_series(data_dir / "thorax_cta_labels" / "heart.nii.gz")
    assert volume.source is None and volume.shape == (191, 167, 233)


# Every edge-case file gives a volume or a clear InputError, never a traceback.
EDGE = sorted((DATA / "edge_cases").rglob("*.dcm"))
LOADABLE = {"CT_small.dcm", "explicit_VR-UN.dcm"}


@pytest.mark.parametrize("path", EDGE, ids=[p.name for p in EDGE])
def test_edge_cases_give_a_volume_or_a_clear_error(path: Path) -> None:
    if path.name in LOADABLE:
        assert load_series(path).shape[0] == 1
        return
    with pytest.raises(SegnodeError) as info:
        load_series(path)
    assert isinstance(info.value, InputError)
    assert str(path.name) in str(info.value) or str(path) in str(info.value)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("eCT_Supplemental.dcm", "PERFUSION/RCBF: derived, non-HU"),
        ("MR_small_bigendian.dcm", "modality is MR, not CT"),
        ("bad.dcm", "no DICOM files found|missing or empty SeriesInstanceUID"),
        ("rtplan_truncated.dcm", "FrameOfReferenceUID|modality"),
    ],
)
def test_edge_case_reasons(data_dir: Path, name: str, reason: str) -> None:
    path = next((data_dir / "edge_cases").rglob(name))
    with pytest.raises(InputError, match=reason):
        load_series(path)
