"""QIDO-RS (PS3.18 10.6): search the node's studies, series and instances.

Rows are built from the instances' headers (:mod:`segnode.node.http_in.catalogue`):
a study from one instance of each of its series (the spooled series first), a
series from its first instance, an instance from its own header; the counts
(``NumberOfStudyRelatedSeries``...) and ``ModalitiesInStudy`` are computed.

Query parameters (PS3.18 8.3.4): ``{attribute}={value}`` by keyword or tag
(``PatientID``, ``00100020``) with single value matching, ``*`` and ``?``
wildcards (case-insensitive for person names), ``a-b`` ranges for dates and
times (either end may be open), UID lists (``uid1,uid2`` or ``uid1\\uid2``),
an empty value for universal matching; ``includefield`` (repeated or
comma-separated, ``all`` for every attribute of the header), ``limit``,
``offset``, ``fuzzymatching`` (accepted, not applied).  An unknown attribute or
parameter, or a bad value, is a 400 with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from http import HTTPStatus

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from segnode.node.http_in.base import HttpError
from segnode.node.http_in.catalogue import Catalogue, StoredInstance

MAX_RESULTS = 10_000
DEFAULT_LIMIT = 1000


class Level(str, Enum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


_PATIENT_STUDY = ("StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "PatientName", "PatientID",
                  "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription")
_SERIES = ("Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "SeriesDate", "SeriesTime",
           "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime")
_INSTANCE = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames")

#: attributes returned at each level (PS3.18 table 10.6.3-3..5), before includefield
DEFAULT_FIELDS: dict[Level, tuple[str, ...]] = {
    Level.STUDY: _PATIENT_STUDY + ("ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                                   "NumberOfStudyRelatedInstances"),
    Level.SERIES: _SERIES + ("NumberOfSeriesRelatedInstances",),
    Level.INSTANCE: _INSTANCE,
}
#: the study's attributes are returned too when series or instances are searched across studies
ACROSS_STUDIES = _PATIENT_STUDY
_CONTROL = {"includefield", "limit", "offset", "fuzzymatching"}
_STRING_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT", "DA", "TM", "DT", "AS", "IS", "DS", "UI"}
_RANGE_VRS = {"DA", "TM", "DT"}


@dataclass(frozen=True)
class Query:
    """A parsed QIDO-RS query: the matching keys, the fields to return, and the page."""

    keys: tuple[tuple[BaseTag, str], ...] = ()
    include: frozenset[BaseTag] = frozenset()
    include_all: bool = False
    limit: int = DEFAULT_LIMIT
    offset: int = 0

    @classmethod
    def parse(cls, query: Mapping[str, Sequence[str]]) -> Query:
        keys: list[tuple[BaseTag, str]] = []
        include: set[BaseTag] = set()
        include_all = False
        for name, values in query.items():
            if name == "includefield":
                for value in values:
                    for item in filter(None, (v.strip() for v in value.split(","))):
                        if item == "all":
                            include_all = True
                        else:
                            include.add(attribute_tag(item))
            elif name not in _CONTROL:
                tag = attribute_tag(name)
                for value in values:
                    check_value(tag, value)
                    keys.append((tag, value))
        return cls(tuple(keys), frozenset(include), include_all, _int(query, "limit", DEFAULT_LIMIT, MAX_RESULTS),
                   _int(query, "offset", 0, 10**9))


def _int(query: Mapping[str, Sequence[str]], name: str, default: int, high: int) -> int:
    values = query.get(name)
    if not values:
        return default
    raw = values[-1]
    if not raw.isdigit() or not 0 <= int(raw) <= high:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{name} must be an integer from 0 to {high}, not {raw[:20]!r}")
    return int(raw)


def attribute_tag(name: str) -> BaseTag:
    """The tag of a QIDO attribute given by keyword or as eight hex digits (400 when unknown)."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return Tag(int(name, 16))
    tag = tag_for_keyword(name) if re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,63}", name) else None
    if tag is None:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown attribute or parameter {name[:64]!r}")
    return Tag(tag)


def vr_of(tag: BaseTag) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def check_value(tag: BaseTag, value: str) -> None:
    """400 unless ``value`` can be matched against the attribute ``tag``."""
    vr = vr_of(tag)
    if vr == "SQ":
        raise HttpError(HTTPStatus.BAD_REQUEST, f"sequence matching is not supported ({keyword_for_tag(tag)})")
    if vr not in _STRING_VRS and vr not in {"US", "UL", "SS", "SL"}:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{keyword_for_tag(tag) or tag} cannot be matched (VR {vr})")
    if vr == "UI" and value and not all(re.fullmatch(r"[0-9.]{1,64}", u) for u in re.split(r"[,\\]", value)):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{keyword_for_tag(tag)} must be a UID or a list of UIDs")
    if vr in _RANGE_VRS and value and not re.fullmatch(r"[0-9.+-]{1,40}", value):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{keyword_for_tag(tag)} must be a {vr} value or range")
    if len(value) > 1024:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"the value of {keyword_for_tag(tag)} is too long")


# -- matching ------------------------------------------------------------------------------------


def _values(row: Dataset, tag: BaseTag) -> list[str]:
    if tag not in row:
        return []
    value = row[tag].value
    if value is None or value == "":
        return []
    items = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    return [str(v) for v in items]


def _wildcard(pattern: str, *, fold: bool) -> Callable[[str], bool]:
    regex = re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern),
                       re.IGNORECASE if fold else 0)
    return lambda text: regex.fullmatch(text) is not None


def _in_range(value: str, spec: str, vr: str) -> bool:
    low, _, high = spec.partition("-")
    width = {"DA": 8, "TM": 6}.get(vr, 14)
    text = value.replace(":", "")[:width]
    return (not low or text >= low.replace(":", "")[:width]) and (not high or text <= high.replace(":", "")[:width])


def matches(row: Dataset, tag: BaseTag, spec: str) -> bool:
    """Does ``row`` match the key ``tag=spec`` (PS3.4 C.2.2.2 as PS3.18 8.3.4 restricts it)?"""
    if spec == "":
        return True
    vr = vr_of(tag)
    values = _values(row, tag)
    if vr == "UI":
        wanted = set(re.split(r"[,\\]", spec))
        return any(v in wanted for v in values)
    if vr in _RANGE_VRS and "-" in spec:
        return any(_in_range(v, spec, vr) for v in values)
    if "*" in spec or "?" in spec:
        test = _wildcard(spec, fold=vr == "PN")
        return any(test(v) for v in values)
    if vr == "PN":
        return any(v.lower() == spec.lower() for v in values)
    return any(v == spec for v in values)


# -- rows ----------------------------------------------------------------------------------------


def _copy(target: Dataset, source: Dataset, tags: Iterable[BaseTag]) -> None:
    for tag in tags:
        if tag in source and tag not in target:
            target.add(source[tag])


def _tags(keywords: Iterable[str]) -> list[BaseTag]:
    return [Tag(k) for k in keywords]


@dataclass
class Row:
    """One result: the attributes a level returns, and the header they come from (for includefield)."""

    attributes: Dataset
    header: Dataset


def _group(instances: list[StoredInstance], key: Callable[[StoredInstance], str]) -> dict[str, list[StoredInstance]]:
    groups: dict[str, list[StoredInstance]] = {}
    for instance in instances:
        groups.setdefault(key(instance), []).append(instance)
    return groups


def series_row(catalogue: Catalogue, members: list[StoredInstance]) -> Row:
    header = catalogue.header(members[0])
    row = Dataset()
    _copy(row, header, _tags(_SERIES + _PATIENT_STUDY))
    row.SeriesInstanceUID = members[0].series_uid
    row.StudyInstanceUID = members[0].study_uid
    row.NumberOfSeriesRelatedInstances = len(members)
    return Row(row, header)


def study_row(catalogue: Catalogue, study_uid: str, instances: list[StoredInstance]) -> Row:
    by_series = _group(instances, lambda i: i.series_uid)
    firsts = sorted((members[0] for members in by_series.values()), key=lambda i: i.source != "spool")
    headers = [catalogue.header(i) for i in firsts]
    row = Dataset()
    _copy(row, headers[0], _tags(_PATIENT_STUDY))
    row.StudyInstanceUID = study_uid
    row.ModalitiesInStudy = sorted({str(h.Modality) for h in headers if h.get("Modality")})
    row.NumberOfStudyRelatedSeries = len(by_series)
    row.NumberOfStudyRelatedInstances = len(instances)
    return Row(row, headers[0])


def instance_row(catalogue: Catalogue, instance: StoredInstance) -> Row:
    header = catalogue.header(instance)
    row = Dataset()
    _copy(row, header, _tags(_INSTANCE + _SERIES + _PATIENT_STUDY))
    row.SOPInstanceUID, row.SOPClassUID = instance.sop_uid, instance.sop_class_uid
    row.SeriesInstanceUID, row.StudyInstanceUID = instance.series_uid, instance.study_uid
    return Row(row, header)


def rows(catalogue: Catalogue, level: Level, study_uid: str | None, series_uid: str | None) -> list[Row]:
    """Every candidate at ``level`` within the study / series in the path."""
    if level is Level.STUDY:
        uids = [study_uid] if study_uid else catalogue.study_uids()
        out = []
        for uid in uids:
            instances = catalogue.instances(uid)
            if instances:
                out.append(study_row(catalogue, uid, instances))
        return out
    instances = catalogue.instances(study_uid, series_uid)
    if level is Level.SERIES:
        return [series_row(catalogue, members) for members in _group(instances, lambda i: i.series_uid).values()]
    return [instance_row(catalogue, i) for i in instances]


def search(catalogue: Catalogue, level: Level, query: Query, *, study_uid: str | None = None,
           series_uid: str | None = None) -> list[dict[str, object]]:
    """The DICOM JSON answer of a QIDO-RS search."""
    found = [r for r in rows(catalogue, level, study_uid, series_uid)
             if all(matches(r.attributes, tag, spec) for tag, spec in query.keys)]
    page = found[query.offset:query.offset + query.limit]
    return [answer(r, level, query, across=study_uid is None) for r in page]


def answer(row: Row, level: Level, query: Query, *, across: bool) -> dict[str, object]:
    """The attributes of one result: the level's, the keys matched, the included fields."""
    out = Dataset()
    wanted = _tags(DEFAULT_FIELDS[level]) + (_tags(ACROSS_STUDIES) if across and level is not Level.STUDY else [])
    wanted += [Tag("StudyInstanceUID")]
    if level is not Level.STUDY:
        wanted += _tags(("SeriesInstanceUID",))
    _copy(out, row.attributes, wanted + [tag for tag, _ in query.keys] + sorted(query.include))
    if query.include_all:
        _copy(out, row.header, [e.tag for e in row.header if e.VR != "SQ" or level is Level.INSTANCE])
    else:
        _copy(out, row.header, sorted(query.include))
    for tag in DEFAULT_FIELDS[level]:  # PS3.18: a required attribute without a value is returned empty
        if Tag(tag) not in out:
            setattr(out, tag, None)
    return dict(sorted(out.to_json_dict(bulk_data_threshold=1 << 20,
                                        bulk_data_element_handler=lambda _: "").items()))
