"""Segmentations to evaluate: DICOM SEG, NIfTI label maps and folders of masks, on a grid.

A :class:`Segmentation` is a set of named binary masks on one voxel
:class:`Grid`.  Masks are produced on demand (a 100-organ label map is never
held as 100 boolean volumes), and :meth:`Segmentation.on_grid` moves a
segmentation onto another grid by nearest-neighbour resampling in patient
space (SimpleITK), so two segmentations of the same patient on different
grids can be compared voxel by voxel.

Readers:

* a DICOM SEG (BINARY, FRACTIONAL or LABELMAP): segments named by their
  Tracking ID or Segment Label; frames placed on the grid of the referenced
  source series when its folder is given (exact), else on the volume highdicom
  derives from the frame positions (which may be cropped to the frames
  present);
* a NIfTI label map: values named by a ``{value: name}`` table (``--labels``,
  or the ``labels`` of an nnU-Net ``dataset.json`` found beside it), a binary
  mask by its file name;
* a folder of binary NIfTI masks, one per segment (TotalSegmentator's layout).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from segnode.errors import InputError
from segnode.models.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    import highdicom as hd
    import SimpleITK as sitk
    from pydicom import Dataset

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: grids whose affines differ by less than this (mm) are the same grid
GRID_ATOL_MM = 1e-3
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

MaskFn = Callable[[str], np.ndarray]


@dataclass(frozen=True, eq=False)
class Grid:
    """A voxel grid: array shape ``(k, j, i)`` and the affine ``(i, j, k, 1)`` → LPS mm.

    ``slice_ml``: the volume of one voxel of each slice, for the grid of a
    DICOM series (:meth:`Volume.slice_voxel_ml`: each slice at its own extent,
    where the affine has the median step); ``None`` for a NIfTI's exact grid.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    slice_ml: tuple[float, ...] | None = None

    @classmethod
    def of_volume(cls, volume: Volume) -> Grid:
        return cls(volume.shape, volume.affine(), tuple(float(v) for v in volume.slice_voxel_ml()))

    def volume_ml(self, mask: np.ndarray) -> float:
        """Volume in mL of the true voxels of ``mask`` (on this grid), each slice at its own extent."""
        per_slice = np.asarray(mask, dtype=bool).reshape(self.shape[0], -1).sum(axis=1)
        voxel = np.asarray(self.slice_ml) if self.slice_ml is not None else np.full(self.shape[0], self.voxel_ml)
        return float(per_slice @ voxel)

    @property
    def spacing_ijk(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def array_spacing(self) -> tuple[float, float, float]:
        """Voxel spacing along the array axes ``(k, j, i)``, for distance transforms."""
        i, j, k = self.spacing_ijk
        return float(k), float(j), float(i)

    @property
    def voxel_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def same_as(self, other: Grid) -> bool:
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=GRID_ATOL_MM))

    def describe(self) -> str:
        spacing = " x ".join(f"{s:g}" for s in np.round(self.spacing_ijk, 3))
        return f"{self.shape[2]}x{self.shape[1]}x{self.shape[0]} voxels of {spacing} mm"


class Segmentation:
    """Named binary masks on one grid, produced on demand.

    Parameters
    ----------
    grid:
        The grid every mask lies on.
    names:
        Segment names, in their file's order.
    mask_fn:
        Returns the boolean ``[k, j, i]`` mask of a name.
    where:
        What the segmentation was read from, for messages.
    """

    def __init__(self, grid: Grid, names: tuple[str, ...], mask_fn: MaskFn, where: str) -> None:
        if len(set(names)) != len(names):
            raise InputError(f"segment names repeat: {', '.join(names)}", where=where)
        self.grid = grid
        self.names = names
        self.where = where
        self._mask_fn = mask_fn

    def mask(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise InputError(f"no segment {name!r} (has: {', '.join(self.names)})", where=self.where)
        mask = np.asarray(self._mask_fn(name)).astype(bool, copy=False)
        if mask.shape != self.grid.shape:
            raise InputError(f"segment {name!r} has shape {mask.shape}, grid {self.grid.shape}", where=self.where)
        return mask

    def on_grid(self, grid: Grid) -> Segmentation:
        """This segmentation resampled (nearest neighbour, in patient space) onto ``grid``."""
        if grid.same_as(self.grid):
            return self
        source = self.grid
        return Segmentation(grid, self.names, lambda name: resample_mask(self.mask(name), source, grid), self.where)

    def extends_beyond(self, name: str, grid: Grid) -> bool:
        """Whether segment ``name`` has voxels outside ``grid`` (lost when resampled onto it)."""
        mask = self.mask(name)
        if not mask.any() or grid.same_as(self.grid):
            return False
        corners = _box_corners(mask)
        to_grid = np.linalg.inv(grid.affine) @ self.grid.affine
        ijk = (to_grid @ np.vstack([corners.T, np.ones(len(corners))]))[:3]
        limits = np.array(grid.shape[::-1])[:, None] - 0.5
        return bool(np.any(ijk < -0.5) or np.any(ijk > limits))


def labelmap_segmentation(array: np.ndarray, labels: Mapping[int, str], grid: Grid, where: str) -> Segmentation:
    """A segmentation from an integer label array ``[k, j, i]`` and ``{value: name}``.

    Resampled label maps are resampled once for all their segments.
    """
    values = {normalise_name(name): int(value) for value, name in labels.items()}
    return _LabelMapSegmentation(array, values, grid, where)


class _LabelMapSegmentation(Segmentation):
    """The segments of one label array: resampled once for all of them."""

    def __init__(self, array: np.ndarray, values: dict[str, int], grid: Grid, where: str) -> None:
        super().__init__(grid, tuple(values), lambda name: array == values[name], where)
        self._array = array
        self._values = values

    def on_grid(self, grid: Grid) -> Segmentation:
        if grid.same_as(self.grid):
            return self
        values, source = self._values, self.grid
        resampled = functools.cache(lambda: resample_labels(self._array, source, grid))
        return Segmentation(grid, tuple(values), lambda name: resampled() == values[name], self.where)


# --------------------------------------------------------------------------- resampling


def _sitk_image(array: np.ndarray, grid: Grid) -> sitk.Image:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    _set_geometry(image, grid)
    return image


def _set_geometry(image: sitk.Image, grid: Grid) -> None:
    spacing = grid.spacing_ijk
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in grid.affine[:3, 3]])
    image.SetDirection([float(d) for d in (grid.affine[:3, :3] / spacing).ravel()])


def resample_labels(array: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    """Nearest-neighbour resampling of an integer array from ``source`` onto ``target``.

    Target voxels outside the source grid are 0.
    """
    import SimpleITK as sitk

    if array.dtype == bool:
        array = array.astype(np.uint8)
    moving = _sitk_image(array, source)
    reference = sitk.Image([int(n) for n in target.shape[::-1]], moving.GetPixelID())
    _set_geometry(reference, target)
    out = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, moving.GetPixelID())
    return sitk.GetArrayFromImage(out)


def resample_mask(mask: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    return resample_labels(mask.astype(np.uint8), source, target).astype(bool)


def _box_corners(mask: np.ndarray) -> np.ndarray:
    """The 8 corners ``(i, j, k)`` of the bounding box of ``mask``'s voxels."""
    nonzero = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    (k0, k1), (j0, j1), (i0, i1) = ((int(n[0]), int(n[-1])) for n in nonzero)
    return np.array([(i, j, k) for i in (i0, i1) for j in (j0, j1) for k in (k0, k1)], dtype=float)


# --------------------------------------------------------------------------- readers


def normalise_name(name: str) -> str:
    """``"Kidney (left)"`` → ``"kidney_left"``: names compared across files."""
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def read_segmentation(
    path: Path | str, *, labels: Mapping[int, str] | None = None, source: Volume | None = None
) -> Segmentation:
    """Read a DICOM SEG, a NIfTI label map or a folder of NIfTI masks.

    Parameters
    ----------
    path:
        The file or folder.
    labels:
        ``{value: name}`` of a NIfTI label map (default: a ``dataset.json``
        beside it, or the file name for a binary mask).
    source:
        The CT series a SEG references, to place its frames exactly.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", where=str(path))
    if path.is_dir():
        return read_mask_folder(path)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return read_nifti_labels(path, labels)
    return read_seg(path, source)


def _nifti(path: Path) -> tuple[np.ndarray, Grid]:
    from segnode.models.io_nifti import load_nifti

    try:
        img = load_nifti(path)
        data = np.asanyarray(img.dataobj)
    except (OSError, ValueError, EOFError) as exc:  # nibabel's errors for unreadable files
        raise InputError(f"cannot read NIfTI: {exc}", where=str(path)) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"expected a 3-D image, got shape {data.shape}", where=str(path))
    if data.dtype.kind == "f":
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise InputError("label image holds non-integer values", where=str(path))
        data = rounded.astype(np.int32)
    if data.size and data.min() < 0:
        raise InputError("label image holds negative values", where=str(path))
    array = np.ascontiguousarray(data.transpose(2, 1, 0))
    k, j, i = array.shape
    return array, Grid((k, j, i), LPS_TO_RAS @ np.asarray(img.affine, dtype=float))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def dataset_json_labels(path: Path) -> dict[int, str] | None:
    """The ``labels`` of an nnU-Net ``dataset.json`` in ``path``'s folder or the one above."""
    for folder in (path.parent, path.parent.parent):
        candidate = folder / "dataset.json"
        if candidate.is_file():
            try:
                table = json.loads(candidate.read_text(encoding="utf-8"))["labels"]
            except (OSError, ValueError, KeyError) as exc:
                raise InputError(f"unreadable labels: {exc}", where=str(candidate)) from exc
            return parse_labels(table, str(candidate))
    return None


def parse_labels(table: Mapping, where: str) -> dict[int, str]:
    """``{value: name}`` from ``{value: name}`` or nnU-Net's ``{name: value}``.

    Background (0) is dropped; names are normalised (:func:`normalise_name`).
    """
    out: dict[int, str] = {}
    for key, value in table.items():
        number, name = (value, key) if isinstance(value, int) else (key, value)
        try:
            number = int(number)
        except (TypeError, ValueError) as exc:
            raise InputError(f"label value {number!r} is not an integer", where=where) from exc
        if number != 0:
            out[number] = normalise_name(str(name))
    if not out:
        raise InputError("no labels besides background", where=where)
    return out


def load_labels_file(path: Path) -> dict[int, str]:
    """A labels JSON: ``{value: name}``, ``{name: value}`` or a ``dataset.json``."""
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read labels: {exc}", where=str(path)) from exc
    if isinstance(table, dict) and isinstance(table.get("labels"), dict):
        table = table["labels"]
    if not isinstance(table, dict):
        raise InputError("labels must be a JSON object", where=str(path))
    return parse_labels(table, str(path))


def read_nifti_labels(path: Path, labels: Mapping[int, str] | None = None) -> Segmentation:
    array, grid = _nifti(path)
    present = set(np.unique(array).tolist()) - {0}
    table = dict(labels) if labels is not None else dataset_json_labels(path)
    if table is None:
        if present <= {1}:
            table = {1: normalise_name(_stem(path))}
        else:
            table = {value: f"label_{value}" for value in sorted(present)}
            logger.warning("%s: no label names given; using label_<value>", path)
    unknown = present - set(table)
    if unknown:
        raise InputError(f"values {sorted(unknown)} have no name in the labels table", where=str(path))
    return labelmap_segmentation(array, table, grid, str(path))


def read_mask_folder(folder: Path) -> Segmentation:
    """One binary NIfTI per segment, named by its file (``liver.nii.gz`` → ``liver``)."""
    files = sorted(p for p in folder.iterdir() if p.name.lower().endswith(NIFTI_SUFFIXES))
    if not files:
        raise InputError("folder holds no NIfTI masks", where=str(folder))
    by_name = {normalise_name(_stem(p)): p for p in files}
    _, grid = _nifti(files[0])

    def mask(name: str) -> np.ndarray:
        array, own = _nifti(by_name[name])
        if not own.same_as(grid):
            return resample_mask(array > 0, own, grid)
        return array > 0

    return Segmentation(grid, tuple(by_name), mask, str(folder))


def _segment_name(description: Dataset) -> str:
    tracking = description.get("TrackingID")
    return normalise_name(str(tracking or description.SegmentLabel))


def read_seg(path: Path, source: Volume | None = None) -> Segmentation:
    """A DICOM SEG; on ``source``'s grid when given, else on highdicom's volume of the frames."""
    import highdicom as hd
    from pydicom.errors import InvalidDicomError

    try:
        seg = hd.seg.segread(path)
    except (InvalidDicomError, ValueError, AttributeError, KeyError, OSError) as exc:
        raise InputError(f"not a readable DICOM SEG: {exc}", where=str(path)) from exc
    numbers = {_segment_name(d): int(d.SegmentNumber) for d in seg.SegmentSequence}
    if len(numbers) != len(seg.SegmentSequence):
        numbers = {f"{_segment_name(d)}_{d.SegmentNumber}": int(d.SegmentNumber) for d in seg.SegmentSequence}
    where = str(path)
    if source is not None:
        return Segmentation(Grid.of_volume(source), tuple(numbers),
                            lambda name: _seg_on_source(seg, numbers[name], source, where), where)
    try:
        first = seg.get_volume(segment_numbers=[next(iter(numbers.values()))], combine_segments=True)
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"SEG frames do not form a regular volume ({exc}); pass the source series", where=where) from exc
    grid = _grid_of_hd_volume(first)

    def mask(name: str) -> np.ndarray:
        volume = seg.get_volume(segment_numbers=[numbers[name]], combine_segments=True)
        if not _grid_of_hd_volume(volume).same_as(grid):
            return resample_mask(volume.array > 0, _grid_of_hd_volume(volume), grid)
        return volume.array > 0

    return Segmentation(grid, tuple(numbers), mask, where)


def _grid_of_hd_volume(volume: hd.Volume) -> Grid:
    """highdicom's affine indexes (slice, row, column); ours (column, row, slice)."""
    affine = np.array(volume.affine, dtype=float)
    ours = np.eye(4)
    ours[:3, :3] = affine[:3, [2, 1, 0]]
    ours[:3, 3] = affine[:3, 3]
    k, j, i = volume.spatial_shape
    return Grid((int(k), int(j), int(i)), ours)


def _seg_on_source(seg: hd.seg.Segmentation, number: int, source: Volume, where: str) -> np.ndarray:
    """Frames by the source images they reference.

    Many SEG writers (dcmqi among them) leave out "spatial locations
    preserved"; a SEG's frames are derived from the referenced images on
    their pixel grid, so the reference is trusted as the placement.
    """
    series = source.source
    if series is None:
        raise InputError("the source volume has no DICOM images to match the SEG frames to", where=where)
    try:
        if series.frame_order is not None:  # multi-frame
            ds = series.datasets[0]
            return seg.get_pixels_by_source_frame(
                source_sop_instance_uid=ds.SOPInstanceUID,
                source_frame_numbers=[i + 1 for i in series.frame_order],
                segment_numbers=[number], combine_segments=True, ignore_spatial_locations=True,
            ) > 0
        return seg.get_pixels_by_source_instance(
            [ds.SOPInstanceUID for ds in series.datasets], segment_numbers=[number], combine_segments=True,
            ignore_spatial_locations=True,
        ) > 0
    except (ValueError, KeyError, AttributeError, RuntimeError) as exc:
        raise InputError(f"SEG frames do not reference this source series: {exc}", where=where) from exc
