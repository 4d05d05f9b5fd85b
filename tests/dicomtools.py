"""Helpers around real DICOM validators and readers used by many tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
from segnode.models.volume import Volume


def dciodvfy(path: Path) -> list[str]:
    """Run dicom3tools' ``dciodvfy``; return its error lines (warnings ignored)."""
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy (Debian dicom3tools) is required: make peers"
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def seg_labelmap_on_source(seg_path: Path, volume: Volume) -> np.ndarray:
    """Read a SEG back with highdicom onto the source grid of ``volume`` (slice order)."""
    seg = hd.seg.segread(seg_path)
    source = volume.source
    assert source is not None
    if source.multiframe:
        ds = source.datasets[0]
        frames = [i + 1 for i in source.frame_order]  # volume slice k ↔ source frame
        return seg.get_pixels_by_source_frame(
            source_sop_instance_uid=ds.SOPInstanceUID,
            source_frame_numbers=frames,
            combine_segments=True,
            assert_missing_frames_are_empty=True,
        )
    uids = [ds.SOPInstanceUID for ds in source.datasets]
    return seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
