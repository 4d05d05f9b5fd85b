"""Minimal DICOM series → volume → NIfTI conversion for the dataset store.

Written here because ``node/series.py`` (``load_series``) and
``models/io_nifti.py`` (``volume_to_nifti``) had not landed when the store was
built; it should be replaced by them once they have.  NIfTI bytes are written
without any header text (``descrip``, ``aux_file``, ``intent_name`` stay empty)
and gzipped with no file name and a zero time stamp, so the same voxels always
give the same bytes, and so the same content hash.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from segnode.errors import InputError
from segnode.regular_grid import Planes, regularize

#: LPS (DICOM) → RAS (NIfTI) world axes
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Grid:
    """Voxels ``[k, j, i]`` and the 4×4 LPS affine of ``(i, j, k, 1)``."""

    array: np.ndarray
    affine_lps: np.ndarray
    planes: Planes | None = None  # the source planes, when the series was resampled
    note: str | None = None

    def labels_on_grid(self, labels: np.ndarray) -> np.ndarray:
        """Labels ``[k, j, i]`` on the source slices → on this grid (nearest neighbour when resampled)."""
        if self.planes is None:
            return labels
        return regularize(labels, self.planes, labels=True).array


def sort_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Single-frame slices sorted along the slice normal (one orientation required)."""
    if not datasets:
        raise InputError("the series has no images")
    for ds in datasets:
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "PixelData" not in ds:
            raise InputError("an image lacks position, orientation or pixel data", where=str(ds.SOPInstanceUID))
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(datasets, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))


def series_grid(slices: Sequence[Dataset]) -> Grid:
    """Stack sorted slices into Hounsfield units on a regular grid (resampled if tilted or uneven)."""
    first = slices[0]
    frames = [ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1)
              + float(ds.get("RescaleIntercept", 0) or 0) for ds in slices]
    if len({f.shape for f in frames}) != 1:
        raise InputError("the slices of the series differ in size", where=str(first.SeriesInstanceUID))
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    hu = np.rint(np.stack(frames)).astype(np.int16)
    if len(slices) == 1:
        affine = np.eye(4)
        affine[:3, 0] = iop[:3] * col_spacing  # i: along a row, spaced by the column spacing
        affine[:3, 1] = iop[3:] * row_spacing
        affine[:3, 2] = np.cross(iop[:3], iop[3:]) * float(first.get("SliceThickness", 1) or 1)
        affine[:3, 3] = np.asarray(first.ImagePositionPatient, dtype=float)
        return Grid(hu, affine)
    planes = Planes(positions=np.array([np.asarray(ds.ImagePositionPatient, float) for ds in slices]),
                    row=iop[:3], col=iop[3:], spacing=(col_spacing, row_spacing))
    grid = regularize(hu, planes, labels=False, fill=-1024)
    return Grid(grid.array, grid.affine_lps, planes if grid.note else None, grid.note)


def nifti_bytes(array_kji: np.ndarray, affine_lps: np.ndarray, dtype: type) -> bytes:
    """A gzipped NIfTI-1 of ``array_kji`` with an RAS affine and an empty description.

    Raises :class:`InputError` for a sheared (non-orthonormal) affine: readers
    such as SimpleITK refuse it, and it stands for a grid that needs resampling.
    """
    axes = affine_lps[:3, :3] / np.linalg.norm(affine_lps[:3, :3], axis=0)
    if not np.allclose(axes.T @ axes, np.eye(3), atol=1e-4):
        raise InputError("refusing to write a NIfTI with a sheared (non-orthonormal) affine; "
                         "resample the series onto a regular grid first (storage.nifti.series_grid)")
    img = nib.Nifti1Image(np.ascontiguousarray(array_kji.transpose(2, 1, 0)).astype(dtype), _LPS_TO_RAS @ affine_lps)
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    img.header["descrip"] = b""
    img.header.set_xyzt_units("mm", "sec")
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def read_nifti(data: bytes, what: str) -> Grid:
    """Read NIfTI bytes (gzipped or not) back into ``[k, j, i]`` with an LPS affine."""
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    try:
        img = nib.Nifti1Image.from_bytes(raw)
    except (ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise InputError(f"not a readable NIfTI-1 image: {exc}", where=what) from exc
    array = np.asanyarray(img.dataobj)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(f"expected a 3-D image, got shape {array.shape}", where=what)
    return Grid(np.ascontiguousarray(array.transpose(2, 1, 0)), _LPS_TO_RAS @ img.affine)
