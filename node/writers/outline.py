"""Burn segment outlines into greyscale CT slices (overlay series, review pictures).

Pure numpy/scipy on one 2D slice at a time: memory stays at a few slices.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

RGB = tuple[int, int, int]

#: soft-tissue window (centre, width) in HU
SOFT_TISSUE = (40.0, 400.0)


def window_to_gray(hu: np.ndarray, window: tuple[float, float] = SOFT_TISSUE) -> np.ndarray:
    """HU → uint8 grey through a (centre, width) window."""
    centre, width = window
    low = centre - width / 2
    scaled = (hu.astype(np.float32) - low) * (255.0 / max(width, 1e-6))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """The boundary pixels of a 2D boolean ``mask`` (inside edge, ``thickness`` pixels)."""
    if not mask.any():
        return mask
    inner = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
    return mask & ~inner


def draw_outlines(
    hu_slice: np.ndarray,
    label_slice: np.ndarray,
    colors: Mapping[int, RGB],
    *,
    window: tuple[float, float] = SOFT_TISSUE,
    thickness: int = 1,
) -> np.ndarray:
    """An (rows, columns, 3) uint8 RGB picture: the windowed slice with each label's outline in its colour."""
    gray = window_to_gray(hu_slice, window)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    for value, color in colors.items():
        edge = outline(label_slice == value, thickness)
        if edge.any():
            rgb[edge] = color
    return rgb
