"""Review pictures: an axial, a coronal and a sagittal slice through each segment's centroid, outlined.

Drawn once per job into ``review/`` of its folder (PNG, no imaging library needed).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from segnode.models.volume import LabelMap, Volume
from segnode.node.writers.outline import SOFT_TISSUE, draw_outlines
from segnode.profiles import Profile

#: display window (centre, width) per profile; soft tissue otherwise
WINDOWS = {"lungs": (-600.0, 1500.0), "bone": (400.0, 1800.0), "brain": (40.0, 80.0)}
PLANES = ("axial", "coronal", "sagittal")



def write_pictures(volume: Volume, labels: LabelMap, profile: Profile, out_dir: Path) -> list[dict[str, str]]:
    """Three PNGs per non-empty segment in ``out_dir/review``; their records (tissue, plane, file name)."""
    folder = out_dir / "review"
    folder.mkdir(parents=True, exist_ok=True)
    window = WINDOWS.get(profile.organ, SOFT_TISSUE)
    colors = {value: profile.tissue(name).color for value, name in labels.labels.items()}
    records = []
    for value, name in sorted(labels.labels.items()):
        where = np.nonzero(labels.array == value)
        if not where[0].size:
            continue
        k, j, i = (int(round(float(axis.mean()))) for axis in where)
        centre = (k, j, i)
        for plane in PLANES:
            hu, lab = _plane(volume, labels.array, plane, centre)
            file = f"{name}_{plane}.png"
            write_png(folder / file, draw_outlines(hu, lab, colors, window=window, thickness=2))
            records.append({"tissue": name, "plane": plane, "file": f"review/{file}"})
    return records


def _plane(volume: Volume, array: np.ndarray, plane: str, centre: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The slice through ``centre`` (k, j, i); coronal and sagittal stretched to square pixels, head up."""
    k, j, i = centre
    if plane == "axial":
        return volume.hu[k], array[k]
    hu, lab = (volume.hu[:, j, :], array[:, j, :]) if plane == "coronal" else (volume.hu[:, :, i], array[:, :, i])
    in_plane = volume.spacing[0] if plane == "coronal" else volume.spacing[1]
    repeat = max(1, int(round(volume.spacing[2] / in_plane)))
    hu, lab = np.repeat(hu, repeat, axis=0), np.repeat(lab, repeat, axis=0)
    if np.asarray(volume.direction)[2, 2] > 0:  # slice index runs towards the head: put the head on top
        hu, lab = hu[::-1], lab[::-1]
    return hu, lab


def write_png(path: Path, rgb: np.ndarray) -> None:
    """An 8-bit RGB PNG (zlib + struct)."""
    rows, cols, _ = rgb.shape
    raw = b"".join(b"\x00" + np.ascontiguousarray(rgb[r], dtype=np.uint8).tobytes() for r in range(rows))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", cols, rows, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
                     + chunk(b"IEND", b""))
