"""A gantry-tilted, unevenly spaced head CT like the one in issue 14 (shared by geometry tests).

40 axial slices of the head phantom, the slice axis tilted 20° towards y;
steps of 4 mm, except 7 mm from slice 15 to 28, whose SliceThickness is 7 mm
(4 mm elsewhere).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from tests.phantoms import head_phantom, write_tilted_uneven_series

SLICES = 40
THICK = range(15, 29)  # slices with 7 mm thickness and 7 mm steps before them


def offsets() -> list[float]:
    out = [0.0]
    for k in range(1, SLICES):
        out.append(out[-1] + (7.0 if k in THICK else 4.0))
    return out


def write_tilted_head(folder: Path, *, tilt_degrees: float = 20.0) -> list[Path]:
    """Write the series into ``folder``; returns the files in slice order."""
    phantom = head_phantom((SLICES, 64, 64), (3.6, 3.6, 4.0), noise_sd=0.0)
    paths = write_tilted_uneven_series(phantom.volume.hu, folder, (3.6, 3.6), offsets(), tilt_degrees=tilt_degrees)
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.SliceThickness = "7" if k in THICK else "4"
        ds.save_as(path)
    return paths


def source_voxel_centres(paths: list[Path]) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """LPS centre of every voxel ``[k, j, i, xyz]`` from each file's own IPP/IOP/PixelSpacing."""
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    first = datasets[0]
    rows, cols = int(first.Rows), int(first.Columns)
    out = np.empty((len(datasets), rows, cols, 3))
    for k, ds in enumerate(datasets):
        row = np.asarray(ds.ImageOrientationPatient[:3], float)
        col = np.asarray(ds.ImageOrientationPatient[3:], float)
        dy, dx = (float(v) for v in ds.PixelSpacing)
        j, i = np.mgrid[0:rows, 0:cols]
        out[k] = np.asarray(ds.ImagePositionPatient, float) + i[..., None] * dx * row + j[..., None] * dy * col
    return out, datasets
