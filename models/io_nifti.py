"""Exact conversion between :class:`Volume`/:class:`LabelMap` and NIfTI images.

segnode keeps volumes in the DICOM patient system (LPS) with arrays indexed
``[k, j, i]``.  NIfTI (what nnU-Net and TotalSegmentator read) stores arrays
indexed ``[i, j, k]`` with an affine to RAS.  The two differ by a transpose of
the array and a sign flip of the first two world axes; no resampling happens,
so a round trip is exact, voxel for voxel.

The affine keeps the volume's direction as given, including the shear of a
gantry-tilted series: right for handing a volume to a backend and reading its
labels back voxel for voxel.  A NIfTI file meant to be read by others (the
``--format nifti`` output) is written with :func:`regular_nifti` instead: on a
regular orthonormal grid, resampled when the series is tilted or unevenly
spaced (:mod:`segnode.regular_grid`), so no slice is misplaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from segnode.models.volume import Volume, vec3
from segnode.regular_grid import Planes, regularize

if TYPE_CHECKING:  # pragma: no cover
    from nibabel import Nifti1Image
    from nibabel.spatialimages import SpatialImage

#: LPS → RAS (and back: the matrix is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: affine tolerance when checking that an image lies on a volume's grid (mm)
AFFINE_ATOL_MM = 1e-3


def ras_affine(volume: Volume) -> np.ndarray:
    """The NIfTI (RAS) affine of ``volume``'s grid, indexing ``(i, j, k)``."""
    return LPS_TO_RAS @ volume.affine()


def volume_to_nifti(volume: Volume, dtype: np.dtype | type | None = None) -> Nifti1Image:
    """A NIfTI image of ``volume`` (array ``[i, j, k]``, RAS affine, sform and qform set).

    Parameters
    ----------
    volume:
        The CT volume.
    dtype:
        Data type of the image; by default the volume's own (HU are
        integral in CT, so ``int16`` is lossless for them).
    """
    import nibabel as nib

    data = np.asarray(volume.hu).transpose(2, 1, 0)
    if dtype is not None:
        data = data.astype(dtype)
    img = nib.Nifti1Image(np.ascontiguousarray(data), ras_affine(volume))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=1)  # scanner coordinates
    img.set_sform(img.affine, code=1)
    return img


def array_from_nifti(img: SpatialImage, volume: Volume) -> np.ndarray:
    """The data of ``img`` as a ``[k, j, i]`` array on ``volume``'s grid.

    Raises
    ------
    ValueError
        If the image does not lie exactly on the volume's grid (shape or
        affine differ): a caller must resample explicitly, never by accident.
    """
    expected_shape = tuple(reversed(volume.shape))
    if tuple(img.shape[:3]) != expected_shape:
        raise ValueError(f"image shape {img.shape[:3]} is not the volume's {expected_shape} (i, j, k)")
    if not np.allclose(img.affine, ras_affine(volume), atol=AFFINE_ATOL_MM):
        raise ValueError(
            "image affine differs from the volume's grid:\n"
            f"{np.round(img.affine, 4)}\nexpected\n{np.round(ras_affine(volume), 4)}"
        )
    data = np.asanyarray(img.dataobj)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    return np.ascontiguousarray(data.transpose(2, 1, 0))


def labels_from_nifti(img: SpatialImage, volume: Volume) -> np.ndarray:
    """The integer labels of ``img`` as a ``uint8``/``uint16`` ``[k, j, i]`` array.

    Raises ``ValueError`` if the image is off the grid or holds non-integer or
    negative values.
    """
    data = array_from_nifti(img, volume)
    if data.dtype.kind == "f":
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise ValueError("label image holds non-integer values")
        data = rounded
    if data.size and data.min() < 0:
        raise ValueError("label image holds negative values")
    top = int(data.max()) if data.size else 0
    return data.astype(np.uint8 if top < 256 else np.uint16)


def load_nifti(path: str | Path) -> SpatialImage:
    """The image in the NIfTI file at ``path`` (``ValueError`` when it holds no spatial image)."""
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    img = nib.load(path)
    if not isinstance(img, SpatialImage):
        raise ValueError(f"{path} holds no spatial image ({type(img).__name__})")
    return img


def volume_from_nifti(img: SpatialImage) -> Volume:
    """A :class:`Volume` from a NIfTI CT image (the inverse of :func:`volume_to_nifti`).

    The data are read as stored (scaled by the header's slope/intercept when
    it has one); spacing and direction come from the affine, so a sheared
    affine gives a sheared (gantry-tilt) volume.
    """
    lps = LPS_TO_RAS @ np.asarray(img.affine, dtype=float)
    axes = lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"NIfTI affine has a zero-length axis: {img.affine}")
    direction = axes / spacing
    array = np.asanyarray(img.dataobj)  # applies the header's slope/intercept, if any
    if array.ndim != 3:
        raise ValueError(f"NIfTI image must be 3-D, got shape {array.shape}")
    return Volume(
        hu=np.ascontiguousarray(array.transpose(2, 1, 0)),
        spacing=vec3(spacing),
        origin=vec3(lps[:3, 3]),
        direction=direction,
    )


def _ras_transforms(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    native = io_orientation(ras_affine(volume))
    ras = axcodes2ornt("RAS")
    return ornt_transform(native, ras), ornt_transform(ras, native)


def to_closest_ras(array: np.ndarray, volume: Volume) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A ``[k, j, i]`` array of ``volume`` as nibabel's ``as_closest_canonical`` stores it.

    Returns the ``(x, y, z)``-indexed array (axes permuted and flipped to RAS, no
    resampling) and its spacing in that order: what a model trained on canonical
    NIfTI files (TotalSegmentator's) expects.
    """
    from nibabel.orientations import apply_orientation

    forward, _ = _ras_transforms(volume)
    spacing = vec3(volume.spacing[int(axis)] for axis in np.argsort(forward[:, 0]))
    return np.ascontiguousarray(apply_orientation(np.asarray(array).transpose(2, 1, 0), forward)), spacing


def from_closest_ras(array: np.ndarray, volume: Volume) -> np.ndarray:
    """Undo :func:`to_closest_ras`: back to ``volume``'s ``[k, j, i]``."""
    from nibabel.orientations import apply_orientation

    _, inverse = _ras_transforms(volume)
    return np.ascontiguousarray(apply_orientation(array, inverse).transpose(2, 1, 0))


def planes_of(volume: Volume) -> Planes:
    """The image planes of ``volume`` as acquired (each slice at its own position)."""
    direction = np.asarray(volume.direction, dtype=float)
    return Planes(positions=volume.slice_origins(), row=direction[:, 0], col=direction[:, 1],
                  spacing=(float(volume.spacing[0]), float(volume.spacing[1])))


def regular_nifti(volume: Volume, array: np.ndarray, *, labels: bool,
                  dtype: type | None = None) -> tuple[Nifti1Image, str | None]:
    """``array[k, j, i]`` on ``volume`` as a NIfTI on a regular orthonormal grid, and the resampling note.

    Exact (no resampling, ``note`` None) when the volume is regular; otherwise
    nearest neighbour for ``labels``, linear for images (HU filled with −1024
    outside the source).
    """
    import nibabel as nib

    grid = regularize(np.asarray(array), planes_of(volume), labels=labels, fill=0 if labels else -1024)
    data = grid.array.transpose(2, 1, 0)
    img = nib.Nifti1Image(np.ascontiguousarray(data if dtype is None else data.astype(dtype)), LPS_TO_RAS @ grid.affine_lps)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return img, grid.note
