"""A realistic CT study derived from the thorax CTA in tests/data (see tests/data/ATTRIBUTION.md).

:func:`build_study` writes five series of one study, as a scanner sends them:

``localizer``  one slice, ImageType ORIGINAL\\PRIMARY\\LOCALIZER;
``thick``      every third axial slice, SliceThickness 4.5 mm, new UIDs;
``thin``       every axial slice (1.5 mm), new UIDs;
``coronal``    a few coronal slices (coronal orientation, positions along y);
``dose``       a dose report as a Secondary Capture image.

All are ORIGINAL\\PRIMARY (the CTA's own files are DERIVED, converted from NIfTI), share the
CTA's Study Instance UID, and carry ImagesInAcquisition where a scanner puts it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

THORAX = Path(__file__).parent / "data" / "thorax_cta"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _write(ds: Dataset, folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / f"IM{n:04d}.dcm", enforce_file_format=True)


def _series(sources: list[Dataset], folder: Path, number: int, description: str, **extra: object) -> None:
    series_uid = generate_uid()
    for n, src in enumerate(sources, start=1):
        ds = copy.deepcopy(src)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = number
        ds.InstanceNumber = n
        ds.SeriesDescription = description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagesInAcquisition = len(sources)
        for key, value in extra.items():
            setattr(ds, key, value)
        _write(ds, folder, n)


def build_study(out: Path) -> dict[str, Path]:
    """Write the study's five series under ``out``; return their folders by name."""
    slices = [dcmread(p) for p in sorted(THORAX.glob("*.dcm"))]
    folders = {name: out / name for name in ("localizer", "thick", "thin", "coronal", "dose")}
    _series(slices[80:81], folders["localizer"], 1, "Topogram", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    _series(slices[1::3], folders["thick"], 2, "Thorax 4.5 mm", SliceThickness=4.5)
    _series(slices, folders["thin"], 3, "Thorax 1.5 mm")
    coronal = []
    for k, src in enumerate(slices[40:45]):
        ds = copy.deepcopy(src)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        x, y, z = (float(v) for v in slices[0].ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 40 + 5.0 * k, z]
        coronal.append(ds)
    _series(coronal, folders["coronal"], 4, "Thorax coronal MPR", SliceThickness=5.0)
    dose = copy.deepcopy(slices[0])
    dose.SOPClassUID = SECONDARY_CAPTURE
    dose.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    dose.Modality = "CT"
    for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "SliceThickness", "ImagesInAcquisition"):
        if keyword in dose:
            delattr(dose, keyword)
    dose.PixelData = np.zeros((dose.Rows, dose.Columns), dtype=np.uint16).tobytes()
    _series([dose], folders["dose"], 999, "Dose Report")
    dcm = next(folders["dose"].glob("*.dcm"))
    fixed = dcmread(dcm)
    fixed.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    del fixed.ImagesInAcquisition
    fixed.save_as(dcm, enforce_file_format=True)
    return folders
