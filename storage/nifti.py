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

#: LPS (DICOM) → RAS (NIfTI) world axes
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Grid:
    """Voxels ``[k, j, i]`` and the 4×4 LPS affine of ``(i, j, k, 1)``."""

    array: np.ndarray
    affine_lps: np.ndarray


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
    """Stack sorted slices into Hounsfield units with their affine."""
    first = slices[0]
    frames = [ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1)
              + float(ds.get("RescaleIntercept", 0) or 0) for ds in slices]
    if len({f.shape for f in frames}) != 1:
        raise InputError("the slices of the series differ in size", where=str(first.SeriesInstanceUID))
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * col_spacing  # i: along a row, spaced by the column spacing
    affine[:3, 1] = iop[3:] * row_spacing
    origin = np.asarray(first.ImagePositionPatient, dtype=float)
    if len(slices) > 1:
        affine[:3, 2] = (np.asarray(slices[-1].ImagePositionPatient, float) - origin) / (len(slices) - 1)
    else:
        thickness = float(first.get("SliceThickness", 1) or 1)
        affine[:3, 2] = np.cross(iop[:3], iop[3:]) * thickness
    affine[:3, 3] = origin
    return Grid(np.rint(np.stack(frames)).astype(np.int16), affine)


def nifti_bytes(array_kji: np.ndarray, affine_lps: np.ndarray, dtype: type) -> bytes:
    """A gzipped NIfTI-1 of ``array_kji`` with an RAS affine and an empty description."""
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
