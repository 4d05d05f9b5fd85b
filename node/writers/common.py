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
from segnode.node.writers.copied_attributes import OPTIONAL_COPIED_ATTRIBUTES
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


UNSTATED_DEID_METHOD = "unspecified: the source says identity removed, names no method"


def drop_empty_conditional(ds: Dataset) -> None:
    """Delete empty Type 1C/3 patient and study attributes (copied from a sloppy source).

    An empty Type 1C attribute is invalid (dciodvfy: "Empty attribute ... Type
    1C"); absent is what the source meant.  Type 1/2 attributes stay.
    """
    for keyword in OPTIONAL_COPIED_ATTRIBUTES & set(ds.dir()):
        value = ds[keyword].value
        if value is None or value == "" or (ds[keyword].VR == "SQ" and len(value) == 0):
            delattr(ds, keyword)
    removed = str(ds.get("PatientIdentityRemoved", "")).upper() == "YES"
    if removed and "DeidentificationMethod" not in ds and "DeidentificationMethodCodeSequence" not in ds:
        ds.DeidentificationMethod = UNSTATED_DEID_METHOD  # required (1C) once identity removal is claimed


# -- result versions (a late instance's re-run supersedes; docs/node.md "A late instance") -----------------

#: the series number of each kind's first version; version n adds ``VERSION_STEP``·(n−1)
SERIES_NUMBERS: dict[str, int] = {"seg": 9001, "rtstruct": 9002, "overlay": 9003, "sr": 9004, "rejection": 9005}
#: wider than the number of kinds, so no two kinds or versions share a series number (9001, 9011, 9021 … SEG)
VERSION_STEP = 10


def versioned_series(kind: str, description: str, version: int = 1) -> tuple[int, str]:
    """(SeriesNumber, SeriesDescription) of version ``version`` of a ``kind`` result.

    Version 1 keeps the numbers segnode always wrote (SEG 9001, RTSTRUCT 9002,
    overlay 9003, SR 9004); version 2 of a SEG is 9011 "… v2", so a PACS user
    sees which series is the newer result.  Deterministic: the same version
    gives the same number and description.
    """
    if version < 1:
        raise EncodeError(f"a result version starts at 1, not {version}")
    number = SERIES_NUMBERS[kind] + VERSION_STEP * (version - 1)
    if version == 1:
        return number, description[:64]
    suffix = f" v{version}"
    return number, description[: 64 - len(suffix)] + suffix


def versioned_seed(seed: tuple[str, ...], version: int) -> tuple[str, ...]:
    """``seed`` with the result version (left out for version 1, so a first result keeps its UIDs)."""
    return seed if version == 1 else (*seed, f"v{version}")


# -- IHE AI Results: the algorithm as contributing equipment -----------------------------------------------

#: CID 7005 has no "algorithm" purpose; Processing Equipment is the equipment that made this instance from
#: the source images (Modifying Equipment is for equipment that changed an existing instance, PS3.3 C.12.1.1.5)
PROCESSING_EQUIPMENT = ("109102", "DCM", "Processing Equipment")
#: how highdicom names itself in the contributing equipment it adds (``ContributingEquipment.for_highdicom``)
_HIGHDICOM = "highdicom"


@dataclass(frozen=True)
class Algorithm:
    """The algorithm that made a result: backend, model version, weights hash (IHE AIR "algorithm identity")."""

    backend: str
    model_version: str
    weights_hash: str

    @classmethod
    def of(cls, labels: LabelMap) -> Algorithm:
        return cls(labels.backend, labels.model_version or "", labels.weights_hash or "")

    @property
    def device_uid(self) -> UID:
        """Stable for (backend, model version, weights hash): a fine-tuned model gets a new one."""
        return deterministic_uid("device", self.backend, self.model_version, self.weights_hash or "none")

    @property
    def model_name(self) -> str:
        return f"segnode {self.backend}"[:64]

    @property
    def version(self) -> str:
        from segnode import __version__

        return (self.model_version or __version__)[:64]


def _coded(value: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value
    return item


def algorithm_equipment(algorithm: Algorithm) -> Dataset:
    """The ContributingEquipmentSequence item IHE AIR asks for: the algorithm, its version and Device UID."""
    from segnode import identity

    item = Dataset()
    item.Manufacturer = identity.MANUFACTURER
    item.ManufacturerModelName = algorithm.model_name
    item.SoftwareVersions = [algorithm.version, f"segnode {identity.SOFTWARE_VERSIONS}"[:64]]
    item.DeviceUID = algorithm.device_uid
    item.PurposeOfReferenceCodeSequence = [_coded(PROCESSING_EQUIPMENT)]
    weights = f", weights sha256 {algorithm.weights_hash}" if algorithm.weights_hash else ""
    item.ContributionDescription = f"AI segmentation by segnode {algorithm.backend} {algorithm.version}{weights}"[:1024]
    return item


def stamp_algorithm(ds: Dataset, algorithm: Algorithm) -> None:
    """Name ``algorithm`` in ``ds``'s ContributingEquipmentSequence; drop an item naming highdicom as the maker.

    Other items (the source's acquisition equipment, which highdicom copies) stay.
    """
    kept = [item for item in ds.get("ContributingEquipmentSequence") or [] if not _names_highdicom(item)]
    ds.ContributingEquipmentSequence = [*kept, algorithm_equipment(algorithm)]


def _names_highdicom(item: Dataset) -> bool:
    """highdicom's item: "Highdicom open-source contributors", model "highdicom" (0.28)."""
    return any(_HIGHDICOM in str(item.get(k, "")).lower() for k in ("Manufacturer", "ManufacturerModelName"))


def algorithm_item(ds: Dataset) -> Dataset | None:
    """``ds``'s AIR item (Processing Equipment with a Device UID), if it has one."""
    for item in ds.get("ContributingEquipmentSequence") or []:
        purpose = item.get("PurposeOfReferenceCodeSequence") or []
        if purpose and str(purpose[0].get("CodeValue", "")) == PROCESSING_EQUIPMENT[0] and item.get("DeviceUID"):
            return item
    return None
