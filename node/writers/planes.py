"""The image plane of every source slice (or frame), in volume slice order.

Derived objects (RTSTRUCT contours, overlay images) are placed from each
source image's own ImagePositionPatient / ImageOrientationPatient /
PixelSpacing, never from the volume's regular grid, so tilted and unevenly
spaced series stay exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import Dataset
from segnode.errors import EncodeError
from segnode.models.volume import Volume


@dataclass(frozen=True)
class SourcePlane:
    """One source image plane; ``frame_number`` is 1-based for a multi-frame source, else None."""

    position: np.ndarray
    row_dir: np.ndarray  # patient direction of increasing column index
    col_dir: np.ndarray  # patient direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns), as PixelSpacing
    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    def reference(self) -> Dataset:
        """An image reference item (SOP class, instance, frame) to this plane's image."""
        ref = Dataset()
        ref.ReferencedSOPClassUID = self.sop_class_uid
        ref.ReferencedSOPInstanceUID = self.sop_instance_uid
        if self.frame_number is not None:
            ref.ReferencedFrameNumber = self.frame_number
        return ref

    def to_patient(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(row, column) pixel indices (float) → (n, 3) patient LPS mm."""
        dr, dc = self.pixel_spacing
        rows = np.asarray(rows, float)[:, None]
        cols = np.asarray(cols, float)[:, None]
        return self.position[None, :] + cols * dc * self.row_dir[None, :] + rows * dr * self.col_dir[None, :]


def _plane(position: Sequence[float], orientation: Sequence[float], spacing: Sequence[float], sop_class: str,
           sop_uid: str, frame: int | None) -> SourcePlane:
    iop = np.asarray([float(v) for v in orientation])
    return SourcePlane(
        position=np.asarray([float(v) for v in position]),
        row_dir=iop[:3],
        col_dir=iop[3:],
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        sop_class_uid=str(sop_class),
        sop_instance_uid=str(sop_uid),
        frame_number=frame,
    )


def _frame_attr(ds: Dataset, index: int, seq: str, keyword: str) -> Any:  # a DICOM value
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    for group in (per_frame[index] if index < len(per_frame) else Dataset(), shared):
        if seq in group and keyword in group[seq][0]:
            return group[seq][0][keyword].value
    raise EncodeError(f"{seq}/{keyword} missing for frame {index + 1}")


#: patient and study attributes a derived object copies from its source
COPIED = (
    "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
)
#: of those, the Type 2 ones: present (empty) when the source lacks them
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def patient_study_header(first: Dataset) -> Dataset:
    """A new dataset with the patient and study of the source image ``first`` (same study)."""
    ds = Dataset()
    for keyword in COPIED:
        if keyword in first:
            setattr(ds, keyword, first[keyword].value)
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def source_planes(volume: Volume) -> list[SourcePlane]:
    """The plane of each volume slice ``k``, from the source headers."""
    source = volume.source
    if source is None:
        raise EncodeError("the input has no DICOM source images (NIfTI?): a derived DICOM object needs them")
    if source.multiframe:
        ds = source.datasets[0]
        return [
            _plane(
                _frame_attr(ds, f, "PlanePositionSequence", "ImagePositionPatient"),
                _frame_attr(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient"),
                _frame_attr(ds, f, "PixelMeasuresSequence", "PixelSpacing"),
                ds.SOPClassUID,
                ds.SOPInstanceUID,
                f + 1,
            )
            for f in source.frame_order or ()
        ]
    return [
        _plane(ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, ds.SOPClassUID, ds.SOPInstanceUID, None)
        for ds in source.datasets
    ]
