"""Figures measured on a label map over its CT: per segment, voxels, volume and mean HU.

Every volume segnode reports (the SR, the run summary, QC, ``segnode run``'s
print) comes from :func:`label_volumes_ml`: each voxel counts with the extent of
its own slice along the plane normal (:meth:`Volume.slice_voxel_ml`), so an
unevenly spaced, gantry-tilted or single-slice series is measured as acquired.
"""

from __future__ import annotations

import logging
from typing import TypedDict

import numpy as np
from segnode.models.volume import LabelMap, Volume

logger = logging.getLogger(__name__)

#: slices per chunk: bounded memory on large series
CHUNK = 32


class SegmentStatistics(TypedDict):
    """One segment's figures, as the summary JSON and the SR writer take them."""

    segment_number: int
    tissue: str
    voxels: int
    volume_ml: float
    mean_hu: float | None
    empty: bool


def label_volumes_ml(volume: Volume, array: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Voxel counts and volumes in mL of the values ``0..n-1`` of ``array`` (on ``volume``'s grid).

    Each slice's voxels count with that slice's own voxel volume.
    """
    if array.shape != volume.shape:
        raise ValueError(f"label array shape {array.shape} differs from the volume {volume.shape}")
    voxel_ml = volume.slice_voxel_ml()
    counts = np.zeros(n, dtype=np.int64)
    ml = np.zeros(n, dtype=np.float64)
    for k in range(volume.shape[0]):
        per_slice = np.bincount(array[k].ravel(), minlength=n)[:n]
        counts += per_slice
        ml += per_slice * voxel_ml[k]
    return counts, ml


def mask_volume_ml(volume: Volume, mask: np.ndarray) -> float:
    """Volume in mL of the true voxels of ``mask``."""
    per_slice = mask.reshape(mask.shape[0], -1).sum(axis=1)
    return float(per_slice @ volume.slice_voxel_ml())


def segment_statistics(volume: Volume, labels: LabelMap) -> list[SegmentStatistics]:
    """Per segment: voxel count, volume in mL (3 decimals) and mean HU (0.1 HU)."""
    n = max(labels.labels, default=0) + 1
    counts, ml = label_volumes_ml(volume, labels.array, n)
    sums = np.zeros(n, dtype=np.float64)
    for k in range(0, volume.shape[0], CHUNK):
        lab = labels.array[k : k + CHUNK].ravel()
        sums += np.bincount(lab, weights=volume.hu[k : k + CHUNK].ravel(), minlength=n)[:n]
    if volume.shape[0] == 1:
        note = volume.single_slice_thickness_mm()[1]
        if note:
            logger.warning("%s", note)
    return [
        SegmentStatistics(
            segment_number=value,
            tissue=name,
            voxels=int(counts[value]),
            volume_ml=round(float(ml[value]), 3),
            mean_hu=round(float(sums[value] / counts[value]), 1) if counts[value] else None,
            empty=not counts[value],
        )
        for value, name in sorted(labels.labels.items())
    ]
