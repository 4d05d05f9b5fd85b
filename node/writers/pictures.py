"""Review pictures: an axial, a coronal and a sagittal slice through each segment's centroid, outlined.

Drawn once per job into ``review/`` of its folder (PNG, no imaging library needed).  Each
picture is resampled to a square display grid (:func:`display_size`, at least
:data:`MIN_DISPLAY` pixels) with the series' true pixel spacing and slice
thickness, so a 3 mm series' coronal is as tall as its anatomy, not 14 pixels;
the slice keeps its aspect ratio and the rest of the square is air.  Outlines are
drawn in saturated colours (:data:`PALETTE`) that stand out against bone and soft
tissue alike, one per segment in label order.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from scipy import ndimage
from segnode.models.volume import LabelMap, Volume
from segnode.node.writers.outline import RGB, SOFT_TISSUE, draw_outlines
from segnode.profiles import Profile

#: display window (centre, width) per profile; soft tissue otherwise
WINDOWS = {"lungs": (-600.0, 1500.0), "bone": (400.0, 1800.0), "brain": (40.0, 80.0)}
PLANES = ("axial", "coronal", "sagittal")
#: the smallest and largest side of a picture, in pixels
MIN_DISPLAY, MAX_DISPLAY = 384, 768
#: outline colours: each at least 200 apart between its strongest and weakest channel (never near a grey)
PALETTE: tuple[RGB, ...] = ((255, 0, 255), (0, 210, 0), (255, 60, 0), (0, 120, 255), (210, 0, 110),
                            (150, 0, 255), (255, 200, 0), (0, 200, 200))
AIR_HU = -1024.0


def write_pictures(volume: Volume, labels: LabelMap, profile: Profile, out_dir: Path) -> list[dict[str, str]]:
    """Three PNGs per non-empty segment in ``out_dir/review``; their records (tissue, plane, file name)."""
    folder = out_dir / "review"
    folder.mkdir(parents=True, exist_ok=True)
    window = WINDOWS.get(profile.organ, SOFT_TISSUE)
    colors = {value: PALETTE[n % len(PALETTE)] for n, value in enumerate(sorted(labels.labels))}
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
    """The slice through ``centre`` (k, j, i) on the square display grid, head up."""
    k, j, i = centre
    sx, sy, sz = (float(s) for s in volume.spacing)
    if plane == "axial":
        hu, lab, mm = volume.hu[k], array[k], (sy, sx)
    elif plane == "coronal":
        hu, lab, mm = volume.hu[:, j, :], array[:, j, :], (sz, sx)
    else:
        hu, lab, mm = volume.hu[:, :, i], array[:, :, i], (sz, sy)
    if plane != "axial" and np.asarray(volume.direction)[2, 2] > 0:  # slice index runs towards the head
        hu, lab = hu[::-1], lab[::-1]
    return to_display(hu, lab, mm)


def display_size(shape: tuple[int, int], mm: tuple[float, float]) -> int:
    """The side of the square grid: the slice's extent at its finest spacing, within the display limits."""
    finest = min(mm)
    native = max(shape[0] * mm[0], shape[1] * mm[1]) / finest
    return int(min(MAX_DISPLAY, max(MIN_DISPLAY, round(native))))


def to_display(hu: np.ndarray, lab: np.ndarray, mm: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """``hu`` (linear) and ``lab`` (nearest) resampled to square pixels on a square grid, centred, air around."""
    side = display_size(hu.shape, mm)
    per_px = max(hu.shape[0] * mm[0], hu.shape[1] * mm[1]) / side  # mm per display pixel
    rows = max(1, min(side, round(hu.shape[0] * mm[0] / per_px)))
    cols = max(1, min(side, round(hu.shape[1] * mm[1] / per_px)))
    zoom = (rows / hu.shape[0], cols / hu.shape[1])
    hu_d = ndimage.zoom(hu.astype(np.float32), zoom, order=1, mode="nearest", grid_mode=True)
    lab_d = ndimage.zoom(lab, zoom, order=0, mode="nearest", grid_mode=True)
    top, left = (side - hu_d.shape[0]) // 2, (side - hu_d.shape[1]) // 2
    out_hu = np.full((side, side), AIR_HU, np.float32)
    out_lab = np.zeros((side, side), lab.dtype)
    out_hu[top:top + hu_d.shape[0], left:left + hu_d.shape[1]] = hu_d
    out_lab[top:top + lab_d.shape[0], left:left + lab_d.shape[1]] = lab_d
    return out_hu, out_lab


def write_png(path: Path, rgb: np.ndarray) -> None:
    """An 8-bit RGB PNG (zlib + struct)."""
    rows, cols, _ = rgb.shape
    raw = b"".join(b"\x00" + np.ascontiguousarray(rgb[r], dtype=np.uint8).tobytes() for r in range(rows))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", cols, rows, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
                     + chunk(b"IEND", b""))
