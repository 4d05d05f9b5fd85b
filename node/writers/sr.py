"""Encode per-segment statistics as a TID 1500 Measurement Report (highdicom.sr, Comprehensive 3D SR).

* one measurement group (TID 1411) per non-empty segment, referencing that
  segment of the SEG at ``seg_path`` (ReferencedSegment, with its source
  images) and tracked by the segment's tracking UID / tissue name; a BINARY
  SEG's segment is referenced with the frames that hold it, a LABELMAP SEG's
  (whose frames hold several segments, with no per-frame Segment
  Identification) by its segment number alone, with the source images of the
  frames in which its value occurs;
* measurements: volume in mL (UCUM ``ml``) and mean attenuation in Hounsfield
  units (UCUM ``[hnsf'U]``, derivation Mean), the values of
  ``segment_statistics`` as computed (already rounded: 3 decimals mL, 0.1 HU;
  each slice counted with its own extent, :mod:`segnode.models.measurements`);
* the device observer names segnode, the backend and its model version, with
  the Device UID of the algorithm's contributing-equipment item (IHE AIR; one
  per backend, model version and weights hash), which replaces highdicom's;
* a newer result version has its version in the series number and description;
* with ``priors`` (the node's results on the patient's earlier studies), a
  group per segment on each prior and the change since it
  (:mod:`segnode.node.writers.sr_priors`);
* UIDs are deterministic (:func:`~segnode.node.writers.common.output_seed`: source
  series and its instances, organ, backend, model version, "sr", and the SEG
  type of the SEG it reports on, read from that SEG).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from segnode import __version__, identity
from segnode.errors import EncodeError
from segnode.models.measurements import SegmentStatistics
from segnode.models.volume import LabelMap, Volume
from segnode.node.writers.common import (
    EncodedResult,
    SegType,
    Algorithm,
    deterministic_uid,
    output_seed,
    stamp_algorithm,
    versioned_seed,
    versioned_series,
)
from segnode.node.writers.sr_priors import (
    LoadedPrior,
    PriorResult,
    change_measurements,
    declare_scheme,
    load_prior,
    prior_evidence,
    prior_group,
    study_date,
)
from segnode.profiles.schema import Code, Profile

logger = logging.getLogger(__name__)

ML = hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")
HU = hd.sr.CodedConcept(value="[hnsf'U]", scheme_designator="UCUM", meaning="Hounsfield unit")
ATTENUATION = hd.sr.CodedConcept(value="112031", scheme_designator="DCM", meaning="Attenuation Coefficient")
CT_PROCEDURE = hd.sr.CodedConcept(value="25045-6", scheme_designator="LN", meaning="CT unspecified body region")


def _code(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _observation_context(algorithm: Algorithm) -> hd.sr.ObservationContext:
    """The device observer: the algorithm, with the Device UID of its contributing-equipment item (IHE AIR)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=algorithm.device_uid,
        name=algorithm.model_name,
        manufacturer_name=identity.MANUFACTURER,
        model_name=f"{algorithm.model_name} {algorithm.version}"[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _groups(seg: hd.seg.Segmentation, stat: SegmentStatistics, profile: Profile, labels: LabelMap,
            priors: Sequence[LoadedPrior], current: Dataset) -> list[
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """The segment's group (with its change since each prior), then its group on each prior that has it."""
    tissue = profile.tissue(stat["tissue"])
    assert tissue.type is not None and tissue.category is not None  # the profile validator ensures it
    algorithm = _algorithm(labels)
    extra = [m for prior in priors for m in change_measurements(
        float(stat["volume_ml"]), study_date(current), prior, tissue.name, algorithm)]
    out = [_group(seg, stat, profile, labels, extra)]
    for prior in priors:
        if tissue.name in prior.volumes:
            number = prior.volumes[tissue.name][0]
            uid = deterministic_uid(str(prior.seg.SOPInstanceUID), tissue.name, "prior")
            out.append(prior_group(prior, tissue.name, _code(tissue.type), _code(tissue.category), uid, algorithm,
                                   referenced_segment(prior.seg, number)))
    return out


def _algorithm(labels: LabelMap) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=f"segnode {labels.backend}"[:64],
                                         version=labels.model_version or __version__)


def _group(
    seg: hd.seg.Segmentation, stat: SegmentStatistics, profile: Profile, labels: LabelMap,
    extra: Sequence[hd.sr.Measurement] = (),
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    number = int(stat["segment_number"])
    tissue = profile.tissue(stat["tissue"])
    assert tissue.type is not None and tissue.category is not None  # the profile validator ensures it
    mean_hu = stat["mean_hu"]
    if mean_hu is None:
        raise EncodeError(f"segment {number} ({tissue.name}) is empty: no measurement group")
    algorithm = _algorithm(labels)
    measurements = [
        hd.sr.Measurement(name=codes.SCT.Volume, value=float(stat["volume_ml"]), unit=ML, algorithm_id=algorithm),
        hd.sr.Measurement(
            name=ATTENUATION, value=float(mean_hu), unit=HU, derivation=codes.SCT.Mean, algorithm_id=algorithm
        ),
        *extra,
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
        referenced_segment=referenced_segment(seg, number),
        finding_type=_code(tissue.type),
        finding_category=_code(tissue.category),
        measurements=measurements,
    )


def seg_type_of(seg: Dataset) -> SegType:
    """BINARY or LABELMAP, as the SEG says (a FRACTIONAL SEG is not one segnode writes)."""
    value = str(seg.get("SegmentationType", "")).upper()
    if value == "LABELMAP":
        return SegType.LABELMAP
    if value == "BINARY":
        return SegType.BINARY
    raise EncodeError(f"the SEG's SegmentationType is {value or 'missing'}: segnode reports on BINARY or LABELMAP")


def referenced_segment(seg: hd.seg.Segmentation, number: int) -> hd.sr.ReferencedSegment:
    """Segment ``number`` of ``seg`` with the source images it was drawn on (TID 1411 row 'Referenced Segment')."""
    if seg_type_of(seg) is SegType.BINARY:
        return hd.sr.ReferencedSegment.from_segmentation(seg, number)
    sources: dict[tuple[str, int | None], hd.sr.SourceImageForSegmentation] = {}
    for frame_number, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        if not np.any(seg.get_stored_frame(frame_number) == number):
            continue
        for derivation in frame.get("DerivationImageSequence") or []:
            for image in derivation.get("SourceImageSequence") or []:
                frames = image.get("ReferencedFrameNumber")
                key = (str(image.ReferencedSOPInstanceUID), int(frames) if frames is not None else None)
                sources[key] = hd.sr.SourceImageForSegmentation(
                    referenced_sop_class_uid=image.ReferencedSOPClassUID,
                    referenced_sop_instance_uid=image.ReferencedSOPInstanceUID,
                    referenced_frame_numbers=[key[1]] if key[1] is not None else None,
                )
    if not sources:
        raise EncodeError(f"segment {number} occurs in no frame of the LABELMAP SEG")
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=number,
        source_images=list(sources.values()),
    )


def _segment_per_frame(seg: hd.seg.Segmentation) -> None:
    """Copy a shared Segment Identification into each frame (our in-memory copy only).

    A SEG with one segment may carry it in the shared functional groups (valid
    DICOM), but ``ReferencedSegment.from_segmentation`` reads it per frame.
    """
    shared = seg.SharedFunctionalGroupsSequence[0]
    if seg_type_of(seg) is SegType.LABELMAP or "SegmentIdentificationSequence" not in shared:
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
    statistics: list[SegmentStatistics],
    version: int = 1,
    priors: Sequence[PriorResult] = (),
) -> EncodedResult:
    """Write ``statistics`` (``segment_statistics``) as a TID 1500 report on the SEG at ``seg_path``.

    ``version``: the result's version, in the series number and description and the UID seed;
    ``priors``: the node's results on earlier studies of the patient, newest first (volume change).
    """
    source = volume.source
    if source is None:
        raise EncodeError("the input has no DICOM source images (NIfTI?): an SR needs them")
    try:
        seg = hd.seg.segread(seg_path)
    except (OSError, ValueError, AttributeError) as exc:
        raise EncodeError(f"cannot read the SEG the SR refers to: {exc}", where=str(seg_path)) from exc
    _segment_per_frame(seg)
    loaded = [load_prior(p) for p in priors]
    for prior in loaded:
        _segment_per_frame(prior.seg)
    present = [s for s in statistics if not s.get("empty") and s.get("voxels")]
    seed = versioned_seed(output_seed(source, profile, labels, "sr", seg_type_of(seg)), version)
    seed = (*seed, *(f"prior:{p.seg.SOPInstanceUID}" for p in loaded))  # no priors: the seed it always had
    algorithm = Algorithm.of(labels)
    series_number, series_description = versioned_series(
        "sr", f"SR measurements {profile.organ} ({labels.backend})", version)
    series_uid, sop_uid = deterministic_uid(*seed, "series"), deterministic_uid(*seed, "instance")
    try:
        report = hd.sr.MeasurementReport(
            observation_context=_observation_context(algorithm),
            procedure_reported=CT_PROCEDURE,
            # nothing segmented: a report with no measurement group (highdicom refuses an empty list)
            imaging_measurements=[g for s in present
                                  for g in _groups(seg, s, profile, labels, loaded, source.datasets[0])] or None,
        )
        sr = hd.sr.Comprehensive3DSR(
            evidence=[seg, *source.datasets, *(d for p in loaded for d in prior_evidence(p))],
            content=report,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=identity.MANUFACTURER,
            is_complete=True,
            series_description=series_description,
            software_versions=identity.SOFTWARE_VERSIONS,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise EncodeError(f"highdicom refused the measurement report: {exc}", where=source.series_instance_uid) from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"SR_{profile.organ}_{sop_uid}.dcm"
    sr.ManufacturerModelName = identity.MODEL_NAME
    declare_scheme(sr, loaded)
    stamp_algorithm(sr, algorithm)  # IHE AIR: the algorithm as contributing equipment, not highdicom
    identity.stamp_file_meta(sr.file_meta)
    sr.save_as(path)
    logger.info("wrote SR %s (%d measurement groups)", path, len(present))
    return EncodedResult(
        path=path, series_instance_uid=str(series_uid), sop_instance_uid=str(sop_uid),
        kind="sr", sop_class_uid=str(sr.SOPClassUID),
    )

