"""Figures measured on a label map over its CT: per segment, voxels, volume and mean HU."""

from __future__ import annotations

from typing import Any

import numpy as np
from segnode.models.volume import LabelMap, Volume


def segment_statistics(volume: Volume, labels: LabelMap) -> list[dict[str, Any]]:
    """Per segment: voxel count, volume in mL and mean HU (chunked: bounded memory)."""
    n = max(labels.labels, default=0) + 1
    counts = np.zeros(n, dtype=np.int64)
    sums = np.zeros(n, dtype=np.float64)
    for k in range(0, volume.shape[0], 32):
        lab = labels.array[k : k + 32].ravel()
        counts += np.bincount(lab, minlength=n)[:n]
        sums += np.bincount(lab, weights=volume.hu[k : k + 32].ravel(), minlength=n)[:n]
    voxel_ml = volume.voxel_volume_ml
    return [
        {
            "segment_number": value,
            "tissue": name,
            "voxels": int(counts[value]),
            "volume_ml": round(float(counts[value]) * voxel_ml, 3),
            "mean_hu": round(float(sums[value] / counts[value]), 1) if counts[value] else None,
            "empty": not counts[value],
        }
        for value, name in sorted(labels.labels.items())
    ]
