"""Synthetic CT phantoms with known truth, and a DICOM CT series writer.

The phantoms are drawn in patient space (LPS millimetres): every shape is
placed by world coordinates, so a phantom built with a flipped or permuted
``direction`` holds the same anatomy at the same patient positions, and the
patient's left lung (``+x``) stays the left lung whatever the array order.

* :func:`head_phantom`: scalp, skull (with a foramen magnum), brain with a CSF
  rim and ventricles, a neck, a head holder and a patient table.
* :func:`thorax_phantom`: body with a fat layer, two lungs with vessels, a
  trachea and main bronchi joining them, heart, contrast-filled descending
  aorta, spine (vertebral body, arch, canal), ribs, patient table.
* :func:`write_ct_series`: one CT Image Storage file per slice, int16 with a
  rescale intercept, correct IPP/IOP/PixelSpacing, fresh valid UIDs.
* :func:`read_ct_series`: the inverse, for tests (a minimal reader that trusts
  its input; the node's own loader is ``segnode.models.series``).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from segnode.models.volume import Volume

AIR_HU = -1000.0


@dataclass(frozen=True)
class Phantom:
    """A synthetic volume and the truth masks (``name → bool [k, j, i]``) drawn into it."""

    volume: Volume
    truth: dict[str, np.ndarray]


# --- geometry --------------------------------------------------------------------------


def _world(shape, spacing, origin, direction):
    """Broadcastable world ``x, y, z`` arrays of every voxel (``[k, j, i]`` order)."""
    d = np.asarray(direction, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)
    k, j, i = (np.arange(n, dtype=np.float32) for n in shape)
    k, j, i = k[:, None, None], j[None, :, None], i[None, None, :]
    out = []
    for row in range(3):
        terms = [np.float32(d[row, c]) * axis for c, axis in enumerate((i, j, k)) if d[row, c] != 0]
        coord = np.float32(origin[row]) + sum(terms[1:], terms[0]) if terms else np.float32(origin[row])
        out.append(np.asarray(coord, dtype=np.float32))
    return out


def _ellipsoid(xyz, center, semi) -> np.ndarray:
    x, y, z = xyz
    return (
        ((x - center[0]) / semi[0]) ** 2 + ((y - center[1]) / semi[1]) ** 2 + ((z - center[2]) / semi[2]) ** 2
    ) <= 1.0


def _ellipse_xy(xyz, center, semi) -> np.ndarray:
    x, y, _ = xyz
    return (((x - center[0]) / semi[0]) ** 2 + ((y - center[1]) / semi[1]) ** 2) <= 1.0


def _tube(xyz, p0, p1, radius) -> np.ndarray:
    """Voxels within ``radius`` of the segment ``p0–p1``."""
    x, y, z = xyz
    p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
    d = p1 - p0
    t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / np.float32(d @ d)
    t = np.clip(t, 0, 1)
    return ((x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2) <= radius**2


def _full(mask: np.ndarray, shape) -> np.ndarray:
    return np.broadcast_to(mask, shape).copy() if mask.shape != tuple(shape) else mask


def _finish(hu: np.ndarray, noise_sd: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if noise_sd > 0:
        for k in range(hu.shape[0]):  # per slice: no full-size float64/normal temporaries
            hu[k] += rng.standard_normal(hu.shape[1:], dtype=np.float32) * np.float32(noise_sd)
    np.clip(hu, -1024, 3071, out=hu)
    return hu


def _identity() -> np.ndarray:
    return np.eye(3)


# --- head --------------------------------------------------------------------------------


def head_phantom(
    shape: tuple[int, int, int] = (56, 128, 128),
    spacing: tuple[float, float, float] = (1.8, 1.8, 3.0),
    *,
    direction: np.ndarray | None = None,
    origin: tuple[float, float, float] | None = None,
    noise_sd: float = 15.0,
    seed: int = 0,
) -> Phantom:
    """A head on a head holder and table; truth ``brain``, ``shell``, ``skull``, ``head``.

    ``shell`` is the truth for the profile's shell: head minus brain (scalp
    and skull, with the foramen region).  Default field of view 230 × 230 ×
    168 mm, head centred in x, the table below (posterior, ``+y``).
    """
    direction = _identity() if direction is None else np.asarray(direction, float)
    if origin is None:
        origin = _centred_origin(shape, spacing, direction, (0.0, 0.0, 0.0))
    xyz = _world(shape, spacing, origin, direction)
    c = (0.0, -10.0, 0.0)  # head centre (mm)
    outer = (72.0, 92.0, 80.0)
    skull_out = tuple(a - 5 for a in outer)
    skull_in = tuple(a - 12 for a in outer)
    head = _ellipsoid(xyz, c, outer)
    neck = _ellipse_xy(xyz, (0, 5, 0), (45, 50)) & (xyz[2] < c[2] - 40)
    head = _full(head | neck, shape)
    brain = _full(_ellipsoid(xyz, c, skull_in), shape)
    skull = _full(_ellipsoid(xyz, c, skull_out), shape) & ~brain
    foramen = _full(_tube(xyz, (0, 5, c[2] - 95), (0, 5, c[2] - 60), 16.0), shape)
    skull &= ~foramen
    hu = np.full(shape, AIR_HU, dtype=np.float32)
    _paint_holder(hu, xyz, c, outer)
    hu[head] = 40.0  # scalp, neck soft tissue
    hu[skull] = 1000.0
    hu[brain] = 35.0
    csf = brain & ~_full(_ellipsoid(xyz, c, tuple(a - 3 for a in skull_in)), shape)
    hu[csf] = 8.0
    for side in (-1, 1):
        hu[_full(_ellipsoid(xyz, (side * 12.0, -5.0, c[2] + 10), (7.0, 25.0, 15.0)), shape)] = 6.0
    _finish(hu, noise_sd, seed)
    shell = head & ~brain
    return Phantom(_volume(hu, spacing, origin, direction), {"brain": brain, "shell": shell, "skull": skull, "head": head})


def _paint_holder(hu, xyz, c, outer) -> None:
    """Curved head holder (150 HU, 4 mm) on a 6 mm foam pad, and a table below it."""
    x, y, _ = xyz
    r = np.sqrt(((x - c[0]) / (outer[0] + 6)) ** 2 + ((y - c[1]) / (outer[1] + 6)) ** 2)
    posterior = y > c[1] + 30
    pad = (r <= 1.0) & (r > 0.9) & posterior
    holder = (r > 1.0) & (r <= 1.0 + 4 / outer[0]) & posterior
    table_top = c[1] + outer[1] + 12
    table = (y >= table_top) & (y < table_top + 3) | (y >= table_top + 15) & (y < table_top + 18)
    core = (y >= table_top + 3) & (y < table_top + 15)
    full = hu.shape
    hu[_full(pad, full)] = -850.0
    hu[_full(holder, full)] = 150.0
    hu[_full(core & (np.abs(x) < 200), full)] = -950.0
    hu[_full(table & (np.abs(x) < 200), full)] = 300.0


# --- thorax ----------------------------------------------------------------------------


def thorax_phantom(
    shape: tuple[int, int, int] = (40, 160, 160),
    spacing: tuple[float, float, float] = (2.5, 2.5, 5.0),
    *,
    direction: np.ndarray | None = None,
    origin: tuple[float, float, float] | None = None,
    noise_sd: float = 15.0,
    seed: int = 0,
    trachea: bool = True,
) -> Phantom:
    """A chest on a table; truth ``lung_left``, ``lung_right``, ``bone``, ``body``.

    Default field of view 400 × 400 × 200 mm: the lungs (semi-axis 115 mm in
    z) are cut at the top and bottom, as in a partial scan.  ``lung_left`` is
    the lung at patient ``+x`` (LPS).  The trachea and main bronchi join the
    two lungs (truth: not lung); the aorta is contrast-filled (350 HU, truth:
    not bone).
    """
    direction = _identity() if direction is None else np.asarray(direction, float)
    if origin is None:
        origin = _centred_origin(shape, spacing, direction, (0.0, 0.0, 0.0))
    xyz = _world(shape, spacing, origin, direction)
    body = _full(_ellipse_xy(xyz, (0, 0), (165, 115)), shape)
    hu = np.full(shape, AIR_HU, dtype=np.float32)
    _paint_table(hu, xyz, top=127.0)
    hu[body] = -100.0  # subcutaneous fat
    hu[_full(_ellipse_xy(xyz, (0, 0), (152, 102)), shape)] = 40.0
    hu[_full(_ellipsoid(xyz, (0.0, -45.0, -20.0), (32.0, 42.0, 55.0)), shape)] = 40.0  # heart
    hu[_full(_tube(xyz, (22.0, 38.0, -150.0), (22.0, 38.0, 150.0), 9.0), shape)] = 350.0  # aorta
    lungs = {}
    for name, side in (("lung_left", 1), ("lung_right", -1)):
        lung = _full(_ellipsoid(xyz, (side * 70.0, 0.0, 0.0), (50.0, 65.0, 115.0)), shape)
        hu[lung] = -850.0
        for dx, dy, r in ((-12, -30, 3.0), (8, 0, 4.0), (-5, 30, 3.0), (18, 25, 2.5)):
            p = (side * 70.0 + dx, dy)
            vessel = _full(_tube(xyz, (*p, -90.0), (p[0] + side * 6, p[1] + 5, 90.0), r), shape) & lung
            hu[vessel] = 40.0
        lungs[name] = lung
    if trachea:
        _paint_airway(hu, xyz, lungs)
    bone = _paint_spine(hu, xyz, shape) | _paint_ribs(hu, xyz, shape)
    _finish(hu, noise_sd, seed)
    truth = {**lungs, "bone": bone, "body": body}
    return Phantom(_volume(hu, spacing, origin, direction), truth)


def _paint_table(hu, xyz, top: float) -> None:
    """A flat table (two 3 mm 300 HU plates around a foam core) below the body."""
    x, y, _ = xyz
    plates = ((y >= top) & (y < top + 3)) | ((y >= top + 15) & (y < top + 18))
    core = (y >= top + 3) & (y < top + 15)
    wide = np.abs(x) < 190
    hu[_full(core & wide, hu.shape)] = -950.0
    hu[_full(plates & wide, hu.shape)] = 300.0


def _paint_airway(hu, xyz, lungs) -> None:
    """Trachea down to a carina, main bronchi into each lung (air, not lung)."""
    carina = (0.0, 0.0, 40.0)
    airway = _tube(xyz, (0.0, 0.0, 200.0), carina, 8.0)
    for side in (1, -1):
        airway = airway | _tube(xyz, carina, (side * 50.0, 5.0, 15.0), 5.5)
    airway = _full(airway, hu.shape)
    hu[airway] = AIR_HU
    for lung in lungs.values():
        lung &= ~airway


def _paint_spine(hu, xyz, shape) -> np.ndarray:
    x, y, _ = xyz
    body_r = np.sqrt(x**2 + (y - 62) ** 2)
    vert = _full(body_r <= 18, shape)
    hu[vert] = 250.0
    hu[_full((body_r <= 18) & (body_r > 15.5), shape)] = 900.0
    canal_r = np.sqrt(x**2 + (y - 92) ** 2)
    arch = _full((canal_r <= 17) & (canal_r > 8), shape) & ~vert
    hu[arch] = 700.0
    hu[_full(canal_r <= 8, shape)] = 10.0
    return vert | arch


def _paint_ribs(hu, xyz, shape) -> np.ndarray:
    x, y, z = xyz
    ring = _ellipse_xy(xyz, (0, 0), (146, 96)) & ~_ellipse_xy(xyz, (0, 0), (138, 88))
    band = (np.mod(z + 400, 30.0) < 12.0)
    lateral = y > -60  # ribs end before the (cartilaginous) anterior chest wall
    ribs = _full(ring & band & lateral, shape)
    hu[ribs] = 700.0
    return ribs


# --- helpers ---------------------------------------------------------------------------


def _centred_origin(shape, spacing, direction, centre) -> tuple[float, float, float]:
    """Origin that puts the volume's centre voxel at ``centre`` (mm)."""
    half = (np.array(shape[::-1], float) - 1) / 2 * np.asarray(spacing, float)
    return tuple(float(v) for v in np.asarray(centre) - np.asarray(direction) @ half)  # type: ignore[return-value]


def _volume(hu, spacing, origin, direction) -> Volume:
    return Volume(
        hu=hu,
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction=np.asarray(direction, dtype=float),
    )


def flipped_rows(phantom: Phantom) -> Phantom:
    """The same patient written with the row direction reversed (IOP ``-1\\0\\0``).

    The array is mirrored along ``i`` and the origin moved to the other end, so
    every voxel keeps its patient position; the truth is mirrored with it.
    """
    vol = phantom.volume
    direction = np.asarray(vol.direction, float).copy()
    origin = np.asarray(vol.origin) + direction[:, 0] * vol.spacing[0] * (vol.shape[2] - 1)
    direction[:, 0] *= -1
    flipped = Volume(
        hu=np.ascontiguousarray(vol.hu[:, :, ::-1]),
        spacing=vol.spacing,
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=direction,
    )
    truth = {k: np.ascontiguousarray(v[:, :, ::-1]) for k, v in phantom.truth.items()}
    return Phantom(flipped, truth)


# --- DICOM -----------------------------------------------------------------------------


def write_ct_series(
    volume_hu: np.ndarray,
    folder: Path,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    direction: np.ndarray | None = None,
    *,
    patient_name: str = "Phantom^Synthetic",
    patient_id: str = "PHANTOM-001",
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    transfer_syntax: str | UID = ExplicitVRLittleEndian,
    series_number: int = 1,
    series_description: str = "Synthetic phantom",
) -> list[Path]:
    """Write ``volume_hu[k, j, i]`` as one CT Image Storage file per slice.

    Pixels are int16 with RescaleIntercept −1024 (slope 1); HU outside
    −1024..31743 are clipped.  ``direction`` holds unit columns for the ``i``
    (row), ``j`` (column) and ``k`` (slice) axes: IOP is its first two
    columns, and slice ``k`` sits at ``origin + direction[:, 2] * spacing[2] * k``
    (a sheared third column writes a gantry-tilt-like series).  A compressed
    ``transfer_syntax`` is encoded with pydicom's ``Dataset.compress``.
    Returns the paths written (``CT0001.dcm``...), in slice order.
    """
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    if volume_hu.ndim != 3:
        raise ValueError(f"volume must be 3-D, got shape {volume_hu.shape}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uids = {
        "study": study_uid or generate_uid(),
        "series": series_uid or generate_uid(),
        "frame": frame_of_reference_uid or generate_uid(),
    }
    for uid in uids.values():
        if not UID(uid).is_valid:
            raise ValueError(f"invalid UID {uid!r}")
    now = datetime.datetime.now()
    paths = []
    for k in range(volume_hu.shape[0]):
        ds = _ct_slice_header(volume_hu.shape, spacing, origin, direction, k, uids, now)
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        stored = np.clip(np.rint(volume_hu[k]), -1024, 31743).astype(np.int32) + 1024
        ds.PixelData = stored.astype("<i2").tobytes()
        if UID(transfer_syntax) != ExplicitVRLittleEndian:
            _encode(ds, UID(transfer_syntax))
        path = folder / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ct_slice_header(shape, spacing, origin, direction, k, uids, now) -> Dataset:
    sx, sy, sz = (float(s) for s in spacing)
    ipp = np.asarray(origin, float) + direction[:, 2] * sz * k
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = time
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Laterality = ""
    ds.PatientPosition = "HFS"
    ds.Manufacturer = "segnode test phantom"
    ds.ReferringPhysicianName = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.KVP = "120"
    ds.SliceThickness = f"{sz:.6g}"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.StudyID = "1"
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds(v) for v in ipp]
    ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    normal = np.cross(direction[:, 0], direction[:, 1])
    ds.SliceLocation = f"{float(ipp @ normal):.6g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(shape[1]), int(shape[2])
    ds.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    return ds


def _ds(value: float) -> str:
    """A DS string (no ``-0``)."""
    return f"{float(value) + 0.0:.6g}"


def _encode(ds: Dataset, syntax: UID) -> None:
    if syntax.is_compressed:
        ds.compress(syntax)
    else:
        ds.file_meta.TransferSyntaxUID = syntax


def read_ct_series(folder: Path) -> Volume:
    """Read a single-frame CT series (one folder) into a :class:`Volume`.

    Slices are sorted along the normal of IOP; the slice axis is the step
    between the first two IPPs (sheared when the gantry was tilted).
    """
    datasets = [pydicom.dcmread(p) for p in sorted(Path(folder).iterdir()) if p.is_file()]
    row = np.asarray(datasets[0].ImageOrientationPatient[:3], float)
    col = np.asarray(datasets[0].ImageOrientationPatient[3:], float)
    normal = np.cross(row, col)
    datasets.sort(key=lambda d: float(np.asarray(d.ImagePositionPatient, float) @ normal))
    ipps = np.array([np.asarray(d.ImagePositionPatient, float) for d in datasets])
    step = ipps[1] - ipps[0] if len(ipps) > 1 else normal * float(datasets[0].get("SliceThickness", 1) or 1)
    sz = float(np.linalg.norm(step))
    hu = np.stack(
        [
            d.pixel_array.astype(np.float32) * float(d.get("RescaleSlope", 1)) + float(d.get("RescaleIntercept", 0))
            for d in datasets
        ]
    )
    dy, dx = (float(v) for v in datasets[0].PixelSpacing)
    direction = np.stack([row, col, step / sz], axis=1)
    return Volume(hu=hu, spacing=(dx, dy, sz), origin=tuple(ipps[0]), direction=direction)  # type: ignore[arg-type]


def write_tilted_uneven_series(
    volume_hu: np.ndarray,
    folder: Path,
    pixel_spacing: tuple[float, float],
    offsets: list[float],
    *,
    tilt_degrees: float = 15.0,
    origin: tuple[float, float, float] = (-100.0, -100.0, 0.0),
) -> list[Path]:
    """A gantry-tilted series with uneven slice spacing: slice ``k`` at ``offsets[k]`` mm along the tilted axis.

    The image planes stay axial (IOP ``1\\0\\0\\0\\1\\0``); the slice axis leans
    ``tilt_degrees`` towards ``y`` (a sheared grid, as a tilted gantry writes it).
    ``pixel_spacing`` is ``(x, y)`` mm.  Returns the paths, in slice order.
    """
    if len(offsets) != volume_hu.shape[0]:
        raise ValueError("one offset per slice")
    t = np.radians(tilt_degrees)
    direction = np.array([[1.0, 0, 0], [0, 1.0, np.sin(t)], [0, 0, np.cos(t)]])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    now = datetime.datetime.now()
    steps = np.diff(offsets)
    thickness = float(np.median(steps)) if len(steps) else 1.0
    paths = []
    for k, offset in enumerate(offsets):
        ipp = np.asarray(origin, float) + direction[:, 2] * float(offset)
        ds = _ct_slice_header(volume_hu.shape, (*pixel_spacing, thickness), ipp, direction, 0, uids, now)
        ds.InstanceNumber = k + 1
        ds.PatientName = "Phantom^Tilted"
        ds.PatientID = "PHANTOM-TILT"
        ds.SeriesNumber = 1
        ds.SeriesDescription = "Synthetic tilted uneven phantom"
        stored = np.clip(np.rint(volume_hu[k]), -1024, 31743).astype(np.int32) + 1024
        ds.PixelData = stored.astype("<i2").tobytes()
        path = folder / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
