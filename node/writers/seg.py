"""Encode a :class:`LabelMap` as DICOM SEG (highdicom).

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
* UIDs are deterministic for (source series and its instances, profile, model
  version, SEG type): a resend after a crash yields the same SEG, which a PACS
  stores once; a re-run after a late instance is a new version with new UIDs;
  the BINARY and LABELMAP SEG of one series never share a UID;
* every frame carries the SliceThickness of its own source image (per-frame
  Pixel Measures when the source thickness varies), and no SpacingBetweenSlices
  is declared for an unevenly spaced source;
* IHE AI Results: a ContributingEquipmentSequence item names the algorithm
  (Processing Equipment, model name, version, a Device UID per backend, model
  version and weights hash), replacing the item highdicom adds for itself;
* a newer result version (a late instance's re-run) has its version in the
  series number and description ("SEG lungs (hu_based) v2", 9011) and its UIDs;
* empty Type 1C/3 patient and study attributes copied from the source (an empty
  DeidentificationMethod) are dropped, and a LABELMAP SEG has no "Background"
  segment item 0 (pixel value 0 is simply not a segment).
"""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from segnode import __version__, identity
from segnode.errors import EncodeError
from segnode.models.volume import LabelMap, Volume
from segnode.node.writers.common import (
    EncodedResult,
    SegType,
    checked_source,
    deterministic_uid,
    Algorithm,
    drop_empty_conditional,
    output_seed,
    stamp_algorithm,
    versioned_seed,
    versioned_series,
)
from segnode.profiles.schema import Code, Profile, Tissue

logger = logging.getLogger(__name__)


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
    version: int = 1,
) -> EncodedResult:
    """Write ``labels`` as a DICOM SEG referencing the source images of ``volume``.

    ``version``: the result's version (a late instance's re-run is version 2, …): its series number and
    description say so (:func:`~segnode.node.writers.common.versioned_series`) and it seeds the UIDs.
    """
    seg_type = SegType(seg_type)
    source = checked_source(volume, labels, profile, "a SEG needs them; use --format nifti")
    seed = versioned_seed(output_seed(source, profile, labels, "seg", seg_type), version)  # BINARY v1: as always
    series_number, series_description = versioned_series("seg", f"SEG {profile.organ} ({labels.backend})", version)
    series_uid = deterministic_uid(*seed, "series")
    sop_uid = deterministic_uid(*seed, "instance")
    array = _frames_in_source_order(volume, labels.array.astype(np.uint8, copy=False))
    present = set(np.unique(array).tolist()) - {0}
    descriptions = [segment_description(n, profile.tissue(name), labels) for n, name in profile.label_values().items()]
    empty = [name for n, name in profile.label_values().items() if n not in present]
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
            manufacturer=identity.MANUFACTURER,
            manufacturer_model_name=identity.MODEL_NAME,
            software_versions=identity.SOFTWARE_VERSIONS,
            device_serial_number="segnode",
            content_label=profile.organ.upper()[:16],
            content_description=f"{profile.organ} by {labels.backend}"[:64],
            content_creator_name="segnode^automatic",
            series_description=series_description,
            transfer_syntax_uid=RLELossless if seg_type is SegType.LABELMAP else ExplicitVRLittleEndian,
            omit_empty_frames=bool(present),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodeError(f"highdicom refused the segmentation: {exc}", where=source.series_instance_uid) from exc
    drop_empty_conditional(seg)
    stamp_algorithm(seg, Algorithm.of(labels))  # IHE AIR: the algorithm, not highdicom, as contributing equipment
    if seg_type is SegType.LABELMAP:
        _drop_background_item(seg)
    _per_frame_pixel_measures(seg, volume)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"SEG_{profile.organ}_{sop_uid}.dcm"
    identity.stamp_file_meta(seg.file_meta)
    seg.save_as(path)
    logger.info("wrote %s SEG %s (%d frames, %d segments)", seg_type.value, path, seg.NumberOfFrames, len(descriptions))
    return EncodedResult(path=path, series_instance_uid=str(series_uid), sop_instance_uid=str(sop_uid),
                         kind="seg", sop_class_uid=str(seg.SOPClassUID))


def _drop_background_item(seg: Dataset) -> None:
    """highdicom 0.28 always adds a "Background" item with SegmentNumber 0; validators reject it."""
    seg.SegmentSequence = [item for item in seg.SegmentSequence if int(item.SegmentNumber) != 0]


def _source_measures(volume: Volume) -> dict[tuple[str, int | None], Dataset]:
    """(source SOP instance UID, frame number or None) → its Pixel Measures (thickness, spacing)."""
    source = volume.source
    assert source is not None
    out: dict[tuple[str, int | None], Dataset] = {}
    for ds in source.datasets:
        if source.multiframe:
            shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
            frames = ds.get("PerFrameFunctionalGroupsSequence") or []
            for n, group in enumerate(frames, start=1):
                seq = group.get("PixelMeasuresSequence") or shared.get("PixelMeasuresSequence")
                if seq:
                    out[(str(ds.SOPInstanceUID), n)] = seq[0]
        else:
            item = Dataset()
            item.PixelSpacing = ds.PixelSpacing
            if ds.get("SliceThickness") not in (None, ""):
                item.SliceThickness = ds.SliceThickness
            out[(str(ds.SOPInstanceUID), None)] = item
    return out


def _evenly_spaced(volume: Volume) -> bool:
    origins = volume.slice_origins()
    if len(origins) < 3:
        return True
    steps = np.linalg.norm(np.diff(origins, axis=0), axis=1)
    return float(np.ptp(steps)) <= 1e-3 * max(1.0, float(np.median(steps)))


def _per_frame_pixel_measures(seg: Dataset, volume: Volume) -> None:
    """Give each frame its source image's SliceThickness when those differ; no false slice spacing."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    if not _evenly_spaced(volume):
        for item in shared.get("PixelMeasuresSequence") or []:
            if "SpacingBetweenSlices" in item:
                del item.SpacingBetweenSlices
    measures = _source_measures(volume)
    thicknesses = {str(m.get("SliceThickness", "")) for m in measures.values()}
    if len(thicknesses) <= 1:
        return
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
        number = int(ref.ReferencedFrameNumber) if "ReferencedFrameNumber" in ref else None
        source = measures[(str(ref.ReferencedSOPInstanceUID), number)]
        item = Dataset()
        item.PixelSpacing = source.PixelSpacing
        if "SliceThickness" in source:
            item.SliceThickness = source.SliceThickness
        frame.PixelMeasuresSequence = [item]
    del shared.PixelMeasuresSequence


