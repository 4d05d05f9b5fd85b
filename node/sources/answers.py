"""Query identifiers and the matches they answer, shared by the DIMSE (C-FIND) and DICOMweb (QIDO-RS) sources."""

from __future__ import annotations

from datetime import date, datetime, timedelta

from pydicom import Dataset
from segnode.node.sources.source import SeriesMatch, StudyMatch, StudyQuery


def study_identifier(query: StudyQuery) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = query.study_uid or ""
    ds.AccessionNumber = query.accession or ""
    ds.PatientID = query.patient_id or ""
    ds.StudyDate = date_range(query.since, query.before)
    ds.ModalitiesInStudy = query.modality or ""
    ds.StudyDescription = ""
    return ds


def date_range(since: date | None, before: date | None) -> str:
    """A DA range (PS3.4 C.2.2.2.5): from ``since`` (inclusive) to the day before ``before``."""
    if since is None and before is None:
        return ""
    low = since.strftime("%Y%m%d") if since else ""
    high = (before - timedelta(days=1)).strftime("%Y%m%d") if before else ""
    return f"{low}-{high}"


def parse_date(value: object) -> date | None:
    try:
        return datetime.strptime(str(value or "")[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value) if value not in (None, "") else None


def study_match(ds: Dataset) -> StudyMatch:
    modalities = ds.get("ModalitiesInStudy") or ()
    return StudyMatch(study_uid=str(ds.StudyInstanceUID), accession=_text(ds, "AccessionNumber"),
                      patient_id=_text(ds, "PatientID"), study_date=parse_date(ds.get("StudyDate")),
                      modalities=(str(modalities),) if isinstance(modalities, str) else tuple(map(str, modalities)),
                      description=_text(ds, "StudyDescription"))


def series_match(study_uid: str, ds: Dataset) -> SeriesMatch:
    number, count = _text(ds, "SeriesNumber"), _text(ds, "NumberOfSeriesRelatedInstances")
    return SeriesMatch(study_uid=study_uid, series_uid=str(ds.SeriesInstanceUID), modality=_text(ds, "Modality"),
                       series_number=int(number) if number and number.lstrip("-").isdigit() else None,
                       description=_text(ds, "SeriesDescription"),
                       instance_count=int(count) if count and count.isdigit() else None)
