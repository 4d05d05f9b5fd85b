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

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from pydicom import Dataset


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
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (exact for sheared grids too)."""
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
