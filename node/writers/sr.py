"""Encode per-segment statistics as a TID 1500 Measurement Report (highdicom.sr, Comprehensive 3D SR).

* one measurement group (TID 1411) per non-empty segment, referencing that
  segment of the SEG at ``seg_path`` (ReferencedSegment, with its source
  images) and tracked by the segment's tracking UID / tissue name;
* measurements: volume in mL (UCUM ``ml``) and mean attenuation in Hounsfield
  units (UCUM ``[hnsf'U]``, derivation Mean), the values of
  ``segment_statistics`` as computed (already rounded: 3 decimals mL, 1 HU);
* the device observer names segnode, the backend and its model version;
* UIDs are deterministic (source series and its instances, organ, backend, model version, "sr").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import highdicom as hd
from pydicom.sr.codedict import codes
from segnode import __version__, identity
from segnode.errors import EncodeError
from segnode.models.volume import LabelMap, Volume
from segnode.node.writers.common import (
    EncodedResult,
    deterministic_uid,
    source_seed,
)
from segnode.profiles.schema import Code, Profile

logger = logging.getLogger(__name__)

ML = hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")
HU = hd.sr.CodedConcept(value="[hnsf'U]", scheme_designator="UCUM", meaning="Hounsfield unit")
ATTENUATION = hd.sr.CodedConcept(value="112031", scheme_designator="DCM", meaning="Attenuation Coefficient")
CT_PROCEDURE = hd.sr.CodedConcept(value="25045-6", scheme_designator="LN", meaning="CT unspecified body region")


def _code(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _observation_context(labels: LabelMap) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=deterministic_uid("device", labels.backend, labels.model_version),
        name=f"segnode {labels.backend}"[:64],
        manufacturer_name=identity.MANUFACTURER,
        model_name=(labels.model_version or __version__)[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _group(seg: hd.seg.Segmentation, stat: dict[str, Any], profile: Profile, labels: LabelMap):
    number = int(stat["segment_number"])
    tissue = profile.tissue(stat["tissue"])
    assert tissue.type is not None and tissue.category is not None  # the profile validator ensures it
    algorithm = hd.sr.AlgorithmIdentification(name=f"segnode {labels.backend}"[:64], version=labels.model_version or __version__)
    measurements = [
        hd.sr.Measurement(name=codes.SCT.Volume, value=float(stat["volume_ml"]), unit=ML, algorithm_id=algorithm),
        hd.sr.Measurement(
            name=ATTENUATION, value=float(stat["mean_hu"]), unit=HU, derivation=codes.SCT.Mean, algorithm_id=algorithm
        ),
    ]
    segment = next((s for s in seg.SegmentSequence if s.SegmentNumber == number), None)
    if segment is None:
        raise EncodeError(f"the SEG has no segment {number} ({tissue.name})")
    tracking_uid = segment.get("TrackingUID")  # the SR tracks the same finding as the SEG
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid or deterministic_uid(labels.backend, labels.model_version, tissue.name, "sr"),
            identifier=tissue.name,
        ),
        referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, number),
        finding_type=_code(tissue.type),
        finding_category=_code(tissue.category),
        measurements=measurements,
    )


def _segment_per_frame(seg: hd.seg.Segmentation) -> None:
    """Copy a shared Segment Identification into each frame (our in-memory copy only).

    A SEG with one segment may carry it in the shared functional groups (valid
    DICOM), but ``ReferencedSegment.from_segmentation`` reads it per frame.
    """
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "SegmentIdentificationSequence" not in shared:
        return
    for frame in seg.PerFrameFunctionalGroupsSequence:
        if "SegmentIdentificationSequence" not in frame:
            frame.SegmentIdentificationSequence = shared.SegmentIdentificationSequence


def write_sr(
    volume: Volume,
    labels: LabelMap,
    profile: Profile,
    out_dir: Path,
    *,
    seg_path: Path,
    statistics: list[dict],
    series_number: int = 9004,
) -> EncodedResult:
    """Write ``statistics`` (``segment_statistics``) as a TID 1500 report on the SEG at ``seg_path``."""
    source = volume.source
    if source is None:
        raise EncodeError("the input has no DICOM source images (NIfTI?): an SR needs them")
    try:
        seg = hd.seg.segread(seg_path)
    except (OSError, ValueError, AttributeError) as exc:
        raise EncodeError(f"cannot read the SEG the SR refers to: {exc}", where=str(seg_path)) from exc
    _segment_per_frame(seg)
    present = [s for s in statistics if not s.get("empty") and s.get("voxels")]
    seed = (source_seed(source), profile.organ, labels.backend, labels.model_version, "sr")
    series_uid, sop_uid = deterministic_uid(*seed, "series"), deterministic_uid(*seed, "instance")
    try:
        report = hd.sr.MeasurementReport(
            observation_context=_observation_context(labels),
            procedure_reported=CT_PROCEDURE,
            # nothing segmented: a report with no measurement group (highdicom refuses an empty list)
            imaging_measurements=[_group(seg, s, profile, labels) for s in present] or None,
        )
        sr = hd.sr.Comprehensive3DSR(
            evidence=[seg, *source.datasets],
            content=report,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=identity.MANUFACTURER,
            is_complete=True,
            series_description=f"SR measurements {profile.organ} ({labels.backend})"[:64],
            software_versions=identity.SOFTWARE_VERSIONS,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise EncodeError(f"highdicom refused the measurement report: {exc}", where=source.series_instance_uid) from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"SR_{profile.organ}_{sop_uid}.dcm"
    sr.ManufacturerModelName = identity.MODEL_NAME
    identity.stamp_file_meta(sr.file_meta)
    sr.save_as(path)
    logger.info("wrote SR %s (%d measurement groups)", path, len(present))
    return EncodedResult(
        path=path, series_instance_uid=str(series_uid), sop_instance_uid=str(sop_uid),
        kind="sr", sop_class_uid=str(sr.SOPClassUID),
    )

