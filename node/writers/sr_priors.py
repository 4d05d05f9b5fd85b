"""Priors in the TID 1500 report: each segment's volume on the patient's earlier study, and the change.

For each prior (the node's own result on a series of an earlier study of the
patient: its SEG and its segment statistics) and each segment measured now
and then:

* a measurement group (TID 1411) for the prior, referencing that segment of
  the prior's SEG (so the report references the prior study: the SEG and its
  source images are other evidence, PS3.3 C.17.2.3), tracked as
  ``"<tissue> prior <YYYY-MM-DD>"``, with the prior volume in mL;
* in the current segment's group: the change since the prior in mL and in
  percent of the prior volume, and the interval in days (UCUM ``d``) when
  both studies have a StudyDate.

The change is the difference of two volumes measured independently on each
study: no registration is done or claimed.  The three concepts have no
standard code (PS3.16 has no "change since prior" for TID 300), so they are
segnode's own, in the private coding scheme ``99SEGNODE``, declared in the
report's Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import highdicom as hd
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from segnode.errors import EncodeError
from segnode.models.measurements import SegmentStatistics

SCHEME = "99SEGNODE"
VOLUME_CHANGE = hd.sr.CodedConcept(value="VOLCHG", scheme_designator=SCHEME,
                                   meaning="Volume change since prior study")
VOLUME_CHANGE_PERCENT = hd.sr.CodedConcept(value="VOLCHGPCT", scheme_designator=SCHEME,
                                           meaning="Volume change since prior study, percent")
INTERVAL = hd.sr.CodedConcept(value="PRIORINT", scheme_designator=SCHEME, meaning="Interval since prior study")
ML = hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")
PERCENT = hd.sr.CodedConcept(value="%", scheme_designator="UCUM", meaning="percent")
DAYS = hd.sr.CodedConcept(value="d", scheme_designator="UCUM", meaning="day")


@dataclass(frozen=True)
class PriorResult:
    """The node's result on a prior study's series: its SEG and the segment statistics measured on it.

    ``model_version``: of the result; a report keeps a prior only when it is the version it measures with.
    """

    seg_path: Path
    statistics: list[SegmentStatistics]
    model_version: str | None = None

    @classmethod
    def from_summary(cls, seg_path: Path, summary_path: Path, model_version: str | None) -> PriorResult:
        """A result as a job folder holds it: its SEG and its summary file (``segments``)."""
        if not seg_path.is_file():
            raise EncodeError("the prior's SEG is missing", where=str(seg_path))
        try:
            data = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EncodeError(f"cannot read the prior's summary: {exc}", where=str(summary_path)) from exc
        segments = data.get("segments") if isinstance(data, dict) else None
        return cls(seg_path, list(segments) if isinstance(segments, list) else [], model_version)


@dataclass(frozen=True)
class LoadedPrior:
    """A prior, read: its SEG, study date and volumes by tissue (non-empty segments only)."""

    seg: hd.seg.Segmentation
    study_date: date | None
    volumes: dict[str, tuple[int, float]]  # tissue -> (segment number, volume mL)

    @property
    def label(self) -> str:
        return self.study_date.isoformat() if self.study_date is not None else str(self.seg.StudyInstanceUID)


def load_prior(prior: PriorResult) -> LoadedPrior:
    try:
        seg = hd.seg.segread(prior.seg_path)
    except (OSError, ValueError, AttributeError) as exc:
        raise EncodeError(f"cannot read the prior's SEG: {exc}", where=str(prior.seg_path)) from exc
    volumes = {str(s["tissue"]): (int(s["segment_number"]), float(s["volume_ml"])) for s in prior.statistics
               if not s.get("empty") and s.get("voxels")}
    return LoadedPrior(seg, study_date(seg), volumes)


def study_date(ds: Dataset) -> date | None:
    """The dataset's StudyDate, or None when absent or not a DA value."""
    value = str(ds.get("StudyDate") or "").strip()
    try:
        return datetime.strptime(value, "%Y%m%d").date() if value else None
    except ValueError:
        return None


def change_measurements(volume_ml: float, current: date | None, prior: LoadedPrior, tissue: str,
                        algorithm: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    """The change of ``tissue``'s volume since ``prior`` (mL, %, and the interval in days when dated)."""
    if tissue not in prior.volumes:
        return []
    before = prior.volumes[tissue][1]
    change = round(volume_ml - before, 3)
    out = [hd.sr.Measurement(name=VOLUME_CHANGE, value=change, unit=ML, algorithm_id=algorithm)]
    if before > 0:
        out.append(hd.sr.Measurement(name=VOLUME_CHANGE_PERCENT, value=round(100.0 * change / before, 1),
                                     unit=PERCENT, algorithm_id=algorithm))
    if current is not None and prior.study_date is not None:
        out.append(hd.sr.Measurement(name=INTERVAL, value=float((current - prior.study_date).days), unit=DAYS))
    return out


def prior_group(prior: LoadedPrior, tissue: str, finding_type: hd.sr.CodedConcept,
                finding_category: hd.sr.CodedConcept, tracking_uid: str,
                algorithm: hd.sr.AlgorithmIdentification,
                referenced: hd.sr.ReferencedSegment) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """The TID 1411 group of ``tissue`` on the prior: its segment in the prior's SEG and its volume."""
    _, volume = prior.volumes[tissue]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=f"{tissue} prior {prior.label}"),
        referenced_segment=referenced,
        finding_type=finding_type,
        finding_category=finding_category,
        measurements=[hd.sr.Measurement(name=codes.SCT.Volume, value=volume, unit=ML, algorithm_id=algorithm)],
    )


def prior_evidence(prior: LoadedPrior) -> list[Dataset]:
    """The prior's SEG and stand-ins for the source images it references (UIDs only), as SR evidence."""
    seg = prior.seg
    out: list[Dataset] = [seg]
    for series in seg.get("ReferencedSeriesSequence") or []:
        for image in series.get("ReferencedInstanceSequence") or []:
            ds = Dataset()
            ds.StudyInstanceUID = seg.StudyInstanceUID
            ds.SeriesInstanceUID = series.SeriesInstanceUID
            ds.SOPClassUID = image.ReferencedSOPClassUID
            ds.SOPInstanceUID = image.ReferencedSOPInstanceUID
            out.append(ds)
    return out


def declare_scheme(sr: Dataset, priors: Sequence[LoadedPrior]) -> None:
    """Name the private coding scheme of the change concepts (PS3.3 C.12.1.1.3), when the report uses it."""
    if not priors:
        return
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "segnode local codes"
    item.CodingSchemeResponsibleOrganization = "segnode"
    existing = list(sr.get("CodingSchemeIdentificationSequence") or [])
    if not any(i.get("CodingSchemeDesignator") == SCHEME for i in existing):
        sr.CodingSchemeIdentificationSequence = DicomSequence([*existing, item])
