"""A SEG's segments painted onto a job's source series: the geometry and segment checks of a correction.

A correction (:mod:`segnode.node.corrections`) is a SEG made in a viewer from
the node's own result: OHIF's segmentation mode or 3D Slicer edit it and store
it back.  Before it may replace the model's result it must lie on the source
series' grid and name only tissues of the job's organ profile:

* **geometry**: the same Frame of Reference, the same Rows and Columns, the
  image orientation of the source (cosines within :data:`ORIENTATION_TOL`) and
  every frame's Image Position on one of the source slices' positions (within
  :data:`POSITION_TOL_MM`, in plane and along the normal).  Frames are placed by
  where they are, not by the instances they claim to derive from, so a viewer
  that writes no per-frame references is read as well as one that does;
* **segments**: each segment maps onto a profile tissue, by its SegmentLabel
  (the tissue name, case and ``_``/space insensitive) or by its Segmented
  Property Type code with its modifier (laterality).  An unknown segment is
  refused, never dropped.

:func:`labels_on_grid` returns the label array on the volume's grid with the
profile's label values (1..N in profile order); it raises
:class:`CorrectionRefused` with a short reason for the sender (an Error
Comment holds 64 characters) and the metric reason it is counted under.
BINARY and FRACTIONAL SEGs (a fractional frame's voxel counts above half its
maximum) and LABELMAP SEGs are read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from segnode.errors import InputError
from segnode.models.volume import Volume
from segnode.profiles import Profile

#: how far a frame's position may lie from a source slice's (in plane and along the normal), mm
POSITION_TOL_MM = 0.1
#: how far the SEG's direction cosines may differ from the source's
ORIENTATION_TOL = 1e-3

GEOMETRY = "correction_geometry"
SEGMENTS = "correction_segments"
NO_JOB = "correction_no_job"
UNREADABLE = "correction_unreadable"
PENDING = "correction_pending"


class CorrectionRefused(InputError):
    """A SEG that cannot be taken as a correction; ``reason`` is its metric reason, the message its comment."""

    def __init__(self, message: str, *, reason: str, where: str | None = None) -> None:
        super().__init__(message, where=where)
        self.message = message
        self.reason = reason


def _key(text: str) -> str:
    return re.sub(r"[\s_-]+", "_", text.strip().lower())


def _code_pair(item: Dataset) -> tuple[str, str] | None:
    """(type code value, modifier code value or "") of a segment item."""
    types = item.get("SegmentedPropertyTypeCodeSequence") or []
    if not types:
        return None
    modifiers = types[0].get("SegmentedPropertyTypeModifierCodeSequence") or []
    return str(types[0].get("CodeValue", "")), str(modifiers[0].get("CodeValue", "")) if modifiers else ""


def segment_values(seg: Dataset, profile: Profile) -> dict[int, int]:
    """Segment number of the SEG → the profile's label value of the tissue it stands for."""
    by_name = {_key(name): value for value, name in profile.label_values().items()}
    by_code = {(t.type.value, t.modifier.value if t.modifier else ""): value
               for value, t in enumerate(profile.tissues, start=1) if t.type is not None}
    out: dict[int, int] = {}
    for item in seg.get("SegmentSequence") or []:
        number, label = int(item.SegmentNumber), str(item.get("SegmentLabel", ""))
        pair = _code_pair(item)
        value = by_name.get(_key(label)) or (by_code.get(pair) if pair is not None else None)
        if value is None:
            raise CorrectionRefused(f"segment {label[:20]!r} unknown to profile {profile.organ}"[:64],
                                    reason=SEGMENTS)
        out[number] = value
    if not out:
        raise CorrectionRefused("the SEG has no segments", reason=SEGMENTS)
    return out


def _orientation(seg: Dataset) -> np.ndarray:
    shared = (seg.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    planes = shared.get("PlaneOrientationSequence")
    if not planes:
        first = (seg.get("PerFrameFunctionalGroupsSequence") or [Dataset()])[0]
        planes = first.get("PlaneOrientationSequence")
    if not planes:
        raise CorrectionRefused("the SEG states no image orientation", reason=GEOMETRY)
    return np.asarray([float(v) for v in planes[0].ImageOrientationPatient], dtype=float)


def check_frame(seg: Dataset, volume: Volume) -> None:
    """Frame of reference, rows and columns, orientation of the SEG against the source volume."""
    source = volume.source
    expected_for = str(source.datasets[0].get("FrameOfReferenceUID", "")) if source and source.datasets else ""
    if str(seg.get("FrameOfReferenceUID", "")) != expected_for:
        raise CorrectionRefused("frame of reference differs from the source series", reason=GEOMETRY)
    if (int(seg.Rows), int(seg.Columns)) != volume.shape[1:]:
        raise CorrectionRefused(f"{seg.Rows}x{seg.Columns} frames on a {volume.shape[1]}x{volume.shape[2]} "
                                "series", reason=GEOMETRY)
    direction = np.asarray(volume.direction, dtype=float)
    cosines = np.concatenate([direction[:, 0], direction[:, 1]])
    if not np.allclose(_orientation(seg), cosines, atol=ORIENTATION_TOL):
        raise CorrectionRefused("image orientation differs from the source series", reason=GEOMETRY)


def frame_slices(seg: Dataset, volume: Volume) -> list[int]:
    """The source slice each frame lies on (by its Image Position), or refused."""
    origins = volume.slice_origins()
    out = []
    for n, frame in enumerate(seg.get("PerFrameFunctionalGroupsSequence") or [], start=1):
        positions = frame.get("PlanePositionSequence")
        if not positions:
            raise CorrectionRefused(f"frame {n} states no image position", reason=GEOMETRY)
        where = np.asarray([float(v) for v in positions[0].ImagePositionPatient], dtype=float)
        distances = np.linalg.norm(origins - where, axis=1)
        k = int(np.argmin(distances))
        if distances[k] > POSITION_TOL_MM:
            raise CorrectionRefused(f"frame {n} lies {distances[k]:.2f} mm off the source grid", reason=GEOMETRY)
        out.append(k)
    return out


def _frames(seg: Dataset) -> np.ndarray:
    try:
        pixels = np.asarray(seg.pixel_array)
    except Exception as exc:  # pydicom raises many types for pixel data it cannot decode
        raise CorrectionRefused(f"pixel data cannot be decoded ({type(exc).__name__})", reason=UNREADABLE) from exc
    return pixels[None] if pixels.ndim == 2 else pixels


def _frame_segments(seg: Dataset, count: int) -> Sequence[int]:
    numbers = []
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        ident = frame.get("SegmentIdentificationSequence")
        if not ident:
            raise CorrectionRefused(f"frame {n} names no segment", reason=SEGMENTS)
        numbers.append(int(ident[0].ReferencedSegmentNumber))
    return numbers[:count]


def labels_on_grid(seg: Dataset, volume: Volume, profile: Profile) -> np.ndarray:
    """The SEG's segments on ``volume``'s grid as the profile's label values (uint8), or refused."""
    values = segment_values(seg, profile)
    check_frame(seg, volume)
    slices = frame_slices(seg, volume)
    frames = _frames(seg)
    if len(frames) != len(slices):
        raise CorrectionRefused(f"{len(frames)} frames of pixel data for {len(slices)} frames", reason=UNREADABLE)
    out = np.zeros(volume.shape, dtype=np.uint8)
    if str(seg.get("SegmentationType", "")).upper() == "LABELMAP":
        for k, frame in zip(slices, frames):
            for number, value in values.items():
                out[k][frame == number] = value
        return out
    threshold = float(seg.get("MaximumFractionalValue", 2)) / 2.0
    fractional = str(seg.get("SegmentationType", "")).upper() == "FRACTIONAL"
    for k, frame, number in zip(slices, frames, _frame_segments(seg, len(frames))):
        if number not in values:
            raise CorrectionRefused(f"a frame names segment {number}, not in the SEG's list", reason=SEGMENTS)
        mask = frame > threshold if fractional else frame > 0
        out[k][mask] = values[number]
    return out
