"""An IHE IOCM Rejection Note for a superseded result: a Key Object Selection Document (highdicom.ko).

When a late instance re-runs a series, the newer result supersedes the
earlier job's; a destination with ``rejection_notes: true`` is then sent this
note after the new result is stored there (:mod:`segnode.node.sending.delivery`),
so the PACS hides the superseded objects (IHE RAD TF IOCM, "Rejection Note").

* document title (113001, DCM, "Rejected for Quality Reasons"): the superseded
  result was made from an incomplete series and is replaced by a better one,
  which is what IOCM's quality rejection is for (a re-acquired image replacing a
  poor one: hidden from normal display, kept for whoever needs it); (113037,
  DCM, "Rejected for Patient Safety Reasons") is for objects that must never be
  shown again (wrong patient, wrong side), which an earlier, incomplete result
  of the right patient is not;
* every superseded object (SEG, RTSTRUCT, overlay images, SR) is referenced in
  the content tree and in the Current Requested Procedure Evidence Sequence;
  all of them are in the source's study, and so is the note;
* the note's series number and description carry the new result's version
  (:func:`~segnode.node.writers.common.versioned_series`, kind ``rejection``);
  its UIDs are deterministic (source instances, profile, "rejection", version
  and the rejected instances), so a resend is stored once;
* IHE AIR: its ContributingEquipmentSequence names the algorithm of the new result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage
from segnode import identity
from segnode.errors import EncodeError
from segnode.models.volume import SourceSeries
from segnode.node.writers.common import (
    Algorithm,
    EncodedResult,
    deterministic_uid,
    drop_empty_conditional,
    source_seed,
    stamp_algorithm,
    versioned_series,
)
from segnode.node.writers.record import string_fields
from segnode.output_kinds import REJECTION_NOTE

logger = logging.getLogger(__name__)

#: IOCM's title for a superseded result (module docstring: why not "Rejected for Patient Safety Reasons")
REJECTED_FOR_QUALITY = hd.sr.CodedConcept(value="113001", scheme_designator="DCM",
                                          meaning="Rejected for Quality Reasons")
#: patient and study attributes the note copies from the source (highdicom reads each from its evidence)
_PATIENT_STUDY = ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                  "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")
#: SOP classes segnode writes that are images (an IMAGE reference in the note; the others are COMPOSITE)
_IMAGES = {str(SecondaryCaptureImageStorage)}


@dataclass(frozen=True)
class RejectedObject:
    """One object of a superseded result, as the node hands it to the worker (``options["rejects"]``)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> RejectedObject:
        """Strict: exactly this class's keys, each a non-empty string (:class:`InputError` otherwise)."""
        return cls(**string_fields(cls, data, "a rejected object", non_empty=True))


def _evidence(first: Dataset, study_uid: str, obj: RejectedObject) -> Dataset:
    """What highdicom needs of a referenced object: its UIDs and the patient and study it belongs to."""
    ds = Dataset()
    for keyword in _PATIENT_STUDY:
        setattr(ds, keyword, first.get(keyword, ""))
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = obj.series_instance_uid
    ds.SOPClassUID = obj.sop_class_uid
    ds.SOPInstanceUID = obj.sop_instance_uid
    if obj.sop_class_uid in _IMAGES:  # highdicom makes an IMAGE reference of what has Rows and Columns
        ds.Rows = ds.Columns = 1
    return ds


def write_rejection_note(
    source: SourceSeries, rejected: Sequence[RejectedObject], algorithm: Algorithm, out_dir: Path, *,
    profile: str, version: int,
) -> EncodedResult:
    """Write the IOCM Rejection Note for ``rejected`` (the superseded objects) into ``out_dir``."""
    if not rejected:
        raise EncodeError("a rejection note needs at least one rejected object", where=source.series_instance_uid)
    evidence = [_evidence(source.datasets[0], source.study_instance_uid, obj) for obj in rejected]
    seed = (source_seed(source), profile, REJECTION_NOTE, f"v{version}", *sorted(o.sop_instance_uid for o in rejected))
    series_uid, sop_uid = deterministic_uid(*seed, "series"), deterministic_uid(*seed, "instance")
    number, description = versioned_series(REJECTION_NOTE, f"REJECTED {profile} superseded by", version)
    try:
        content = hd.ko.KeyObjectSelection(
            document_title=REJECTED_FOR_QUALITY, referenced_objects=evidence,
            description=f"segnode {profile} result superseded by version {version} ({algorithm.model_name})"[:1024],
        )
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=evidence, content=content, series_instance_uid=series_uid, series_number=number,
            sop_instance_uid=sop_uid, instance_number=1, manufacturer=identity.MANUFACTURER,
            series_description=description,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodeError(f"highdicom refused the rejection note: {exc}", where=source.series_instance_uid) from exc
    kos.ManufacturerModelName = identity.MODEL_NAME
    kos.SoftwareVersions = identity.SOFTWARE_VERSIONS
    stamp_algorithm(kos, algorithm)
    drop_empty_conditional(kos)
    identity.stamp_file_meta(kos.file_meta)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"KO_{profile}_{sop_uid}.dcm"
    kos.save_as(path)
    logger.info("wrote rejection note %s (%d superseded object(s))", path, len(rejected))
    return EncodedResult(path=path, series_instance_uid=str(series_uid), sop_instance_uid=str(sop_uid),
                         kind=REJECTION_NOTE, sop_class_uid=str(kos.SOPClassUID))
