"""Overlap and surface metrics of one segment: Dice, HD95, volume difference.

Both masks lie on the same grid (resample first: :mod:`segnode.models.evaluate`); the
grid's voxel spacing makes distances physical (millimetres).

Definitions (those of MONAI's ``DiceMetric`` and
``HausdorffDistanceMetric(percentile=95)``, which the tests check against):

* **Dice** ``2|P∩R| / (|P| + |R|)``.
* **Surface** of a mask: its voxels that a one-voxel erosion with the 6-connected
  cross removes (voxels on the array border count as surface).
* **HD95**: the 95th percentile (linear interpolation) of the distances from
  each surface voxel of one mask to the nearest surface voxel of the other, in
  mm; the larger of the two directions (symmetric).
* **Volume difference**: ``V(P) − V(R)`` in mL, and relative to ``V(R)`` in %.

Empty masks (documented, never an exception):

=================  ======  =====  ==================
pred / ref         Dice    HD95   volume diff %
=================  ======  =====  ==================
both empty         1.0     NaN    NaN
one empty          0.0     inf    −100 / NaN
=================  ======  =====  ==================

NaN means "undefined" and is left out of means and plots; inf means "no
surface to reach" (a missed or hallucinated organ) and counts as a failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: the percentile of the surface distances reported as "HD95"
HD_PERCENTILE = 95.0


@dataclass(frozen=True)
class SegmentMetrics:
    """The metrics of one segment of one case."""

    dice: float
    hd95_mm: float
    pred_ml: float
    ref_ml: float

    @property
    def volume_diff_ml(self) -> float:
        return self.pred_ml - self.ref_ml

    @property
    def volume_diff_pct(self) -> float:
        """``100 (V(P) − V(R)) / V(R)``; NaN when the reference is empty."""
        return 100.0 * self.volume_diff_ml / self.ref_ml if self.ref_ml > 0 else math.nan


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    _check_same_shape(pred, ref)
    p, r = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    if p + r == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & ref)) / (p + r)


def surface(mask: np.ndarray) -> np.ndarray:
    """The surface voxels of ``mask`` (6-connected erosion; the array border is outside)."""
    from scipy.ndimage import binary_erosion, generate_binary_structure

    structure = generate_binary_structure(mask.ndim, 1)
    return mask & ~binary_erosion(mask, structure=structure, border_value=0)


def directed_surface_distances(
    from_mask: np.ndarray, to_mask: np.ndarray, spacing: tuple[float, ...]
) -> np.ndarray:
    """Distance (mm) from each surface voxel of ``from_mask`` to the surface of ``to_mask``.

    Both masks must be non-empty.  Computed with an exact Euclidean distance
    transform over the bounding box of both masks.
    """
    from scipy.ndimage import distance_transform_edt

    box = _bounding_box(from_mask | to_mask, margin=1)
    from_surface = surface(from_mask[box])
    to_surface = surface(to_mask[box])
    distance = distance_transform_edt(~to_surface, sampling=spacing)
    return distance[from_surface]


def hausdorff_percentile(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], percentile: float = HD_PERCENTILE
) -> float:
    """Symmetric percentile Hausdorff distance in mm (NaN both empty, inf one empty)."""
    _check_same_shape(pred, ref)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return math.nan
    if not has_pred or not has_ref:
        return math.inf
    forward = directed_surface_distances(pred, ref, spacing)
    backward = directed_surface_distances(ref, pred, spacing)
    return float(max(np.percentile(forward, percentile), np.percentile(backward, percentile)))


def segment_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float], voxel_ml: float
) -> SegmentMetrics:
    """All metrics of one segment.

    Parameters
    ----------
    pred, ref:
        Boolean masks on the same grid, indexed ``[k, j, i]``.
    spacing:
        Voxel spacing in mm along the array axes ``(k, j, i)``.
    voxel_ml:
        Volume of one voxel in mL.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    return SegmentMetrics(
        dice=dice(pred, ref),
        hd95_mm=hausdorff_percentile(pred, ref, spacing),
        pred_ml=int(np.count_nonzero(pred)) * voxel_ml,
        ref_ml=int(np.count_nonzero(ref)) * voxel_ml,
    )


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _check_same_shape(pred: np.ndarray, ref: np.ndarray) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {ref.shape} (resample first)")
