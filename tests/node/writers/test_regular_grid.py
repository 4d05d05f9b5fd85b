"""NIfTI only on a regular grid (issue 14): the tilted, unevenly spaced head lands where it was acquired.

Every source voxel centre (from its own file's IPP/IOP/PixelSpacing) is mapped
through the written NIfTI affine; the nearest NIfTI voxel (within half a voxel
by construction) must hold that source voxel's value, and SimpleITK must read
the file (it refuses a sheared, non-orthonormal one).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from segnode.errors import InputError
from segnode.models.series import load_series
from segnode.models.volume import LabelMap
from segnode.node.writers.nifti import write_nifti
from segnode.profiles import load_profile
from segnode.storage import nifti

from tests.geometry_cases import source_voxel_centres, write_tilted_head

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def nearest_voxel(affine_ras: np.ndarray, centres_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index (i, j, k) of the NIfTI voxel nearest each centre, and its distance in voxels (max over axes)."""
    ras = centres_lps.reshape(-1, 3) * np.array([-1.0, -1.0, 1.0])
    ijk = (np.linalg.inv(affine_ras) @ np.c_[ras, np.ones(len(ras))].T)[:3].T
    return np.rint(ijk).astype(int), np.abs(ijk - np.rint(ijk)).max(axis=1)


def assert_source_values_land_exactly(path: Path, centres: np.ndarray, values: np.ndarray) -> None:
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    index, distance = nearest_voxel(img.affine, centres)
    assert distance.max() <= 0.5 + 1e-6
    assert (index >= 0).all() and (index < np.array(data.shape)).all()
    assert np.array_equal(data[index[:, 0], index[:, 1], index[:, 2]], values.reshape(-1))
    image = sitk.ReadImage(str(path))  # raises on a non-orthonormal direction
    assert np.allclose(np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing()),
                       (LPS_TO_RAS @ img.affine)[:3, :3], atol=1e-4)


@pytest.fixture(scope="module")
def tilted(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    folder = tmp_path_factory.mktemp("tilted") / "ct"
    return write_tilted_head(folder), folder


def test_nifti_output_of_a_tilted_uneven_series_places_every_slice(tilted, tmp_path: Path) -> None:
    paths, folder = tilted
    volume = load_series(folder)
    labels = LabelMap((volume.hu > 500).astype(np.uint8), {1: "bone"}, backend="hu_based")
    result = write_nifti(volume, labels, load_profile("bone"), tmp_path)
    assert "resampled onto a regular grid" in result.note and "varies" in result.note and "sheared" in result.note
    centres, _ = source_voxel_centres(paths)
    assert_source_values_land_exactly(result.path, centres, labels.array)


def test_the_old_constant_step_affine_would_misplace_slices(tilted) -> None:
    """What the fix prevents: the volume's own affine puts slice 39 tens of mm off."""
    paths, folder = tilted
    volume = load_series(folder)
    centres, _ = source_voxel_centres(paths)
    aff = volume.affine()
    predicted = aff[:3, 3] + (len(paths) - 1) * aff[:3, 2]
    assert np.linalg.norm(predicted - centres[-1, 0, 0]) > 30.0  # mm
    assert not volume.is_regular()


def test_regular_series_is_written_exactly_without_resampling(data_dir: Path, tmp_path: Path) -> None:
    volume = load_series(data_dir / "thorax_cta")
    assert volume.is_regular()
    labels = LabelMap((volume.hu > 200).astype(np.uint8), {1: "bone"}, backend="hu_based")
    result = write_nifti(volume, labels, load_profile("bone"), tmp_path)
    assert result.note == ""
    img = nib.load(result.path)
    assert np.allclose(img.affine, LPS_TO_RAS @ volume.affine(), atol=1e-6)
    assert np.array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), labels.array)


def test_harvest_grid_of_a_tilted_uneven_series_is_regular_image_and_labels(tilted, tmp_path: Path) -> None:
    paths, _ = tilted
    slices = nifti.sort_slices([pydicom.dcmread(p) for p in paths])
    grid = nifti.series_grid(slices)
    assert grid.note and "resampled" in grid.note
    source_hu = np.stack([ds.pixel_array.astype(np.int32) - 1024 for ds in slices])
    labels = (source_hu > 500).astype(np.uint8)
    on_grid = grid.labels_on_grid(labels)
    assert on_grid.shape == grid.array.shape
    path = tmp_path / "labels.nii.gz"
    path.write_bytes(nifti.nifti_bytes(on_grid, grid.affine_lps, np.uint8))
    centres, _ = source_voxel_centres(paths)
    assert_source_values_land_exactly(path, centres, labels)
    image = tmp_path / "image.nii.gz"  # the image on the same regular grid, readable by SimpleITK
    image.write_bytes(nifti.nifti_bytes(grid.array, grid.affine_lps, np.int16))
    assert sitk.ReadImage(str(image)).GetSize() == tuple(reversed(grid.array.shape))


def test_nifti_bytes_refuses_a_sheared_affine() -> None:
    affine = np.eye(4)
    affine[1, 2] = 0.5  # slice axis leaning towards y
    with pytest.raises(InputError, match="sheared"):
        nifti.nifti_bytes(np.zeros((2, 3, 4), np.uint8), affine, np.uint8)
