"""Encode a :class:`LabelMap` as NIfTI (for research tools; not sent to a PACS)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from segnode.models.volume import LabelMap, Volume
from segnode.node.writers.common import EncodedResult
from segnode.profiles.schema import Profile

logger = logging.getLogger(__name__)


def write_nifti(volume: Volume, labels: LabelMap, profile: Profile, out_dir: Path, *, name: str | None = None) -> EncodedResult:
    """Write the label map as NIfTI on a regular orthonormal grid (RAS affine).

    A tilted or unevenly spaced series is resampled (nearest neighbour) onto
    such a grid, with a note in the log and in :attr:`EncodedResult.note`: one
    affine cannot place its slices where they were acquired.
    """
    import nibabel as nib
    from segnode.models.io_nifti import regular_nifti

    image, note = regular_nifti(volume, labels.array.astype(np.uint8), labels=True)
    if note:
        logger.info("NIfTI labels %s", note)
    image.header.set_intent("label")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name or (volume.source.series_instance_uid if volume.source else "volume")
    path = out_dir / f"labels_{profile.organ}_{stem}.nii.gz"
    nib.save(image, path)
    return EncodedResult(path=path, kind="nifti", note=note or "")
