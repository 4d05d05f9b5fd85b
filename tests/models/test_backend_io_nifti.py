"""Volume ↔ NIfTI conversion: exact round trips, checked against SimpleITK's reading."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from segnode.models.io_nifti import (
    labels_from_nifti,
    ras_affine,
    volume_from_nifti,
    volume_to_nifti,
)
from segnode.models.volume import Volume


def _rotation(deg: float) -> np.ndarray:
    t = np.radians(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def _volumes() -> list[Volume]:
    rng = np.random.default_rng(7)
    hu = rng.integers(-1024, 2000, size=(5, 7, 9)).astype(np.int16)
    flipped = np.diag([-1.0, 1.0, -1.0])  # rows right-to-left, slices head-to-feet
    tilt = np.array([[1, 0, 0], [0, 1, np.sin(np.radians(15))], [0, 0, np.cos(np.radians(15))]])
    return [
        Volume(hu=hu, spacing=(0.7, 0.8, 2.5), origin=(-120.0, -80.5, 33.0), direction=np.eye(3)),
        Volume(hu=hu, spacing=(0.7, 0.8, 2.5), origin=(10.0, 20.0, -30.0), direction=flipped),
        Volume(hu=hu, spacing=(1.0, 1.0, 3.0), origin=(1.0, 2.0, 3.0), direction=_rotation(30)),
        Volume(hu=hu, spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0), direction=tilt),  # gantry tilt (sheared)
    ]


@pytest.mark.parametrize("volume", _volumes(), ids=["axial", "flipped", "oblique", "tilted"])
def test_round_trip_in_memory_and_on_disk(volume: Volume, tmp_path: Path) -> None:
    img = volume_to_nifti(volume)
    assert img.shape == (9, 7, 5) and img.get_data_dtype() == np.int16
    # voxel (i, j, k) of the image is voxel [k, j, i] of the volume, at the same world point
    i, j, k = 8, 2, 4
    world_lps = volume.affine() @ np.array([i, j, k, 1.0])
    world_ras = img.affine @ np.array([i, j, k, 1.0])
    assert np.allclose(world_ras[:3], world_lps[:3] * [-1, -1, 1])
    assert img.get_fdata()[i, j, k] == volume.hu[k, j, i]

    path = tmp_path / "v.nii.gz"
    nib.save(img, path)
    back = volume_from_nifti(nib.load(path))
    assert np.array_equal(back.hu, volume.hu)
    assert np.allclose(back.spacing, volume.spacing, atol=1e-5)
    assert np.allclose(back.origin, volume.origin, atol=1e-4)
    assert np.allclose(back.direction, volume.direction, atol=1e-5)


@pytest.mark.parametrize("volume", _volumes()[:3], ids=["axial", "flipped", "oblique"])
def test_simpleitk_reads_the_same_lps_geometry(volume: Volume, tmp_path: Path) -> None:
    path = tmp_path / "v.nii.gz"
    nib.save(volume_to_nifti(volume), path)
    image = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(image), volume.hu)  # SimpleITK arrays are [k, j, i]
    assert np.allclose(image.GetSpacing(), volume.spacing, atol=1e-5)
    assert np.allclose(image.GetOrigin(), volume.origin, atol=1e-4)
    assert np.allclose(np.array(image.GetDirection()).reshape(3, 3), volume.direction, atol=1e-5)


def test_labels_from_nifti_checks_the_grid() -> None:
    volume = _volumes()[1]
    labels = (volume.hu > 0).astype(np.uint8) * 3
    img = nib.Nifti1Image(labels.transpose(2, 1, 0), ras_affine(volume))
    out = labels_from_nifti(img, volume)
    assert out.dtype == np.uint8 and np.array_equal(out, labels)

    shifted = nib.Nifti1Image(labels.transpose(2, 1, 0), ras_affine(volume) + np.eye(4) * 0)
    shifted.affine[0, 3] += 1.0
    with pytest.raises(ValueError, match="affine differs"):
        labels_from_nifti(nib.Nifti1Image(labels.transpose(2, 1, 0), shifted.affine), volume)
    with pytest.raises(ValueError, match="shape"):
        labels_from_nifti(nib.Nifti1Image(labels, ras_affine(volume)), volume)
    with pytest.raises(ValueError, match="non-integer"):
        labels_from_nifti(nib.Nifti1Image(labels.transpose(2, 1, 0) + 0.5, ras_affine(volume)), volume)
