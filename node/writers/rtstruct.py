"""Encode a :class:`LabelMap` as a DICOM RT Structure Set (pydicom + scikit-image).

* one ROI per profile tissue, in profile order (ROI number = label value), with
  its colour (ROIDisplayColor), its SNOMED type code (RT ROI Identification
  Code Sequence), interpreted type ORGAN and generation algorithm AUTOMATIC;
* contours are traced per source slice with marching squares
  (:mod:`segnode.node.writers.polygons`): a polygon passes half-way between
  inside and outside pixel centres, so a fill at pixel centres gives back
  exactly the mask; a single pixel becomes a 4-point diamond around its centre
  and every small component is kept;
* holes as PS3.3 C.8.8.6.3 allows, chosen by ``holes`` (:class:`RtstructHoles`,
  the route's ``rtstruct_holes``): ``keyhole`` (default, what deployed readers
  fill right, plastimatch included) writes one CLOSED_PLANAR contour per
  connected region whose outline enters each hole through a zero-width cut, an
  island inside a hole being a region of its own; ``xor`` writes every
  boundary (outline, hole, island) as its own CLOSEDPLANAR_XOR contour, the
  contours of a plane combined by exclusive or;
* a contour longer than Explicit VR allows (Contour Data over 65,534 bytes,
  the note of PS3.3 Table C.8-42) makes the file Implicit VR Little Endian,
  which every DICOM peer accepts;
* points are in patient coordinates from each source image's own
  ImagePositionPatient / ImageOrientationPatient / PixelSpacing, so tilted
  and unevenly spaced series are exact; each contour references its image
  (and frame, for a multi-frame source);
* an empty segment keeps its ROI, with no contours;
* UIDs are deterministic (source series and its instances, organ, backend, model version, "rtstruct",
  SEG type, and "xor" for XOR holes, and the result version from 2 on);
* IHE AI Results: a ContributingEquipmentSequence item names the algorithm
  (:func:`~segnode.node.writers.common.algorithm_equipment`); a newer result
  version says so in its series number and description.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    UID,
    ImplicitVRLittleEndian,
    RTStructureSetStorage,
)
from segnode import identity
from segnode.errors import EncodeError
from segnode.models.volume import LabelMap, Volume
from segnode.node.writers.common import (
    EncodedResult,
    RtstructHoles,
    SegType,
    checked_source,
    Algorithm,
    deterministic_uid,
    output_seed,
    stamp_algorithm,
    versioned_seed,
    versioned_series,
)
from segnode.node.writers.planes import SourcePlane, patient_study_header, source_planes
from segnode.node.writers.polygons import keyhole_polygons, mask_contours
from segnode.profiles.schema import Profile, Tissue

logger = logging.getLogger(__name__)

#: PS3.3 C.8.8.5: the study is referenced with the (retired) Detached Study Management SOP class
STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"

#: the longest value Explicit VR can hold in a 2-byte length (even)
_EXPLICIT_VR_MAX = 0xFFFE


def _ds(value: float) -> str:
    return f"{float(value) + 0.0:.5f}"


def _contour_items(labels: LabelMap, value: int, planes: list[SourcePlane], holes: RtstructHoles) -> list[Dataset]:
    polygons, geometric_type = (keyhole_polygons, "CLOSED_PLANAR") if holes is RtstructHoles.KEYHOLE else \
        (mask_contours, "CLOSEDPLANAR_XOR")
    items: list[Dataset] = []
    for k, plane in enumerate(planes):
        mask = labels.array[k] == value
        if not mask.any():
            continue
        for polygon in polygons(mask):
            xyz = plane.to_patient(polygon[:, 0], polygon[:, 1])
            item = Dataset()
            item.ContourImageSequence = Sequence([plane.reference()])
            item.ContourGeometricType = geometric_type
            item.NumberOfContourPoints = len(xyz)
            item.ContourNumber = len(items) + 1
            item.ContourData = [_ds(v) for v in xyz.ravel()]
            items.append(item)
    return items


def _transfer_syntax(contours: list[Dataset]) -> UID:
    """Explicit VR Little Endian, or Implicit VR when a Contour Data value is too long for a 2-byte length."""
    longest = max((sum(len(str(v)) + 1 for v in item.ContourData) - 1
                   for roi in contours for item in roi.get("ContourSequence", [])), default=0)
    return ImplicitVRLittleEndian if longest > _EXPLICIT_VR_MAX else ExplicitVRLittleEndian


def _code_item(tissue: Tissue) -> Dataset:
    assert tissue.type is not None  # the profile validator ensures it
    code = Dataset()
    code.CodeValue = tissue.type.value
    code.CodingSchemeDesignator = tissue.type.scheme
    code.CodeMeaning = tissue.type.meaning
    return code


def _referenced_frame_of_reference(volume: Volume, planes: list[SourcePlane]) -> Dataset:
    source = volume.source
    assert source is not None
    series = Dataset()
    series.SeriesInstanceUID = source.series_instance_uid
    unique = {(p.sop_instance_uid, p.frame_number): p for p in planes}
    series.ContourImageSequence = Sequence([p.reference() for p in unique.values()])
    study = Dataset()
    study.ReferencedSOPClassUID = STUDY_COMPONENT_SOP_CLASS
    study.ReferencedSOPInstanceUID = source.study_instance_uid
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = source.datasets[0].FrameOfReferenceUID
    frame.RTReferencedStudySequence = Sequence([study])
    return frame


def _header(volume: Volume, labels: LabelMap, profile: Profile, series_uid: str, sop_uid: str, version: int) -> Dataset:
    source = volume.source
    assert source is not None  # write_rtstruct checked it (checked_source)
    first = source.datasets[0]
    ds = patient_study_header(first)
    now = datetime.datetime.now(datetime.timezone.utc)
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber, ds.SeriesDescription = versioned_series(
        "rtstruct", f"RTSTRUCT {profile.organ} ({labels.backend})", version)
    ds.OperatorsName = ""
    ds.InstanceNumber = 1
    ds.Manufacturer = identity.MANUFACTURER
    ds.ManufacturerModelName = identity.MODEL_NAME
    ds.SoftwareVersions = identity.SOFTWARE_VERSIONS
    stamp_algorithm(ds, Algorithm.of(labels))  # IHE AIR
    ds.StructureSetLabel = profile.organ.upper()[:16]
    ds.StructureSetName = f"{profile.organ} by {labels.backend}"[:64]
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")
    return ds


def write_rtstruct(
    volume: Volume, labels: LabelMap, profile: Profile, out_dir: Path, *, version: int = 1,
    seg_type: SegType | str = SegType.BINARY, holes: RtstructHoles | str = RtstructHoles.KEYHOLE,
) -> EncodedResult:
    """Write ``labels`` as an RT Structure Set referencing the source images of ``volume``.

    ``seg_type``: the SEG type of the result this structure set belongs to; it
    only seeds the UIDs (a BINARY and a LABELMAP result never share one).
    ``holes``: keyhole contours or CLOSEDPLANAR_XOR contours (:class:`RtstructHoles`).
    ``version``: the result's version, in the series number and description and the UID seed.
    """
    holes = RtstructHoles(holes)
    source = checked_source(volume, labels, profile, "an RT Structure Set needs them")
    planes = source_planes(volume)
    if "FrameOfReferenceUID" not in source.datasets[0]:
        raise EncodeError("the source has no FrameOfReferenceUID: contours cannot be placed", where=source.series_instance_uid)
    seed = versioned_seed(output_seed(source, profile, labels, "rtstruct", seg_type)
                          + (("xor",) if holes is RtstructHoles.XOR else ()), version)
    series_uid, sop_uid = deterministic_uid(*seed, "series"), deterministic_uid(*seed, "instance")
    ds = _header(volume, labels, profile, str(series_uid), str(sop_uid), version)
    frame_uid = source.datasets[0].FrameOfReferenceUID
    ds.FrameOfReferenceUID = frame_uid  # Frame of Reference module (RT Structure Set IOD since 2019)
    ds.PositionReferenceIndicator = source.datasets[0].get("PositionReferenceIndicator", "")
    ds.ReferencedFrameOfReferenceSequence = Sequence([_referenced_frame_of_reference(volume, planes)])
    rois, contours, observations = [], [], []
    for value, name in profile.label_values().items():
        tissue = profile.tissue(name)
        roi = Dataset()
        roi.ROINumber = value
        roi.ReferencedFrameOfReferenceUID = frame_uid
        roi.ROIName = name[:64]
        roi.ROIDescription = tissue.description[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        rois.append(roi)
        contour = Dataset()
        contour.ROIDisplayColor = list(tissue.color)
        contour.ReferencedROINumber = value
        items = _contour_items(labels, value, planes, holes)
        if items:
            contour.ContourSequence = Sequence(items)
        else:
            logger.info("empty ROI kept without contours: %s", name)
        contours.append(contour)
        observation = Dataset()
        observation.ObservationNumber = value
        observation.ReferencedROINumber = value
        observation.ROIObservationLabel = name[:16]  # SH
        observation.RTROIIdentificationCodeSequence = Sequence([_code_item(tissue)])
        observation.RTROIInterpretedType = "ORGAN"
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = _transfer_syntax(contours)
    identity.stamp_file_meta(ds.file_meta)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"RTSTRUCT_{profile.organ}_{sop_uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    logger.info("wrote RTSTRUCT %s (%d ROIs)", path, len(rois))
    return EncodedResult(
        path=path, series_instance_uid=str(series_uid), sop_instance_uid=str(sop_uid),
        kind="rtstruct", sop_class_uid=str(RTStructureSetStorage),
    )
