"""Typed image volumes and label maps exchanged between loaders, backends and writers.

Arrays are indexed ``[slice, row, column]`` (``k, j, i``).  The geometry is the
DICOM patient coordinate system (LPS, millimetres): the world position of voxel
``(i, j, k)`` is ``origin + direction @ (spacing * (i, j, k))``.  ``direction``
holds unit column vectors for the ``i`` (along a row), ``j`` (down a column)
and ``k`` (slice) axes; it is orthonormal except for gantry-tilted series,
where the slice axis is sheared and the source images are still overlaid
exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, SupportsFloat

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from pydicom import Dataset


def vec3(values: Iterable[SupportsFloat]) -> tuple[float, float, float]:
    """Three floats (a spacing, an origin, a position) from three numbers of any kind (``ValueError`` otherwise)."""
    x, y, z = (float(v) for v in values)
    return x, y, z


@dataclass(frozen=True)
class SourceSeries:
    """Where a volume came from, for the SEG references.

    ``datasets`` are the source headers (pixel data dropped) in volume slice
    order.  For a multi-frame source it holds the one dataset, and
    ``frame_order[k]`` is the (0-based) source frame of volume slice ``k``.
    """

    series_instance_uid: str
    study_instance_uid: str
    datasets: tuple["Dataset", ...]
    files: tuple[Path, ...] = ()
    frame_order: tuple[int, ...] | None = None

    @property
    def multiframe(self) -> bool:
        return self.frame_order is not None


@dataclass(frozen=True)
class Volume:
    """A CT volume in Hounsfield units with its patient-space geometry."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    source: SourceSeries | None = None
    notes: tuple[str, ...] = ()
    #: LPS position of voxel (0, 0) of every slice as acquired, when known (DICOM
    #: sources); differs from the affine's for unevenly spaced series
    slice_positions: tuple[tuple[float, float, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"volume must be 3-D, got shape {self.hu.shape}")
        if np.asarray(self.direction).shape != (3, 3):
            raise ValueError("direction must be a 3x3 matrix")
        if min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing}")

    @property
    def shape(self) -> tuple[int, int, int]:
        k, j, i = self.hu.shape
        return int(k), int(j), int(i)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel of the affine grid in millilitres (sheared grids too).

        The grid's median step: wrong for unevenly spaced series and a single
        slice; measure volumes with :meth:`slice_voxel_ml`
        (:func:`segnode.models.measurements.label_volumes_ml`).
        """
        axes = np.asarray(self.direction) * np.asarray(self.spacing)
        return float(abs(np.linalg.det(axes))) / 1000.0

    def affine(self) -> np.ndarray:
        """4x4 matrix mapping ``(i, j, k, 1)`` to LPS millimetres."""
        out = np.eye(4)
        out[:3, :3] = np.asarray(self.direction) * np.asarray(self.spacing)
        out[:3, 3] = self.origin
        return out

    def slice_origins(self) -> np.ndarray:
        """``(k, 3)`` LPS position of voxel ``(0, 0)`` of each slice: as acquired when known."""
        if self.slice_positions is not None:
            return np.asarray(self.slice_positions, dtype=float)
        aff = self.affine()
        return aff[:3, 3] + np.arange(self.shape[0])[:, None] * aff[:3, 2]

    def slice_normal(self) -> np.ndarray:
        """Unit normal of the image planes (row axis × column axis), LPS."""
        direction = np.asarray(self.direction, dtype=float)
        normal = np.cross(direction[:, 0], direction[:, 1])
        return normal / np.linalg.norm(normal)

    def slice_extents_mm(self) -> np.ndarray:
        """``(k,)`` thickness in mm that each slice stands for, along the plane normal.

        Each slice reaches half-way to each neighbour, the distances taken
        between slice origins projected on the normal (so a tilted or unevenly
        spaced series is measured as acquired).  An end slice reaches as far
        outward as inward: its extent is the distance to its one neighbour, so
        a regular grid gives every slice its step (voxel count × step, what
        every reader computes) and a stack of SliceThickness values that
        disagree with the spacing (overlapping reconstructions) cannot inflate
        it.  A single slice has no neighbour: its extent is its
        :meth:`single_slice_thickness_mm`.
        """
        heights = self.slice_origins() @ self.slice_normal()
        if len(heights) == 1:
            return np.array([self.single_slice_thickness_mm()[0]])
        gaps = np.abs(np.diff(heights))
        below = np.concatenate([gaps[:1], gaps])  # first slice: as far out as to its neighbour
        above = np.concatenate([gaps, gaps[-1:]])  # last slice: likewise
        return (below + above) / 2.0

    def single_slice_thickness_mm(self) -> tuple[float, str]:
        """The extent of a one-slice volume and a note on where it came from.

        The source's SliceThickness when it states one; else the grid's slice
        step projected on the normal (the NIfTI pixdim, or the 1 mm a DICOM
        loader assumes), with a note saying so.
        """
        stated = source_slice_thickness(self.source) if self.source is not None else None
        if stated is not None:
            return stated, ""
        step = abs(float(np.asarray(self.direction, dtype=float)[:, 2] @ self.slice_normal())) * self.spacing[2]
        why = "no SliceThickness in the source" if self.source is not None else "no DICOM source"
        return step, f"single slice, {why}: measured {step:g} mm thick"

    def slice_voxel_ml(self) -> np.ndarray:
        """``(k,)`` volume in mL of one voxel of each slice: in-plane area × the slice's extent."""
        direction = np.asarray(self.direction, dtype=float)
        area = np.linalg.norm(np.cross(direction[:, 0] * self.spacing[0], direction[:, 1] * self.spacing[1]))
        return area * self.slice_extents_mm() / 1000.0

    def is_regular(self, atol_mm: float = 1e-3) -> bool:
        """True when the affine is orthonormal (no shear) and places every slice where it was acquired."""
        direction = np.asarray(self.direction, dtype=float)
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-6):
            return False
        aff = self.affine()
        expected = aff[:3, 3] + np.arange(self.shape[0])[:, None] * aff[:3, 2]
        return bool(np.allclose(self.slice_origins(), expected, atol=atol_mm))

    def world_x(self) -> np.ndarray:
        """Patient x (right → left, LPS) of every voxel, shape ``(k, j, i)``.

        Left/right decisions use this, never the array index, so a flipped or
        rotated acquisition still gets the patient's left labelled left.
        """
        aff = self.affine()
        k, j, i = (np.arange(n, dtype=np.float32) for n in self.shape)
        return (
            aff[0, 0] * i[None, None, :]
            + aff[0, 1] * j[None, :, None]
            + aff[0, 2] * k[:, None, None]
            + aff[0, 3]
        ).astype(np.float32)


@dataclass(frozen=True)
class LabelMap:
    """Integer labels on the grid of a :class:`Volume`.

    ``labels`` maps each label value (1..N) to the tissue name it stands for;
    0 is background.  Backends return one, the SEG writer consumes one.
    """

    array: np.ndarray
    labels: dict[int, str]
    backend: str
    model_version: str = ""
    weights_hash: str = ""
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"label map must be 3-D, got shape {self.array.shape}")
        if 0 in self.labels:
            raise ValueError("label 0 is background and cannot name a tissue")

    def mask(self, name: str) -> np.ndarray:
        value = next(v for v, n in self.labels.items() if n == name)
        return self.array == value


def source_slice_thickness(source: SourceSeries) -> float | None:
    """The first positive SliceThickness the source states (a multi-frame's Pixel Measures too)."""
    for ds in source.datasets:
        items = [ds]
        for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            for frame in ds.get(group) or []:
                items += list(frame.get("PixelMeasuresSequence") or [])
        for item in items:
            value = item.get("SliceThickness")
            if value not in (None, "") and float(value) > 0:
                return float(value)
    return None
