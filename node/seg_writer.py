"""Encode a :class:`LabelMap` as DICOM SEG (highdicom) or NIfTI.

* BINARY by default (every peer here accepts it), LABELMAP as an option;
* one segment per profile tissue, in profile order, with SNOMED CT category,
  type, laterality modifier (inside the type code, where TotalSegmentator's own
  writer drops it) and anatomic region; RecommendedDisplayCIELabValue from the
  profile colour; algorithm identification naming segnode, the backend, its
  version and the weights hash;
* every source image is referenced; frames map one to one onto source images
  (or source frames of a multi-frame CT), so the SEG overlays them exactly;
* empty segments are kept in the segment list (a reader learns the organ was
  looked for and not found) with no frames of their own; a result with no
  segmented voxel at all is written with its empty frames so it stays valid;
* UIDs are deterministic for (source series, profile, model version): a resend
  after a crash yields the same SEG, which a PACS stores once.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless

from segnode import __version__
from segnode.errors import EncodeError
from segnode.models.volume import LabelMap, Volume
from segnode.profiles.schema import Code, Profile, Tissue

logger = logging.getLogger(__name__)

MANUFACTURER = "segnode"


class SegType(str, Enum):
    BINARY = "binary"
    LABELMAP = "labelmap"


class OutputFormat(str, Enum):
    SEG = "seg"
    NIFTI = "nifti"


@dataclass(frozen=True)
class EncodedResult:
    path: Path
    series_instance_uid: str = ""
    sop_instance_uid: str = ""


def deterministic_uid(*parts: str) -> UID:
    """A ``2.25`` UID derived from ``parts`` (same parts → same UID).

    The first 128 bits of a SHA-256 digest, read as a UUID-style integer
    (PS3.5 B.2); at most 44 characters.
    """
    digest = hashlib.sha256("\x1f".join(("segnode", *parts)).encode()).digest()
    return UID(f"2.25.{int.from_bytes(digest[:16], 'big')}")


def _code(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def segment_description(number: int, tissue: Tissue, labels: LabelMap) -> hd.seg.SegmentDescription:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"segnode {labels.backend}"[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=(labels.model_version or __version__)[:64],
        parameters={"weights_sha256": labels.weights_hash or "none", "segnode": __version__},
    )
    assert tissue.category is not None and tissue.type is not None  # the profile validator ensures it
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=tissue.name[:64],
        segmented_property_category=_code(tissue.category),
        segmented_property_type=_code(tissue.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=str(deterministic_uid(labels.backend, labels.model_version, tissue.name)),
        tracking_id=tissue.name,
        anatomic_regions=[_code(tissue.anatomic_region)] if tissue.anatomic_region else None,
        display_color=hd.color.CIELabColor.from_rgb(*tissue.color),
    )
    if tissue.modifier is not None:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _code(tissue.modifier)
        ]
    description.SegmentDescription = tissue.description[:64]
    return description


def _frames_in_source_order(volume: Volume, array: np.ndarray) -> np.ndarray:
    """Volume slices → the frame order of the source images (multi-frame CT)."""
    order = volume.source.frame_order if volume.source else None
    if order is None:
        return array
    out = np.empty_like(array)
    out[list(order)] = array
    return out


def write_seg(
    volume: Volume,
    labels: LabelMap,
    profile: Profile,
    out_dir: Path,
    *,
    seg_type: SegType | str = SegType.BINARY,
    series_number: int = 9001,
) -> EncodedResult:
    """Write ``labels`` as a DICOM SEG referencing the source images of ``volume``."""
    seg_type = SegType(seg_type)
    if volume.source is None:
        raise EncodeError("the input has no DICOM source images (NIfTI?): a SEG needs them; use --format nifti")
    if labels.array.shape != volume.shape:
        raise EncodeError(f"label map shape {labels.array.shape} differs from the volume {volume.shape}")
    expected = profile.label_values()
    if dict(labels.labels) != expected:
        raise EncodeError(f"label map labels {labels.labels} do not match the profile segments {expected}")
    source = volume.source
    seed = (source.series_instance_uid, profile.organ, labels.backend, labels.model_version)
    series_uid = deterministic_uid(*seed, "series")
    sop_uid = deterministic_uid(*seed, "instance")
    array = _frames_in_source_order(volume, labels.array.astype(np.uint8, copy=False))
    present = set(np.unique(array).tolist()) - {0}
    descriptions = [segment_description(n, profile.tissue(name), labels) for n, name in expected.items()]
    empty = [name for n, name in expected.items() if n not in present]
    if empty:
        logger.info("empty segment(s) kept without frames: %s", ", ".join(empty))
    try:
        seg = hd.seg.Segmentation(
            source_images=list(source.datasets),
            pixel_array=array,
            segmentation_type=(
                hd.seg.SegmentationTypeValues.LABELMAP
                if seg_type is SegType.LABELMAP
                else hd.seg.SegmentationTypeValues.BINARY
            ),
            segment_descriptions=descriptions,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=f"segnode {labels.backend}"[:64],
            software_versions=__version__,
            device_serial_number="segnode",
            content_label=profile.organ.upper()[:16],
            content_description=f"{profile.organ} by {labels.backend}"[:64],
            content_creator_name="segnode^automatic",
            series_description=f"SEG {profile.organ} ({labels.backend})"[:64],
            transfer_syntax_uid=RLELossless if seg_type is SegType.LABELMAP else ExplicitVRLittleEndian,
            omit_empty_frames=bool(present),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodeError(f"highdicom refused the segmentation: {exc}", where=source.series_instance_uid) from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"SEG_{profile.organ}_{sop_uid}.dcm"
    seg.save_as(path)
    logger.info("wrote %s SEG %s (%d frames, %d segments)", seg_type.value, path, seg.NumberOfFrames, len(descriptions))
    return EncodedResult(path=path, series_instance_uid=str(series_uid), sop_instance_uid=str(sop_uid))


def write_nifti(volume: Volume, labels: LabelMap, profile: Profile, out_dir: Path, *, name: str | None = None) -> EncodedResult:
    """Write the label map as NIfTI (RAS affine; sheared grids kept exactly)."""
    import nibabel as nib

    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    image = nib.Nifti1Image(
        np.ascontiguousarray(labels.array.transpose(2, 1, 0)).astype(np.uint8), lps_to_ras @ volume.affine()
    )
    image.header.set_intent("label")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name or (volume.source.series_instance_uid if volume.source else "volume")
    path = out_dir / f"labels_{profile.organ}_{stem}.nii.gz"
    nib.save(image, path)
    return EncodedResult(path=path)
