"""Binary morphology on CT grids, with sizes in millimetres.

Arrays are indexed ``[k, j, i]`` (slice, row, column) and spacings are given
as ``(x, y, z)`` millimetres, as in :class:`segnode.models.volume.Volume`.  Everything
here works on ``bool`` masks and ``int32`` labels (no float64 copies) and uses
labelling instead of iterated dilation where it can, so it stays linear in the
number of voxels:

* :func:`fill_holes` labels the background once and keeps what does not touch
  the border (``scipy.ndimage.binary_fill_holes`` iterates a dilation instead);
* ``per_slice=True`` variants connect voxels within a slice only (axial 2-D
  connectivity in one 3-D call, no Python loop over slices).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

Spacing = tuple[float, float, float]

#: 2-D (in-slice) 4-connectivity as a 3-D structure: nothing links slices.
SLICE_CROSS = np.zeros((3, 3, 3), dtype=bool)
SLICE_CROSS[1] = ndimage.generate_binary_structure(2, 1)
#: 3-D 6-connectivity.
CROSS_3D = ndimage.generate_binary_structure(3, 1)


def connectivity(per_slice: bool) -> np.ndarray:
    return SLICE_CROSS if per_slice else CROSS_3D


def ellipsoid(radius_mm: float, spacing: Spacing, *, per_slice: bool = False) -> np.ndarray:
    """Footprint of a ball of ``radius_mm`` on an anisotropic ``(k, j, i)`` grid.

    With ``per_slice`` it is a disc in the slice plane (one slice thick).  A
    radius below one voxel along an axis gives extent 0 along it.
    """
    sx, sy, sz = spacing
    rz = 0 if per_slice else int(radius_mm // sz)
    ry, rx = int(radius_mm // sy), int(radius_mm // sx)
    k, j, i = np.ogrid[-rz : rz + 1, -ry : ry + 1, -rx : rx + 1]
    dist2 = (k * sz) ** 2 + (j * sy) ** 2 + (i * sx) ** 2
    return dist2 <= radius_mm**2 + 1e-6


def label(mask: np.ndarray, *, per_slice: bool = False) -> tuple[np.ndarray, int]:
    """Connected components as ``int32`` labels (1..n) and their count."""
    labels, count = ndimage.label(mask, structure=connectivity(per_slice), output=np.int32)
    return labels, int(count)


def component_sizes(labels: np.ndarray, count: int) -> np.ndarray:
    """Voxel count of each label 0..count (index 0 is the background)."""
    return np.bincount(labels.ravel(), minlength=count + 1)


def largest_component(mask: np.ndarray, *, per_slice: bool = False) -> np.ndarray:
    """The largest connected component (3-D, or within each slice)."""
    labels, count = label(mask, per_slice=per_slice)
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    if not per_slice:
        sizes = component_sizes(labels, count)
        sizes[0] = 0
        return labels == int(np.argmax(sizes))
    keep = np.zeros(count + 1, dtype=bool)
    sizes = component_sizes(labels, count)
    for k in range(labels.shape[0]):
        ids = np.unique(labels[k])
        ids = ids[ids > 0]
        if ids.size:
            keep[ids[np.argmax(sizes[ids])]] = True
    return keep[labels]


def remove_small(mask: np.ndarray, min_voxels: int, *, per_slice: bool = False) -> np.ndarray:
    """Drop components with fewer than ``min_voxels`` voxels."""
    labels, count = label(mask, per_slice=per_slice)
    keep = component_sizes(labels, count) >= min_voxels
    keep[0] = False
    return keep[labels]


def border_labels(labels: np.ndarray, *, per_slice: bool) -> np.ndarray:
    """Labels that touch the array border (only the in-slice border if ``per_slice``)."""
    faces = [labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]]
    if not per_slice:
        faces += [labels[0], labels[-1]]
    return np.unique(np.concatenate([f.ravel() for f in faces]))


def bounding_box(mask: np.ndarray, pad: int = 0) -> tuple[slice, ...] | None:
    """Slices of the box holding ``mask``'s voxels, grown by ``pad`` within the array."""
    box = ndimage.find_objects(mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8))
    if not box or box[0] is None:
        return None
    return tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box[0], mask.shape))


HoleFilter = Callable[[np.ndarray, np.ndarray, tuple[slice, ...]], np.ndarray]


def fill_holes(mask: np.ndarray, *, per_slice: bool = False, keep_hole: HoleFilter | None = None) -> np.ndarray:
    """Fill background regions that do not touch the border.

    Works in the mask's bounding box (one voxel of margin).  ``keep_hole(holes,
    ids, box)`` may veto holes: it gets the hole labels (of the box), the
    candidate ids and the box, and returns a bool array saying which to fill.
    """
    box = bounding_box(mask, pad=1)
    if box is None:
        return mask.copy()
    holes, count = label(~mask[box], per_slice=per_slice)
    fill = np.ones(count + 1, dtype=bool)
    fill[0] = False
    fill[border_labels(holes, per_slice=per_slice)] = False
    if keep_hole is not None and fill.any():
        ids = np.flatnonzero(fill)
        fill[ids] = keep_hole(holes, ids, box)
    out = mask.copy()
    out[box] |= fill[holes]
    return out


def per_label_mean(values: np.ndarray, labels: np.ndarray, count: int, within: np.ndarray | None = None) -> np.ndarray:
    """Mean of ``values`` in each label 0..count (float64 of length count+1).

    ``within`` (bool) limits the work to the voxels it marks (label sizes
    are then counted there too).
    """
    if within is not None:
        values, labels = values[within], labels[within]
    sums = np.bincount(labels.ravel(), weights=values.ravel(), minlength=count + 1)
    sizes = np.maximum(np.bincount(labels.ravel(), minlength=count + 1), 1)
    return sums / sizes


def per_label_fraction(flag: np.ndarray, labels: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Fraction of each label's voxels (``sizes`` from :func:`component_sizes`) where ``flag``."""
    hits = np.bincount(labels[flag], minlength=sizes.size)
    return hits / np.maximum(sizes, 1)


def open_mm(mask: np.ndarray, radius_mm: float, spacing: Spacing, *, per_slice: bool) -> np.ndarray:
    fp = ellipsoid(radius_mm, spacing, per_slice=per_slice)
    return ndimage.binary_opening(mask, structure=fp)


def close_mm(mask: np.ndarray, radius_mm: float, spacing: Spacing, *, per_slice: bool) -> np.ndarray:
    """Closing that does not shrink at the array border (the mask is padded)."""
    fp = ellipsoid(radius_mm, spacing, per_slice=per_slice)
    pad = [(s // 2, s // 2) for s in fp.shape]
    padded = np.pad(mask, pad, mode="edge")
    closed = ndimage.binary_closing(padded, structure=fp)
    return closed[tuple(slice(p, p + n) for (p, _), n in zip(pad, mask.shape))]


def dilate_mm(mask: np.ndarray, radius_mm: float, spacing: Spacing, *, per_slice: bool) -> np.ndarray:
    fp = ellipsoid(radius_mm, spacing, per_slice=per_slice)
    return ndimage.binary_dilation(mask, structure=fp)


# --- grids ---------------------------------------------------------------------------


def grid_factors(spacing: Spacing, target_mm: float) -> tuple[int, int, int]:
    """Integer ``(k, j, i)`` block sizes that bring each spacing nearest ``target_mm``."""
    sx, sy, sz = spacing
    return _blocks(target_mm, sz), _blocks(target_mm, sy), _blocks(target_mm, sx)


def _blocks(target_mm: float, spacing_mm: float) -> int:
    return max(1, int(target_mm / spacing_mm + 0.5))


def downsample_mean(hu: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Block mean as ``float32``; a partial last block is averaged on its own."""
    arr = np.asarray(hu, dtype=np.float32) if factors == (1, 1, 1) else hu
    for axis, f in enumerate(factors):
        if f > 1:
            arr = _block_mean(arr, axis, f)
    return arr


def _block_mean(arr: np.ndarray, axis: int, f: int) -> np.ndarray:
    """Mean of runs of ``f`` along ``axis`` (strided adds: no index arrays, no float64)."""
    n = arr.shape[axis]
    m = -(-n // f)
    shape = list(arr.shape)
    shape[axis] = m
    out = np.zeros(shape, dtype=np.float32)
    counts = np.zeros(m, dtype=np.float32)
    for r in range(min(f, n)):
        part = arr[(slice(None),) * axis + (slice(r, None, f),)]
        out[(slice(None),) * axis + (slice(0, part.shape[axis]),)] += part
        counts[: part.shape[axis]] += 1
    view = [1, 1, 1]
    view[axis] = m
    out /= counts.reshape(view)
    return out


def upsample(mask: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
    """Nearest-neighbour inverse of :func:`downsample_mean` onto ``shape``."""
    if factors == (1, 1, 1):
        return mask
    idx = [np.minimum(np.arange(n) // f, m - 1) for n, f, m in zip(shape, factors, mask.shape)]
    return mask[np.ix_(*idx)]


def coarse_spacing(spacing: Spacing, factors: tuple[int, int, int]) -> Spacing:
    fk, fj, fi = factors
    return (spacing[0] * fi, spacing[1] * fj, spacing[2] * fk)
