"""Series shapes every output is tested on, and volumes computed from the written files' geometry.

Each shape is written as real single-frame CT files; its label map is drawn per
file (so the test knows which file every labelled voxel sits on).  The reference
volumes come from the files alone: the ImagePositionPatient of every file
projected on the normal of its ImageOrientationPatient, PixelSpacing, and
SliceThickness for a single slice; nothing of segnode's geometry code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from tests.phantoms import write_ct_series, write_tilted_uneven_series

SHAPES = ("regular", "uneven", "tilted", "tilted_uneven", "single_slice", "non_square")

#: the test profile's segments (tests/output_fixtures.py PROFILE_YAML): two drawn, one left empty
SEGMENTS = {1: "aorta", 2: "vertebrae_t12", 3: "iliac_artery_left"}


@dataclass(frozen=True)
class WrittenShape:
    """One written series: its files (in the order written) and the label map drawn on each file."""

    name: str
    paths: list[Path]
    labels: np.ndarray  # [file, row, column], the file order of ``paths``


def _labels(slices: int, rows: int, columns: int) -> np.ndarray:
    """Segment 1: a disk growing slice by slice; 2: a block on the upper half of the slices only."""
    out = np.zeros((slices, rows, columns), np.uint8)
    rr, cc = np.mgrid[:rows, :columns]
    for k in range(slices):
        radius = min(rows, columns) / 6 + k
        out[k][(rr - rows / 2) ** 2 + (cc - columns / 3) ** 2 <= radius**2] = 1
        if k >= slices // 2:
            out[k, 2:7, columns - 9 : columns - 2] = 2
    return out


def _hu(labels: np.ndarray) -> np.ndarray:
    hu = np.full(labels.shape, -1000.0)
    hu[labels == 1] = 300.0
    hu[labels == 2] = 700.0
    return hu


def write_shape(name: str, folder: Path) -> WrittenShape:
    """Write the series ``name`` (one of :data:`SHAPES`) into ``folder``."""
    if name == "regular":
        labels = _labels(6, 36, 36)
        paths = write_ct_series(_hu(labels), folder, (0.8, 0.8, 2.5), (-14.0, -14.0, 10.0))
    elif name == "uneven":  # steps of 2, 5, 2, 5, 3 mm
        labels = _labels(6, 36, 36)
        paths = write_tilted_uneven_series(_hu(labels), folder, (0.8, 0.8), [0, 2, 7, 9, 14, 17], tilt_degrees=0.0)
    elif name == "tilted":  # 3 mm steps along an axis leaning 20°
        labels = _labels(6, 36, 36)
        paths = write_tilted_uneven_series(_hu(labels), folder, (0.8, 0.8), [0, 3, 6, 9, 12, 15], tilt_degrees=20.0)
    elif name == "tilted_uneven":  # the head CT of issue 22: 4 mm, then 7 mm, then 4 mm steps, tilted
        labels = _labels(7, 36, 36)
        paths = write_tilted_uneven_series(_hu(labels), folder, (0.8, 0.8), [0, 4, 8, 15, 22, 26, 30], tilt_degrees=15.0)
    elif name == "single_slice":  # SliceThickness 3 mm
        labels = _labels(1, 36, 36)
        labels[0, 2:7, 27:34] = 2
        paths = write_ct_series(_hu(labels), folder, (0.8, 0.8, 3.0), (-14.0, -14.0, 10.0))
    elif name == "non_square":  # 30 rows × 52 columns, pixels 0.9 mm (rows) by 0.6 mm (columns)
        labels = _labels(5, 30, 52)
        paths = write_ct_series(_hu(labels), folder, (0.6, 0.9, 2.0), (-15.0, -13.0, 0.0))
    else:
        raise ValueError(f"unknown shape {name}")
    return WrittenShape(name, paths, labels)


def reference_volumes_ml(shape: WrittenShape) -> dict[int, float]:
    """Volume in mL of every segment value, from the files' own geometry.

    Slices are ordered by ImagePositionPatient · normal; each counts half the
    distance to each neighbour, an end slice as far outward as inward (its one
    neighbour's distance); a single slice counts its SliceThickness.
    """
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in shape.paths]
    iop = np.asarray(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    heights = np.array([np.asarray(ds.ImagePositionPatient, float) @ normal for ds in datasets])
    order = np.argsort(heights)
    if len(datasets) == 1:
        extents = np.array([float(datasets[0].SliceThickness)])
    else:
        z = heights[order]
        extents_sorted = np.empty(len(z))
        for n in range(len(z)):
            below = z[n] - z[n - 1] if n > 0 else z[1] - z[0]
            above = z[n + 1] - z[n] if n < len(z) - 1 else z[-1] - z[-2]
            extents_sorted[n] = (below + above) / 2
        extents = np.empty(len(z))
        extents[order] = extents_sorted  # back to file order
    out: dict[int, float] = {}
    for value in SEGMENTS:
        total = 0.0
        for f, ds in enumerate(datasets):
            dy, dx = (float(v) for v in ds.PixelSpacing)
            total += int((shape.labels[f] == value).sum()) * dx * dy * extents[f] / 1000.0
        out[value] = total
    return out
