"""What every output writer shares: result record, UID seeds, the source check, copied-attribute hygiene.

Each writer (:mod:`~segnode.node.writers.seg`, :mod:`~segnode.node.writers.rtstruct`,
:mod:`~segnode.node.writers.overlay`, :mod:`~segnode.node.writers.sr`,
:mod:`~segnode.node.writers.nifti`) returns an :class:`EncodedResult`, derives
its UIDs with :func:`deterministic_uid` from :func:`output_seed`, and names
segnode (:mod:`segnode.identity`) in its equipment attributes and file meta.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID
from segnode.errors import EncodeError
from segnode.models.volume import LabelMap, SourceSeries, Volume
from segnode.profiles.schema import Profile


class SegType(str, Enum):
    BINARY = "binary"
    LABELMAP = "labelmap"


class OutputFormat(str, Enum):
    SEG = "seg"
    NIFTI = "nifti"


class RtstructHoles(str, Enum):
    """How an RT Structure Set writes a region's holes (PS3.3 C.8.8.6.3; :mod:`segnode.node.writers.rtstruct`)."""

    KEYHOLE = "keyhole"  # one CLOSED_PLANAR contour per region, each hole entered through a zero-width cut
    XOR = "xor"  # every boundary a CLOSEDPLANAR_XOR contour; a plane's contours combine by exclusive or


@dataclass(frozen=True)
class EncodedResult:
    path: Path
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    kind: str = "seg"
    sop_class_uid: str = ""
    note: str = ""  # e.g. the resampling a NIfTI needed


def deterministic_uid(*parts: str) -> UID:
    """A ``2.25`` UID derived from ``parts`` (same parts → same UID).

    The first 128 bits of a SHA-256 digest, read as a UUID-style integer
    (PS3.5 B.2); at most 44 characters.
    """
    digest = hashlib.sha256("\x1f".join(("segnode", *parts)).encode()).digest()
    return UID(f"2.25.{int.from_bytes(digest[:16], 'big')}")


def checked_source(volume: Volume, labels: LabelMap, profile: Profile, why: str) -> SourceSeries:
    """``volume``'s DICOM source, once ``labels`` are known to fit the volume and the profile."""
    if volume.source is None:
        raise EncodeError(f"the input has no DICOM source images (NIfTI?): {why}")
    if labels.array.shape != volume.shape:
        raise EncodeError(f"label map shape {labels.array.shape} differs from the volume {volume.shape}")
    expected = profile.label_values()
    if dict(labels.labels) != expected:
        raise EncodeError(f"label map labels {labels.labels} do not match the profile segments {expected}")
    return volume.source


def source_seed(source: SourceSeries) -> str:
    """The source series and exactly which of its instances a result was made from.

    Part of every output's UID seed: the same instances give the same UIDs (a
    resend is stored once), a late instance gives a new version with new UIDs
    (a PACS keeps both; the node marks the older job superseded).
    """
    members = sorted(f"{ds.SOPInstanceUID}" for ds in source.datasets)
    if source.frame_order is not None:
        members.append(",".join(map(str, source.frame_order)))
    digest = hashlib.sha256("\n".join(members).encode()).hexdigest()[:16]
    return f"{source.series_instance_uid}/{digest}"


def output_seed(
    source: SourceSeries, profile: Profile, labels: LabelMap, kind: str, seg_type: SegType | str
) -> tuple[str, ...]:
    """Everything that makes one output object distinct, as the seed of its UIDs.

    Source instances (:func:`source_seed`), profile, backend and model version,
    output kind, SEG type.  A BINARY result keeps the seed it always had (a
    resend after an upgrade is still one object): the kind is left out for the
    SEG itself and "labelmap" is added only for a LABELMAP result, so no UID is
    shared between kinds or between the BINARY and LABELMAP results of a series.
    """
    seed: tuple[str, ...] = (source_seed(source), profile.organ, labels.backend, labels.model_version)
    if kind != "seg":
        seed += (kind,)
    if SegType(seg_type) is SegType.LABELMAP:
        seed += ("labelmap",)
    return seed


#: modules whose root attributes highdicom copies from the source image
_COPIED_MODULES = ("patient", "general-study", "patient-study", "clinical-trial-subject", "clinical-trial-study")


UNSTATED_DEID_METHOD = "unspecified: the source says identity removed, names no method"


def drop_empty_conditional(ds: Dataset) -> None:
    """Delete empty Type 1C/3 patient and study attributes (copied from a sloppy source).

    An empty Type 1C attribute is invalid (dciodvfy: "Empty attribute ... Type
    1C"); absent is what the source meant.  Type 1/2 attributes stay.
    """
    from highdicom._standard_utils import get_module_attribute_map

    table = get_module_attribute_map()
    for module in _COPIED_MODULES:
        for item in table.get(module, []):
            keyword = str(item["keyword"])
            if item["path"] or item["type"] not in ("1C", "3") or keyword not in ds:
                continue
            value = ds[keyword].value
            if value is None or value == "" or (ds[keyword].VR == "SQ" and len(value) == 0):
                delattr(ds, keyword)
    removed = str(ds.get("PatientIdentityRemoved", "")).upper() == "YES"
    if removed and "DeidentificationMethod" not in ds and "DeidentificationMethodCodeSequence" not in ds:
        ds.DeidentificationMethod = UNSTATED_DEID_METHOD  # required (1C) once identity removal is claimed
