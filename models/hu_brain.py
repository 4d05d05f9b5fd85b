"""Brain and its shell by threshold on a head CT.

1. Head: the body mask (:func:`segnode.models.hu_regions.body_mask`: table and head
   holder cut off), holes filled per slice and in 3-D.
2. Intracranial cavity: skull (``HU ≥`` :data:`SKULL_HU` inside the head)
   closed per slice by :data:`SKULL_CLOSE_MM` to bridge sutures and thin
   bone, then the holes of each slice's skull ring.
3. Brain: cavity ∩ the brain ``hu_range``, largest 3-D component, smoothed
   by a small closing inside the cavity, holes filled (ventricles, clots).
   It must look like a brain (:data:`MIN_BRAIN_SLICE_MM2` in its largest
   slice, :data:`MIN_CAVITY_FILL` of its cavity); otherwise brain *and*
   shell are empty (a spinal canal in a chest CT is a closed ring too, and
   a shell without a brain would be the whole body).
4. Shell: head ∩ the shell ``hu_range`` minus brain: scalp, skull, face, neck,
   everything of the head that is not brain and not air.

Limits: slices through the skull base, where the bone ring is open
(foramen magnum, orbits), get a partial or no cavity; the brain there is
missed and counted as shell.
"""

from __future__ import annotations

import numpy as np

from segnode.models import morphology as mm
from segnode.models.hu_regions import BODY_HU, body_mask, in_range, refine, working_grid
from segnode.models.volume import Volume

#: Working grid (mm); boundaries are refined on the source grid.
WORK_MM = 2.0
SKULL_HU = 300.0
SKULL_CLOSE_MM = 4.0
BRAIN_SMOOTH_MM = 2.0
MIN_BRAIN_SLICE_MM2 = 2500.0
MIN_CAVITY_FILL = 0.5


def segment_brain(
    volume: Volume, brain_range: tuple[float, float], shell_range: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Brain and shell masks on the volume's grid, and notes on what was done."""
    grid = working_grid(volume, WORK_MM)
    head = mm.fill_holes(mm.fill_holes(body_mask(grid), per_slice=True))
    cavity = intracranial_cavity(grid.hu, head, grid.spacing)
    brain = mm.largest_component(cavity & in_range(grid.hu, brain_range))
    brain = mm.close_mm(brain, BRAIN_SMOOTH_MM, grid.spacing, per_slice=True) & cavity
    brain = mm.fill_holes(mm.fill_holes(brain, per_slice=True))
    if not brain.any() or not _looks_like_brain(brain, cavity, grid.spacing):
        note = "no intracranial cavity of brain size (not a head CT, or skull out of view): brain and shell empty"
        empty = np.zeros(volume.shape, dtype=bool)
        return empty, empty.copy(), [note]
    brain_full = refine(brain, grid, volume.hu, brain_range)
    head_full = refine(head, grid, volume.hu, (BODY_HU, np.inf))
    shell_full = head_full & in_range(volume.hu, shell_range) & ~brain_full
    return brain_full, shell_full, []


def intracranial_cavity(hu: np.ndarray, head: np.ndarray, spacing: mm.Spacing) -> np.ndarray:
    """Voxels enclosed by the skull in their slice (the skull itself excluded)."""
    skull = (hu >= SKULL_HU) & head
    closed = mm.close_mm(skull, SKULL_CLOSE_MM, spacing, per_slice=True)
    return mm.fill_holes(closed, per_slice=True) & ~closed


def _looks_like_brain(brain: np.ndarray, cavity: np.ndarray, spacing: mm.Spacing) -> bool:
    pixel_mm2 = spacing[0] * spacing[1]
    largest_slice_mm2 = float(brain.sum(axis=(1, 2)).max()) * pixel_mm2
    fill = float(brain.sum()) / max(float(cavity.sum()), 1.0)
    return largest_slice_mm2 >= MIN_BRAIN_SLICE_MM2 and fill >= MIN_CAVITY_FILL
