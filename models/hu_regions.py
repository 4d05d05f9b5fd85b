"""Regions every threshold method needs: the working grid, the body, outside air.

The threshold methods (``segnode.models.hu_based``) run their morphology on a coarse
working grid (block means, about :data:`WORK_MM` per voxel: fewer voxels and
half the noise of a thin-slice CT) and bring each mask back to the source grid
with :func:`refine`, which re-thresholds only a band around the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from segnode.models import morphology as mm
from segnode.models.volume import Volume, vec3

#: Default target voxel size of the working grid (mm); each method picks its own.
WORK_MM = 2.0
#: Above this the voxel is part of the patient or of things around them.
BODY_HU = -500.0
#: Below this a voxel is plain air (outside air, trachea, bowel gas), not lung.
DEEP_AIR_HU = -950.0
#: The body mask is found on a grid at most this fine (mm).
BODY_GRID_MM = 3.0
#: Opening radius that cuts the patient off the table, head holder, blankets.
TABLE_CUT_MM = 3.0


@dataclass(frozen=True)
class Grid:
    """The coarse working grid of a volume."""

    hu: np.ndarray  # float32 block means, [k, j, i]
    spacing: mm.Spacing  # (x, y, z) mm of the coarse grid
    factors: tuple[int, int, int]  # (k, j, i) block sizes
    full_shape: tuple[int, int, int]
    affine: np.ndarray  # 4x4, coarse index (i, j, k) → LPS mm

    @property
    def voxel_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def ml_to_voxels(self, ml: float) -> int:
        return max(1, int(round(ml / self.voxel_ml)))

    def world_x(self, k: np.ndarray, j: np.ndarray, i: np.ndarray) -> np.ndarray:
        """Patient x (LPS, + = left) at coarse indices (voxel centres of the blocks)."""
        a = self.affine
        return a[0, 0] * i + a[0, 1] * j + a[0, 2] * k + a[0, 3]


def working_grid(volume: Volume, target_mm: float = WORK_MM) -> Grid:
    factors = mm.grid_factors(volume.spacing, target_mm)
    hu = mm.downsample_mean(volume.hu, factors)
    fk, fj, fi = factors
    affine = volume.affine().copy()
    scale = np.diag([fi, fj, fk]).astype(float)
    # a coarse voxel's centre is the mean of its block's voxel centres
    shift = np.array([(fi - 1) / 2, (fj - 1) / 2, (fk - 1) / 2])
    affine[:3, 3] = affine[:3, 3] + affine[:3, :3] @ shift
    affine[:3, :3] = affine[:3, :3] @ scale
    return Grid(hu, mm.coarse_spacing(volume.spacing, factors), factors, volume.shape, affine)


def in_range(hu: np.ndarray, hu_range: tuple[float, float]) -> np.ndarray:
    lo, hi = hu_range
    return (hu >= lo) & (hu <= hi)


def body_mask(grid: Grid) -> np.ndarray:
    """The patient: largest 3-D component of ``HU > BODY_HU`` once cut off the table.

    A per-slice opening (:data:`TABLE_CUT_MM`) breaks thin contacts with the
    table, head holder and blankets; a dilation of the same size limited to
    the threshold gives back the skin the opening took.  On a grid finer than
    :data:`BODY_GRID_MM` this runs on every other voxel and the result is
    brought back and re-thresholded.  Not hole-filled.
    """
    dense = grid.hu > BODY_HU
    step = 2 if min(grid.spacing) * 2 <= BODY_GRID_MM else 1
    small = dense[::step, ::step, ::step]
    spacing = vec3(s * step for s in grid.spacing)
    opened = mm.open_mm(small, TABLE_CUT_MM, spacing, per_slice=True)
    core = mm.largest_component(opened)
    body = mm.dilate_mm(core, TABLE_CUT_MM, spacing, per_slice=True) & small
    if step == 1:
        return body
    body = ndimage.binary_dilation(body, structure=mm.CROSS_3D)
    idx = np.ix_(*(np.arange(n) // step for n in dense.shape))
    return body[idx] & dense


def outside_air(grid: Grid, air: np.ndarray) -> np.ndarray:
    """Air around the patient, per slice: air regions that reach the slice edge
    and are mostly plain air (``< DEEP_AIR_HU``).

    Lung cut by a small field of view reaches the edge too, but its voxels are
    mostly above :data:`DEEP_AIR_HU`, so it stays inside.
    """
    labels, count = mm.label(air, per_slice=True)
    if count == 0:
        return np.zeros_like(air)
    sizes = mm.component_sizes(labels, count)
    deep = mm.per_label_fraction(grid.hu < DEEP_AIR_HU, labels, sizes) > 0.5
    edge = np.zeros(count + 1, dtype=bool)
    edge[mm.border_labels(labels, per_slice=True)] = True
    outside = deep & edge
    outside[0] = False
    return outside[labels]


def touching_fraction(component: np.ndarray, region: np.ndarray) -> float:
    """Fraction of the voxels just outside ``component`` that lie in ``region``."""
    sl = mm.bounding_box(component, pad=1)
    if sl is None:
        return 0.0
    comp = component[sl]
    shell = ndimage.binary_dilation(comp, structure=mm.CROSS_3D) & ~comp
    total = int(shell.sum())
    return float((shell & region[sl]).sum()) / total if total else 0.0


def refine(mask: np.ndarray, grid: Grid, hu: np.ndarray, hu_range: tuple[float, float]) -> np.ndarray:
    """Bring a coarse mask to the source grid.

    The coarse interior is kept as is (vessels inside a lung stay lung); in a
    one-voxel band around the coarse boundary each source voxel is
    re-thresholded with ``hu_range``.  On a grid that was not coarsened the
    mask is returned unchanged.
    """
    if grid.factors == (1, 1, 1):
        return mask
    out = np.zeros(grid.full_shape, dtype=bool)
    box = mm.bounding_box(mask, pad=2)
    if box is None:
        return out
    sub = mask[box]
    outer = ndimage.binary_dilation(sub, structure=mm.CROSS_3D)
    inner = ndimage.binary_erosion(sub, structure=mm.CROSS_3D, border_value=1)
    full_box = tuple(slice(s.start * f, min(s.stop * f, n)) for s, f, n in zip(box, grid.factors, grid.full_shape))
    idx = np.ix_(*(np.arange(b.start, b.stop) // f - s.start for b, f, s in zip(full_box, grid.factors, box)))
    band = (outer & ~inner)[idx]
    band &= in_range(hu[full_box], hu_range)
    out[full_box] = inner[idx] | band
    return out
