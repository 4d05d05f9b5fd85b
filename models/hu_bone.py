"""Bone by threshold: dense voxels inside the patient, minus thick contrast lumens.

1. Candidates: the bone ``hu_range`` inside the body (table, head holder and
   their metal rails cut off by :func:`segnode.models.hu_regions.body_mask`).
2. Contrast-filled vessels and heart chambers reach the bone range too
   (250–500 HU in an arterial phase).  They are thick and homogeneous where
   bone is thin (cortex, ribs) or, in a vertebral body, ringed by a dense
   cortex.  Candidates deeper than :data:`VESSEL_CORE_MM` and everything of
   the candidates within that depth of them (the lumen) are dropped, except
   voxels ``≥`` :data:`CORTEX_HU` (cortex stays).  What a vertebral body loses
   this way comes back in step 4 as marrow inside its cortical ring.
3. Components below :data:`MIN_BONE_ML` dropped (calcifications, noise).
4. Marrow: after a per-slice closing of :data:`MARROW_CLOSE_MM`, holes in a
   slice are filled when their mean HU is at least :data:`MARROW_HU`
   (trabecular bone below the threshold) or when they are tiny; the spinal
   canal (CSF/cord, ~0–40 HU) and fatty marrow stay open.

Limits: vessels thinner than twice :data:`VESSEL_CORE_MM`, the part of a
vessel wall within that depth of bone, undiluted contrast (above
:data:`CORTEX_HU`) and a lumen inside a closed ring of calcified wall are
labelled bone; cartilage calcification and dense implants are bone too.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from segnode.models import morphology as mm
from segnode.models.hu_regions import Grid, body_mask, in_range, refine, working_grid
from segnode.models.volume import Volume

#: Working grid (mm): ribs and cortex are thin, so finer than for lungs.
WORK_MM = 1.5
CORTEX_HU = 600.0
VESSEL_CORE_MM = 5.0
LUMEN_GRID_MM = 3.2
MIN_BONE_ML = 0.1
MARROW_HU = 100.0
MARROW_CLOSE_MM = 3.0
TINY_HOLE_MM2 = 10.0


def segment_bone(volume: Volume, hu_range: tuple[float, float]) -> tuple[np.ndarray, list[str]]:
    """Bone mask on the volume's grid, and notes on what was done."""
    grid = working_grid(volume, WORK_MM)
    body = mm.fill_holes(body_mask(grid), per_slice=True)
    candidates = in_range(grid.hu, hu_range) & body
    del body
    bone = candidates & ~thick_lumens(grid, candidates)
    bone = mm.remove_small(bone, grid.ml_to_voxels(MIN_BONE_ML))
    bone = fill_marrow(grid, bone)
    notes = [] if bone.any() else ["no bone found in the field of view"]
    return refine(bone, grid, volume.hu, hu_range), notes


def thick_lumens(grid: Grid, candidates: np.ndarray) -> np.ndarray:
    """Candidates at least :data:`VESSEL_CORE_MM` deep, grown back by that depth, minus cortex.

    On a grid finer than :data:`LUMEN_GRID_MM` this runs on every other voxel
    (a lumen this thick loses nothing there) and is brought back, one voxel
    wider, limited to the candidates.
    """
    step = 2 if 2 * min(grid.spacing) <= LUMEN_GRID_MM else 1
    small = candidates[::step, ::step, ::step]
    steps = max(1, int(round(VESSEL_CORE_MM / (step * min(grid.spacing)))))
    cores = ndimage.binary_erosion(small, structure=mm.CROSS_3D, iterations=steps, border_value=1)
    if not cores.any():
        return np.zeros_like(candidates)
    lumens = ndimage.binary_dilation(cores, structure=mm.CROSS_3D, iterations=steps + 1, mask=small)
    if step > 1:
        lumens = ndimage.binary_dilation(lumens, structure=mm.CROSS_3D)
        lumens = lumens[np.ix_(*(np.arange(n) // step for n in candidates.shape))]
    return lumens & candidates & (grid.hu < CORTEX_HU)


def fill_marrow(grid: Grid, bone: np.ndarray) -> np.ndarray:
    """Bone plus the holes of its per-slice closing that look like marrow."""
    tiny = max(1, int(TINY_HOLE_MM2 / (grid.spacing[0] * grid.spacing[1])))

    def marrow(holes: np.ndarray, ids: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
        count = int(ids.max())
        inside = holes > 0
        mean = mm.per_label_mean(grid.hu[box], holes, count, within=inside)[ids]
        size = np.bincount(holes[inside], minlength=count + 1)[ids]
        return (mean >= MARROW_HU) | (size <= tiny)

    closed = mm.close_mm(bone, MARROW_CLOSE_MM, grid.spacing, per_slice=True)
    filled = mm.fill_holes(closed, per_slice=True, keep_hole=marrow)
    return bone | (filled & ~closed) | (closed & (grid.hu >= MARROW_HU))
