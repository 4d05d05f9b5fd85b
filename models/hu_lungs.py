"""Lungs by threshold: aerated regions inside the patient, split into left and right.

1. Air (``HU ≤`` the lung range's top) that is not outside air
   (:func:`segnode.models.hu_regions.outside_air`, per slice, so an airway open to the
   mouth in a few slices does not join the lungs to the room).
2. Its 3-D components; a lung is one of at least :data:`MIN_LUNG_ML` whose
   voxels are mostly above :data:`~segnode.models.hu_regions.DEEP_AIR_HU` (bowel gas,
   sinuses and the table's foam are plain air) and that is wrapped by the
   body (a table core is wrapped by the table).
3. Left/right: two components → by patient x of their centroids.  One
   component (lungs joined by the trachea or an anterior junction) → eroded
   until it falls in two, each part grown back inside the lung; what the
   growth does not reach (trachea, main bronchi) is dropped.  One lung only
   → by its side of the body's centre.
4. Holes (vessels) filled per slice and in 3-D; boundary re-thresholded on
   the source grid.

On a head CT nothing passes step 2 (sinus and mastoid air is plain air or
tiny), so both lungs come back empty.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from segnode.models import morphology as mm
from segnode.models.hu_regions import DEEP_AIR_HU, Grid, body_mask, outside_air, refine, touching_fraction, working_grid
from segnode.models.volume import Volume

logger = logging.getLogger(__name__)

#: Working grid (mm): lungs are large, their boundary is refined on the source grid.
WORK_MM = 2.5
MIN_LUNG_ML = 10.0
#: A lung's voxels below DEEP_AIR_HU: less than this fraction (healthy ≈ 5 %).
MAX_DEEP_FRACTION = 0.5
#: Fraction of a lung's surroundings that must be the patient's body.
MIN_BODY_CONTACT = 0.5
#: The smaller of two lungs must be at least this fraction of the larger.
MIN_SECOND_LUNG = 0.1
#: Deepest erosion tried to separate joined lungs (mm).
MAX_SPLIT_MM = 20.0


def segment_lungs(volume: Volume, hu_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Left and right lung masks on the volume's grid, and notes on what was done."""
    grid = working_grid(volume, WORK_MM)
    lo, hi = hu_range
    air = grid.hu <= hi
    candidates = air & ~outside_air(grid, air) & (grid.hu >= lo)
    del air
    body = body_mask(grid)
    lungs = lung_components(grid, candidates, body)
    notes: list[str] = []
    if not lungs.any():
        notes.append("no aerated lung found (not a chest CT, or lungs out of view)")
        empty = np.zeros(volume.shape, dtype=bool)
        return empty, empty.copy(), notes
    left, right, how = split_left_right(grid, lungs, body)
    notes.append(how)
    out = []
    for side in (left, right):
        side = mm.fill_holes(mm.fill_holes(side, per_slice=True))
        out.append(refine(side, grid, volume.hu, hu_range))
    out[1] &= ~out[0]
    return out[0], out[1], notes


def lung_components(grid: Grid, candidates: np.ndarray, body: np.ndarray) -> np.ndarray:
    """The components of ``candidates`` that look like aerated lung."""
    labels, count = mm.label(candidates)
    if count == 0:
        return np.zeros_like(candidates)
    sizes = mm.component_sizes(labels, count)
    deep = mm.per_label_fraction(grid.hu < DEEP_AIR_HU, labels, sizes)
    ok = (sizes >= grid.ml_to_voxels(MIN_LUNG_ML)) & (deep < MAX_DEEP_FRACTION)
    ok[0] = False
    for idx in np.flatnonzero(ok):
        contact = touching_fraction(labels == idx, body)
        if contact < MIN_BODY_CONTACT:
            logger.debug("air component %d (%d voxels) not wrapped by the body (%.2f)", idx, sizes[idx], contact)
            ok[idx] = False
    return ok[labels]


def split_left_right(grid: Grid, lungs: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Split lung voxels into the patient's left and right (by patient x)."""
    labels, count = mm.label(lungs)
    sizes = mm.component_sizes(labels, count)
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    if count >= 2 and sizes[order[1]] >= MIN_SECOND_LUNG * sizes[order[0]]:
        sides = _by_two_components(grid, labels, order[0], order[1])
        how = "lungs: two separate components"
    else:
        eroded = _by_erosion(grid, lungs)
        how = "lungs: joined lungs separated by erosion"
        if eroded is None:
            return (*_single_lung(grid, lungs, body), "lungs: one lung in view, side from the body centre")
        sides = eroded
    a, b = sides == 1, sides == 2
    if _centroid_x(grid, a) < _centroid_x(grid, b):
        a, b = b, a
    return a, b, how


def _by_two_components(grid: Grid, labels: np.ndarray, first: int, second: int) -> np.ndarray:
    """Seed sides from the two largest components; smaller ones join the nearer side in x."""
    xa = _centroid_x(grid, labels == first)
    xb = _centroid_x(grid, labels == second)
    middle = (xa + xb) / 2
    count = int(labels.max())
    centres = ndimage.center_of_mass(labels > 0, labels, np.arange(1, count + 1))
    side = np.zeros(count + 1, dtype=np.int8)
    for idx, (k, j, i) in enumerate(centres, start=1):
        x = grid.world_x(k, j, i)
        side[idx] = 1 if (x - middle) * (xa - middle) > 0 else 2
    side[first], side[second] = 1, 2
    return side[labels]


def _by_erosion(grid: Grid, lungs: np.ndarray) -> np.ndarray | None:
    """Erode until the lung falls in two big parts, then grow them back inside it.

    The search runs on every other voxel of the lungs' box (seeds need no
    detail); the grown sides are brought back to the grid and finished there
    with two growth steps.  Lung the growth does not reach is dropped.
    """
    box = mm.bounding_box(lungs, pad=1)
    sub = lungs[box]
    small = sub[::2, ::2, ::2]
    step_mm = 2 * min(grid.spacing)
    eroded = small
    for depth in range(1, max(1, int(MAX_SPLIT_MM / step_mm)) + 1):
        eroded = ndimage.binary_erosion(eroded, structure=mm.CROSS_3D, border_value=1)
        labels, count = mm.label(eroded)
        if count == 0:
            return None
        sizes = mm.component_sizes(labels, count)
        sizes[0] = 0
        order = np.argsort(sizes)[::-1]
        if count >= 2 and sizes[order[1]] >= MIN_SECOND_LUNG * sizes[order[0]]:
            seeds = np.zeros(count + 1, dtype=np.int8)
            seeds[order[0]], seeds[order[1]] = 1, 2
            sides_small = _grow(seeds[labels], small, 2 * depth + 2)
            idx = np.ix_(*(np.arange(n) // 2 for n in sub.shape))
            sides = _grow(np.where(sub, sides_small[idx], 0).astype(np.int8), sub, 2)
            out = np.zeros(lungs.shape, dtype=np.int8)
            out[box] = sides
            return out
    return None


def _grow(sides: np.ndarray, within: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        grown = ndimage.grey_dilation(sides, footprint=mm.CROSS_3D)
        free = within & (sides == 0)
        if not free.any():
            break
        sides = np.where(free, grown, sides)
    return sides


def _single_lung(grid: Grid, lungs: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    centre = _centroid_x(grid, body) if body.any() else _centroid_x(grid, np.ones_like(lungs))
    empty = np.zeros_like(lungs)
    return (lungs, empty) if _centroid_x(grid, lungs) > centre else (empty, lungs)


def _centroid_x(grid: Grid, mask: np.ndarray) -> float:
    k, j, i = ndimage.center_of_mass(mask)
    return float(grid.world_x(k, j, i))
