"""Bone by threshold: dense voxels inside the patient, minus thick contrast lumens, plus marrow.

1. Candidates: the bone ``hu_range`` inside the body (table, head holder and
   their metal rails cut off by :func:`segnode.models.hu_regions.body_mask`).
2. Contrast-filled vessels and heart chambers reach the bone range too
   (250–500 HU in an arterial phase).  They are thick and homogeneous where
   bone is thin (cortex, ribs) or, in a vertebral body, ringed by a dense
   cortex.  Candidates deeper than :data:`VESSEL_CORE_MM` and everything of
   the candidates within that depth of them (the lumen) are dropped, except
   voxels ``≥`` :data:`CORTEX_HU` (cortex stays).
3. Components below :data:`MIN_BONE_ML` dropped (calcifications, noise).
4. Marrow, slice by slice, inside the cortical shells (cancellous bone of a
   vertebral body is 100–200 HU, fatty marrow of ribs and long bones below
   0 HU, so the threshold misses both):

   * after a closing of :data:`MARROW_CLOSE_MM`, the enclosed holes of the
     shell: a hole of at most :data:`SMALL_HOLE_MM2` whole (a rib's or a
     small bone's medullary cavity) unless it is air (below :data:`FAT_HU`),
     and one of at most :data:`FATTY_HOLE_MM2` whole when its mean is fat
     (:data:`FAT_HU` to :data:`FATTY_MARROW_HU`: a long bone's yellow marrow);
   * cancellous bone: voxels whose in-plane smoothed HU (Gaussian,
     :data:`MARROW_SMOOTH_MM`) is at least :data:`MARROW_HU`, inside a hole
     of the shell or with bone within :data:`MARROW_REACH_MM` in all four
     in-plane directions (a vertebral body whose cortex is open towards the
     canal, as at the basivertebral foramen);
   * the lumens of step 2 (one voxel around them included) only inside a
     hole of the shell (a vertebral body's dense cancellous bone), never by
     reach alone (an aorta beside the spine).

   The spinal canal (CSF and cord, about −20–60 HU, 180–300 mm²) stays open:
   too large for the small-hole rule, not fat, and below :data:`MARROW_HU`.
   The bowel is not enclosed by bone on four sides within the reach.

Bone and marrow together are brought to the source grid by re-thresholding
their outer edge (:func:`segnode.models.hu_regions.refine`); the marrow,
below the bone range by nature, is added back as it is (nearest neighbour),
so a partial-volume rim of 2 mm blocks can reach into the spinal canal beside
the arch.

Measured against TotalSegmentator's bone labels: docs/segmentation.md#hu_based.
Limits: vessels thinner than twice :data:`VESSEL_CORE_MM`, the part of a
vessel wall within that depth of bone, undiluted contrast (above
:data:`CORTEX_HU`) and a lumen inside a closed ring of calcified wall are
labelled bone; cartilage calcification and dense implants are bone too; an
intervertebral disc seen in a thick slice with its end plates is filled as
marrow.
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
#: Cancellous bone: in-plane smoothed HU at least this.
MARROW_HU = 85.0
MARROW_SMOOTH_MM = 1.5
MARROW_CLOSE_MM = 3.0
#: Bone within this distance in all four in-plane directions encloses a voxel.
MARROW_REACH_MM = 40.0
#: Enclosed holes up to this area are marrow whatever their HU (above air).
SMALL_HOLE_MM2 = 100.0
#: Enclosed holes up to this area are marrow when their mean HU is fat.
FATTY_HOLE_MM2 = 300.0
FAT_HU = -150.0
FATTY_MARROW_HU = -20.0
#: Slices per slab of the marrow fill (memory bound).
MARROW_SLAB = 32


def segment_bone(volume: Volume, hu_range: tuple[float, float]) -> tuple[np.ndarray, list[str]]:
    """Bone mask on the volume's grid, and notes on what was done."""
    grid = working_grid(volume, WORK_MM)
    body = mm.fill_holes(body_mask(grid), per_slice=True)
    candidates = in_range(grid.hu, hu_range) & body
    del body
    lumens = thick_lumens(grid, candidates)
    bone = mm.remove_small(candidates & ~lumens, grid.ml_to_voxels(MIN_BONE_ML))
    marrow = fill_marrow(grid, bone, ndimage.binary_dilation(lumens, structure=mm.CROSS_3D))
    notes = [] if bone.any() else ["no bone found in the field of view"]
    whole = refine(bone | marrow, grid, volume.hu, hu_range)
    return whole | mm.upsample(marrow, grid.factors, grid.full_shape), notes


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


def fill_marrow(grid: Grid, bone: np.ndarray, lumens: np.ndarray) -> np.ndarray:
    """The marrow inside ``bone``'s cortical shells and the gaps a closing of ``bone`` bridges at
    :data:`MARROW_HU` and above (not ``bone`` itself).

    Every step works slice by slice, so it runs on slabs of :data:`MARROW_SLAB`
    slices (bounded memory).  A lumen of :func:`thick_lumens` is marrow only
    inside a closed shell (a vertebral body's contrast-dense cancellous bone),
    never by reach alone.
    """
    marrow = np.zeros_like(bone)
    for k in range(0, bone.shape[0], MARROW_SLAB):
        part = slice(k, k + MARROW_SLAB)
        marrow[part] = marrow_of_slab(grid.hu[part], bone[part], lumens[part], grid.spacing)
    return marrow


def marrow_of_slab(hu: np.ndarray, bone: np.ndarray, lumens: np.ndarray, spacing: mm.Spacing) -> np.ndarray:
    closed = mm.close_mm(bone, MARROW_CLOSE_MM, spacing, per_slice=True)
    holes = mm.fill_holes(closed, per_slice=True) & ~closed
    shell = bone | (closed & (hu >= MARROW_HU))
    cavities = medullary_cavities(hu, holes, spacing)
    inside = holes | (enclosed(shell | cavities, spacing, MARROW_REACH_MM) & ~lumens)
    cancellous = inside & (smoothed_outside(hu, shell, spacing) >= MARROW_HU)
    return (shell | cavities | cancellous) & ~bone


def smoothed_outside(hu: np.ndarray, shell: np.ndarray, spacing: mm.Spacing) -> np.ndarray:
    """In-plane Gaussian mean (:data:`MARROW_SMOOTH_MM`) of the HU outside ``shell``: marrow's own
    HU, without the cortex's bleeding into its neighbours (the spinal canal beside the arch)."""
    sigma = [0.0, MARROW_SMOOTH_MM / spacing[1], MARROW_SMOOTH_MM / spacing[0]]
    weight = ndimage.gaussian_filter((~shell).astype(np.float32), sigma)
    total = ndimage.gaussian_filter(np.where(shell, np.float32(0), hu.astype(np.float32)), sigma)
    return total / np.maximum(weight, np.float32(1e-3))


def medullary_cavities(hu: np.ndarray, holes: np.ndarray, spacing: mm.Spacing) -> np.ndarray:
    """Enclosed holes that are marrow as a whole: small ones (not air), and fatty ones."""
    labels, count = mm.label(holes, per_slice=True)
    if count == 0:
        return np.zeros_like(holes)
    area = mm.component_sizes(labels, count) * spacing[0] * spacing[1]
    mean = mm.per_label_mean(hu, labels, count)
    fat = (mean >= FAT_HU) & (mean <= FATTY_MARROW_HU)
    whole = ((area <= SMALL_HOLE_MM2) & (mean >= FAT_HU)) | ((area <= FATTY_HOLE_MM2) & fat)
    whole[0] = False
    return whole[labels]


def enclosed(bone: np.ndarray, spacing: mm.Spacing, reach_mm: float) -> np.ndarray:
    """Voxels (not bone) with bone within ``reach_mm`` towards both row and both column ends of their slice."""
    out = ~bone
    for axis, step in ((2, spacing[0]), (1, spacing[1])):
        for forward in (True, False):
            out &= distance_along(bone, axis, forward) * step <= reach_mm
    return out


def distance_along(mask: np.ndarray, axis: int, forward: bool) -> np.ndarray:
    """Voxels from each voxel to the nearest ``mask`` voxel behind it along ``axis`` (ahead:
    ``forward`` False); at least :data:`_FAR` where there is none.  int16: axes up to 16383."""
    n = mask.shape[axis]
    index = np.arange(n, dtype=np.int16).reshape([n if a == axis else 1 for a in range(mask.ndim)])
    if forward:
        last = np.maximum.accumulate(np.where(mask, index, np.int16(-_FAR)), axis=axis)
        return index - last
    ahead = np.flip(np.where(mask, index, np.int16(_FAR)), axis=axis)
    return np.flip(np.minimum.accumulate(ahead, axis=axis), axis=axis) - index


#: "no mask voxel on this side" in :func:`distance_along`
_FAR = 2**14
