"""Put a stack of parallel image planes onto a regular, orthonormal grid (for NIfTI).

A NIfTI file has one affine: it can only describe slices at equal steps along
one axis.  A gantry-tilted series (the slice step is sheared against the image
normal: SimpleITK refuses such a file as non-orthonormal) or an unevenly spaced
one (a constant step misplaces slices, by tens of mm) does not fit.  Such a
stack is resampled here onto the grid spanned by the image row, the image
column and the image normal, with the source pixel spacing in plane and the
smallest source step along the normal, covering every source pixel:
nearest neighbour for labels (each output voxel takes the value of the source
voxel whose centre is nearest, so every source voxel centre lies within half
an output voxel of a voxel holding its value), linear for images.  A stack
already on such a grid passes unchanged (exact, no resampling).

Pure numpy, so the storage layer (harvest, export) and the models layer (the
``--format nifti`` writer) share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: how far (mm) a slice may lie from the regular grid and still count as on it
ON_GRID_ATOL_MM = 1e-3


@dataclass(frozen=True)
class Planes:
    """Geometry of a stack of parallel image planes, in slice order (LPS mm).

    ``positions[k]`` is voxel ``(0, 0)`` of slice ``k``; ``row`` the unit
    direction of increasing column index ``i``, ``col`` that of increasing row
    index ``j``; ``spacing`` is ``(along i, along j)``.
    """

    positions: np.ndarray
    row: np.ndarray
    col: np.ndarray
    spacing: tuple[float, float]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row, self.col)


@dataclass(frozen=True)
class RegularGrid:
    """Voxels ``[k, j, i]`` on an orthonormal LPS affine; ``note`` says what resampling was done."""

    array: np.ndarray
    affine_lps: np.ndarray
    note: str | None = None


def steps_along_normal(planes: Planes) -> np.ndarray:
    return np.diff(np.asarray(planes.positions, float) @ planes.normal)


def describe_irregularity(planes: Planes) -> str | None:
    """Why ``planes`` are not on a regular orthonormal grid (``None`` when they are)."""
    positions = np.asarray(planes.positions, float)
    if len(positions) < 2:
        return None
    deltas = np.diff(positions, axis=0)
    along = deltas @ planes.normal
    reasons = []
    sideways = deltas - along[:, None] * planes.normal
    if np.abs(sideways).max() > ON_GRID_ATOL_MM:
        shear = np.degrees(np.arctan2(np.linalg.norm(sideways, axis=1), np.abs(along))).max()
        reasons.append(f"slices sheared by up to {shear:.1f}° (gantry tilt)")
    if np.ptp(along) > ON_GRID_ATOL_MM:
        reasons.append(f"slice spacing varies {along.min():.2f}–{along.max():.2f} mm")
    return "; ".join(reasons) or None


def regularize(array: np.ndarray, planes: Planes, *, labels: bool, fill: float = 0) -> RegularGrid:
    """``array[k, j, i]`` on ``planes`` → a :class:`RegularGrid` (unchanged when already regular)."""
    positions = np.asarray(planes.positions, float)
    row, col, normal = (np.asarray(v, float) for v in (planes.row, planes.col, planes.normal))
    dx, dy = planes.spacing
    reason = describe_irregularity(planes)
    if reason is None:
        step = float(np.mean(steps_along_normal(planes))) if len(positions) > 1 else 1.0
        return RegularGrid(array, _affine(positions[0], row, col, normal, dx, dy, step))
    along = positions @ normal
    if along[-1] < along[0]:  # slices stored against the normal: resample in ascending order
        array, positions, along = array[::-1], positions[::-1], along[::-1]
    dz = float(np.diff(along).min())
    if dz <= 0:
        raise ValueError("slices are not ordered along the image normal (or two share a position)")
    # in-plane offset (pixels) of each source slice against slice 0, and the canvas covering all of them
    u = (positions - positions[0]) @ row / dx
    v = (positions - positions[0]) @ col / dy
    u0, v0 = np.floor(u.min()), np.floor(v.min())
    n_k = int(np.rint((along[-1] - along[0]) / dz)) + 1  # the last source slice has its nearest output slice
    n_j = array.shape[1] + int(np.ceil(v.max() - v0))
    n_i = array.shape[2] + int(np.ceil(u.max() - u0))
    out = np.full((n_k, n_j, n_i), fill, dtype=array.dtype if labels else np.float32)
    for m in range(n_k):
        s = along[0] + m * dz
        if labels:
            k = int(np.argmin(np.abs(along - s)))
            out[m] = _shifted(array[k], u[k] - u0, v[k] - v0, (n_j, n_i), fill, nearest=True)
        else:
            k1 = int(np.clip(np.searchsorted(along, s), 1, len(along) - 1))
            w = float(np.clip((s - along[k1 - 1]) / (along[k1] - along[k1 - 1]), 0.0, 1.0))
            a = _shifted(array[k1 - 1], u[k1 - 1] - u0, v[k1 - 1] - v0, (n_j, n_i), fill, nearest=False)
            b = _shifted(array[k1], u[k1] - u0, v[k1] - v0, (n_j, n_i), fill, nearest=False)
            out[m] = (1 - w) * a + w * b
    origin = positions[0] + u0 * dx * row + v0 * dy * col
    if not labels and np.issubdtype(array.dtype, np.integer):
        out = np.rint(out).astype(array.dtype)
    note = (f"resampled onto a regular grid for NIfTI ({reason}): {n_k} slices of {dz:.3f} mm, "
            f"{'nearest neighbour' if labels else 'linear'}")
    return RegularGrid(out, _affine(origin, row, col, normal, dx, dy, dz), note)


def _affine(origin: np.ndarray, row: np.ndarray, col: np.ndarray, normal: np.ndarray,
            dx: float, dy: float, dz: float) -> np.ndarray:
    out = np.eye(4)
    out[:3, 0], out[:3, 1], out[:3, 2], out[:3, 3] = row * dx, col * dy, normal * dz, origin
    return out


def _shifted(plane: np.ndarray, di: float, dj: float, shape: tuple[int, int], fill: float,
             *, nearest: bool) -> np.ndarray:
    """``plane`` placed on a canvas of ``shape`` so that its pixel (0, 0) lands at (dj, di)."""
    canvas = np.full(shape, fill, dtype=plane.dtype if nearest else np.float32)
    if nearest:
        oj, oi = int(np.rint(dj)), int(np.rint(di))
        canvas[oj:oj + plane.shape[0], oi:oi + plane.shape[1]] = plane
        return canvas
    from scipy import ndimage

    oj, oi = int(np.floor(dj)), int(np.floor(di))
    padded = np.full((plane.shape[0] + 1, plane.shape[1] + 1), fill, dtype=np.float32)
    padded[:-1, :-1] = plane
    moved = ndimage.shift(padded, (dj - oj, di - oi), order=1, mode="constant", cval=fill)
    h, w = min(moved.shape[0], shape[0] - oj), min(moved.shape[1], shape[1] - oi)
    canvas[oj:oj + h, oi:oi + w] = moved[:h, :w]
    return canvas
