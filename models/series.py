"""CT series (a folder of DICOM files, one multi-frame file, or NIfTI) → :class:`Volume`.

Tolerant when reading, strict about what reaches a backend:

* mixed folders are allowed: choose a series by SeriesInstanceUID, or get an
  error listing the series found;
* only CT in Hounsfield units is accepted (Modality CT, no perfusion maps,
  localizers or a RescaleType other than HU);
* slices are sorted along the slice normal; missing slices and inconsistent
  geometry are refused with a message naming the files;
* gantry tilt gives a sheared grid (the voxel grid stays the source pixel grid,
  so a SEG built on it overlays the source images exactly); variable slice
  spacing is accepted with a note (each SEG frame references its own source
  image, so the overlay stays exact).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from segnode.errors import InputError
from segnode.models.volume import SourceSeries, Volume, vec3

logger = logging.getLogger(__name__)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"
MULTIFRAME_CT = {ENHANCED_CT, LEGACY_ENHANCED_CT}
NIFTI_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
#: ImageType values that mean "these pixels are not HU of an axial stack".
NON_HU_IMAGE_TYPES = {"PERFUSION", "RCBF", "RCBV", "MTT", "TTP", "TMAX", "LOCALIZER", "IODINE", "EFF_ATOMIC_NUMBER"}
#: Type 2 patient/study attributes the SEG copies from its source; filled empty when absent.
TYPE2_COPIED_TO_SEG = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
GAP_FACTOR = 2.5  # a step this many times the median step means missing slices
SPACING_TOLERANCE = 0.05  # relative deviation of steps reported as variable spacing

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SeriesSummary:
    """One series found in a folder, for listings and error messages."""

    series_instance_uid: str
    modality: str
    description: str
    files: tuple[Path, ...]


def load_series(
    path: Path | str, series_uid: str | None = None, progress: Progress | None = None
) -> Volume:
    """Load a CT volume from a folder or file of DICOM, or a NIfTI/NRRD file."""
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", where=str(path))
    if path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES):
        return load_image_file(path)
    series = scan(path)
    chosen = choose_series(series, series_uid, path)
    return _load_dicom(chosen, progress)


def scan(path: Path) -> dict[str, SeriesSummary]:
    """Group the DICOM files under ``path`` by SeriesInstanceUID (headers only)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    groups: dict[str, list[Path]] = defaultdict(list)
    meta: dict[str, tuple[str, str]] = {}
    skipped: list[str] = []
    for file in files:
        header = _read_header(file)
        if header is None or ("SOPClassUID" not in header and "Modality" not in header):
            skipped.append(file.name)
            continue
        uid = str(header.get("SeriesInstanceUID", "") or "").strip()
        groups[uid].append(file)
        meta.setdefault(uid, (str(header.get("Modality", "")), str(header.get("SeriesDescription", ""))))
    if skipped:
        logger.warning("%d file(s) under %s are not DICOM and were ignored: %s", len(skipped), path, ", ".join(skipped[:5]))
    if not groups:
        raise InputError("no DICOM files found" + (f" ({len(skipped)} unreadable)" if skipped else ""), where=str(path))
    return {
        uid: SeriesSummary(uid, meta[uid][0], meta[uid][1], tuple(sorted(paths)))
        for uid, paths in groups.items()
    }


#: what pydicom raises on files that are not (or no longer) DICOM
UNREADABLE = (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError)


def _read_header(file: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(file, stop_before_pixels=True, force=True)
    except UNREADABLE:
        return None


def choose_series(series: dict[str, SeriesSummary], series_uid: str | None, where: Path) -> SeriesSummary:
    if "" in series:
        bad = series[""].files
        raise InputError(
            f"{len(bad)} file(s) have a missing or empty SeriesInstanceUID (e.g. {bad[0].name}): "
            "the series cannot be identified and no SEG could reference it; "
            "repair the UIDs at the source (or re-export from the PACS)",
            where=str(where),
        )
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(f"series {series_uid} not found; {_listing(series)}", where=str(where))
        return series[series_uid]
    ct = [s for s in series.values() if s.modality == "CT"]
    if len(series) > 1 and len(ct) == 1:
        return ct[0]
    if len(series) > 1:
        raise InputError(
            f"{len(series)} series found, choose one with --series UID: {_listing(series)}",
            where=str(where),
        )
    return next(iter(series.values()))


def _listing(series: dict[str, SeriesSummary]) -> str:
    return "; ".join(
        f"{s.series_instance_uid} ({s.modality or '?'}, {len(s.files)} file(s), {s.description!r})"
        for s in series.values()
    )


# --- DICOM ---------------------------------------------------------------------------------


def _load_dicom(series: SeriesSummary, progress: Progress | None) -> Volume:
    datasets: list[Dataset] = []
    arrays: list[np.ndarray] = []
    total = len(series.files)
    for n, file in enumerate(series.files, start=1):
        ds = _read_full(file)
        check_is_ct(ds, file)
        arrays.append(_hu(ds, file))
        del ds.PixelData  # keep the header only: it is referenced by the SEG
        datasets.append(ds)
        if progress:
            progress(n, total)
    if datasets[0].SOPClassUID in MULTIFRAME_CT:
        if len(datasets) > 1:
            raise InputError(
                f"{len(datasets)} multi-frame files in one series; pass one file", where=str(series.files[0].parent)
            )
        return _multiframe_volume(datasets[0], arrays[0], series.files[0])
    return _stack_volume(datasets, arrays, series.files)


def _read_full(file: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(file, force=True)
    except UNREADABLE as exc:
        raise InputError(f"cannot parse DICOM: {exc}", where=str(file)) from exc
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        value = str(ds.get(keyword, "") or "").strip()
        if not value:
            raise InputError(f"{keyword} is missing or empty; a SEG could not reference this image", where=str(file))
        if not UID(value).is_valid:
            raise InputError(f"{keyword} {value[:70]!r} is not a valid DICOM UID", where=str(file))
    if "PixelData" not in ds:
        raise InputError("no Pixel Data", where=str(file))
    if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
        del ds.SpecificCharacterSet  # empty means the default repertoire; writers reject ''
    for keyword in TYPE2_COPIED_TO_SEG:  # a SEG copies these and needs them present, even empty
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds


def check_is_ct(ds: Dataset, file: Path) -> None:
    """Refuse anything that is not CT in Hounsfield units."""
    modality = str(ds.get("Modality", ""))
    if modality != "CT":
        raise InputError(f"modality is {modality or 'missing'}, not CT; segnode segments CT only", where=str(file))
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in {CT_IMAGE, *MULTIFRAME_CT}:
        raise InputError(f"SOP class {sop_class or 'missing'} is not a CT image storage class", where=str(file))
    image_type = {str(v).upper() for v in (ds.get("ImageType") or [])}
    if image_type & NON_HU_IMAGE_TYPES:
        kinds = "/".join(sorted(image_type & NON_HU_IMAGE_TYPES))
        raise InputError(f"ImageType says {kinds}: derived, non-HU data, not a CT volume", where=str(file))
    rescale_type = _rescale(ds)[2]
    if rescale_type not in ("", "HU", "US"):  # US = unspecified, allowed for CT
        raise InputError(f"RescaleType is {rescale_type!r}, not HU", where=str(file))


def _rescale(ds: Dataset) -> tuple[float, float, str]:
    """Slope, intercept and RescaleType, also from Enhanced CT functional groups."""
    source: Dataset = ds
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(group)
        if seq and "PixelValueTransformationSequence" in seq[0]:
            source = seq[0].PixelValueTransformationSequence[0]
            break
    slope = float(source.get("RescaleSlope", 1) or 1)
    intercept = float(source.get("RescaleIntercept", 0) or 0)
    return slope, intercept, str(source.get("RescaleType", "") or "").upper()


def _hu(ds: Dataset, file: Path) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except (ValueError, AttributeError, RuntimeError, NotImplementedError, KeyError) as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", ts) or "missing transfer syntax"
        raise InputError(f"cannot decode pixel data ({name}): {exc}", where=str(file)) from exc
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError("colour images are not CT", where=str(file))
    slope, intercept, _ = _rescale(ds)
    if slope == 1 and float(intercept).is_integer():
        hu = pixels.astype(np.int32) + int(intercept)
        return np.clip(hu, -32768, 32767).astype(np.int16)
    return (pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)


def _orientation(ds: Dataset, file: Path) -> tuple[np.ndarray, np.ndarray]:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        raise InputError("ImageOrientationPatient is missing", where=str(file))
    row, col = np.array(iop[:3], dtype=float), np.array(iop[3:], dtype=float)
    return row / np.linalg.norm(row), col / np.linalg.norm(col)


def _pixel_spacing(ds: Dataset, file: Path) -> tuple[float, float]:
    spacing = ds.get("PixelSpacing")
    if spacing is None or len(spacing) != 2:
        raise InputError("PixelSpacing is missing", where=str(file))
    return float(spacing[0]), float(spacing[1])  # (between rows, between columns)


def _stack_volume(datasets: list[Dataset], arrays: list[np.ndarray], files: Iterable[Path]) -> Volume:
    files = list(files)
    row, col = _orientation(datasets[0], files[0])
    spacing_rc = _pixel_spacing(datasets[0], files[0])
    shape = arrays[0].shape
    for ds, arr, file in zip(datasets, arrays, files):
        if arr.shape != shape:
            raise InputError(f"image size {arr.shape} differs from {shape} of the first slice", where=str(file))
        r, c = _orientation(ds, file)
        if not (np.allclose(r, row, atol=1e-3) and np.allclose(c, col, atol=1e-3)):
            raise InputError("ImageOrientationPatient differs between slices", where=str(file))
        if not np.allclose(_pixel_spacing(ds, file), spacing_rc, atol=1e-3):
            raise InputError("PixelSpacing differs between slices", where=str(file))
        if "ImagePositionPatient" not in ds:
            raise InputError("ImagePositionPatient is missing", where=str(file))
    normal = np.cross(row, col)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    datasets = [datasets[i] for i in order]
    files = [files[i] for i in order]
    positions = positions[order]
    hu = np.stack([arrays[i] for i in order])
    slice_axis, step, notes = _slice_axis(positions, normal, files)
    direction = np.column_stack([row, col, slice_axis])
    first = datasets[0]
    return Volume(
        hu=hu,
        spacing=(spacing_rc[1], spacing_rc[0], step),
        origin=vec3(positions[0]),
        direction=direction,
        source=SourceSeries(
            series_instance_uid=str(first.SeriesInstanceUID),
            study_instance_uid=str(first.StudyInstanceUID),
            datasets=tuple(datasets),
            files=tuple(files),
        ),
        notes=tuple(notes),
        slice_positions=tuple(vec3(p) for p in positions),
    )


def _slice_axis(positions: np.ndarray, normal: np.ndarray, files: list[Path]) -> tuple[np.ndarray, float, list[str]]:
    """Unit slice-step direction, step length and notes on tilt / spacing."""
    notes: list[str] = []
    if len(positions) == 1:
        return normal, 1.0, ["single slice: grid step 1 mm (volumes use its SliceThickness)"]
    deltas = np.diff(positions, axis=0)
    along = deltas @ normal
    if np.any(np.abs(along) < 1e-3):
        i = int(np.argmin(np.abs(along)))
        raise InputError(
            f"two slices at the same position ({files[i].name} and {files[i + 1].name}): duplicate or mixed acquisitions",
            where=str(files[i].parent),
        )
    median = float(np.median(along))
    gap = np.flatnonzero(along > GAP_FACTOR * median)
    if gap.size:
        i = int(gap[0])
        raise InputError(
            f"missing slices: a gap of {along[i]:.2f} mm between {files[i].name} and {files[i + 1].name} "
            f"(typical step {median:.2f} mm)",
            where=str(files[i].parent),
        )
    if np.ptp(along) > SPACING_TOLERANCE * median:
        notes.append(f"variable slice spacing {along.min():.2f}–{along.max():.2f} mm (median {median:.2f} mm used for morphology)")
    mean_delta = deltas.mean(axis=0)
    axis = mean_delta / np.linalg.norm(mean_delta)
    tilt = float(np.degrees(np.arccos(np.clip(axis @ normal, -1, 1))))
    if tilt > 0.5:
        notes.append(f"gantry tilt {tilt:.1f}°: sheared grid kept as acquired")
    step = float(np.median(np.linalg.norm(deltas, axis=1)))
    return axis, step, notes


def _multiframe_volume(ds: Dataset, frames: np.ndarray, file: Path) -> Volume:
    """An Enhanced / Legacy Converted Enhanced CT file: frames sorted by position."""
    if frames.ndim == 2:
        frames = frames[None]
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []

    def attr(i: int, seq: str, keyword: str) -> Any:  # a DICOM value; per-frame group first, then shared
        for group in (per_frame[i] if i < len(per_frame) else Dataset(), shared):
            if seq in group and keyword in group[seq][0]:
                return group[seq][0][keyword].value
        raise InputError(f"{seq}/{keyword} missing for frame {i + 1}", where=str(file))

    iop = attr(0, "PlaneOrientationSequence", "ImageOrientationPatient")
    row, col = np.array(iop[:3], float), np.array(iop[3:], float)
    spacing_rc = [float(v) for v in attr(0, "PixelMeasuresSequence", "PixelSpacing")]
    positions = np.array(
        [[float(v) for v in attr(i, "PlanePositionSequence", "ImagePositionPatient")] for i in range(len(frames))]
    )
    normal = np.cross(row, col)
    order = np.argsort(positions @ normal, kind="stable")
    fake_files = [file.with_name(f"{file.name}#frame{i + 1}") for i in order]
    axis, step, notes = _slice_axis(positions[order], normal, fake_files)
    return Volume(
        hu=frames[order],
        spacing=(spacing_rc[1], spacing_rc[0], step),
        origin=vec3(positions[order][0]),
        direction=np.column_stack([row, col, axis]),
        source=SourceSeries(
            series_instance_uid=str(ds.SeriesInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            datasets=(ds,),
            files=(file,),
            frame_order=tuple(int(i) for i in order),
        ),
        notes=tuple(notes),
        slice_positions=tuple(vec3(p) for p in positions[order]),
    )


# --- NIfTI and other research formats ------------------------------------------------------


def load_image_file(path: Path) -> Volume:
    """A NIfTI (or NRRD/MHA) CT in HU; no DICOM sources, so output is NIfTI only."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read image: {str(exc).strip().splitlines()[-1]}", where=str(path)) from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"expected a 3-D scalar image, got {image.GetDimension()}-D", where=str(path))
    hu = sitk.GetArrayFromImage(image)
    if not np.issubdtype(hu.dtype, np.integer) or hu.min() < -32768 or hu.max() > 32767:
        hu = hu.astype(np.float32)
    else:
        hu = hu.astype(np.int16)
    if hu.min() >= 0 and hu.max() > 1500:
        raise InputError(
            "values look like raw stored pixels (no negative values), not HU; convert to HU first", where=str(path)
        )
    return Volume(
        hu=hu,
        spacing=vec3(image.GetSpacing()),
        origin=vec3(image.GetOrigin()),
        direction=np.array(image.GetDirection(), dtype=float).reshape(3, 3),
    )
