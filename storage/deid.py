"""De-identification by DICOM PS3.15 Annex E (Basic Application Level Confidentiality Profile).

Every attribute is handled by the action that the standard's own table
(:mod:`segnode.storage.deid_table`) gives it under the chosen options:

* ``X`` removed, ``Z`` emptied, ``D`` replaced by a dummy of the attribute's VR,
  ``U`` replaced by a keyed pseudonym UID (:mod:`segnode.storage.pseudonyms`), ``K`` kept;
* ``C`` cleaned, by VR (:meth:`Deidentifier.cleaning`): dates and date-times moved
  by one keyed number of days per patient and times of day by one keyed number
  of seconds (time-zone offsets dropped); AE titles replaced by keyed pseudonyms;
  free text scrubbed of the identifying values found in the same object, but only
  where Clean Descriptors says ``C`` for it (free text that no enabled option
  lets us scrub, such as Allergies under Retain Patient Characteristics alone,
  is removed: it cannot be shown to be free of identity); anything else that
  cannot be cleaned (binary timestamps with VR OB, ...) is removed;
* dates, date-times and times that the table does not list are cleaned the same way;
* sequences not in the table are walked item by item with the same rules;
* private attributes (odd groups), curve groups 50xx, overlay groups 60xx, group
  lengths and standard-group elements the data dictionary does not know are removed;
* text inside encapsulated pixel data (JPEG COM/APPn segments, JPEG 2000
  comments) is removed without re-encoding (:mod:`segnode.storage.pixel_text`);
* any other UID that is not a registered (class, transfer syntax, coding
  scheme) UID is remapped too, so no instance UID survives anywhere;
* PatientID, PatientName and AccessionNumber carry keyed pseudonyms (a ``D``
  or ``Z`` value the standard allows), so studies of one patient stay linked.

:func:`burned_in_reason` says whether an object may carry burned-in text; such
objects are quarantined by the dataset store and never harvested.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from pathlib import Path

import pydicom
from pydicom.datadict import get_entry
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID_dictionary
from segnode.errors import InputError
from segnode.identity import stamp_file_meta
from segnode.storage.deid_table import (
    BASIC_PROFILE_CODE,
    OPTION_CODES,
    Action,
    Option,
    Table,
    load_table,
)
from segnode.storage.pixel_text import strip_stream_text
from segnode.storage.pseudonyms import Pseudonymizer

logger = logging.getLogger(__name__)

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
ACCESSION = 0x00080050
ISSUER_OF_PATIENT_ID = 0x00100021

#: UIDs that name a class, a syntax or a scheme, never an instance: kept as they are.
_CLASS_LIKE = re.compile(r"Class|TransferSyntax|CodingScheme|MappingResource|ContextGroup|Creator")

#: groups removed whole: file meta found in the body (rebuilt), curves 50xx, overlays 60xx
_DROPPED_GROUPS = frozenset({0x0002, *range(0x5000, 0x5020, 2), *range(0x6000, 0x6020, 2)})

_DUMMY: dict[str, object] = {
    "PN": "ANONYMOUS",
    "AE": "ANONYMOUS",
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
    "UR": "urn:anonymized",
    "US": 0, "SS": 0, "UL": 0, "SL": 0, "FL": 0.0, "FD": 0.0, "SV": 0, "UV": 0, "AT": 0,
}
_TEXT_VRS = {"LO", "SH", "ST", "LT", "UT", "UC", "PN", "CS", "AE"}
_BINARY_VRS = {"OB", "OW", "OD", "OF", "OL", "OV", "UN"}
_TEMPORAL_VRS = {"DA", "DT", "TM"}
_TM = re.compile(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?")
_DT_OFFSET = re.compile(r"[+-]\d{4}$")

SECONDARY_CAPTURE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.7.1",
    "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4",
}
DOCUMENT_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.67": "X-Ray Radiation Dose SR",
    "1.2.840.10008.5.1.4.1.1.88.68": "Radiopharmaceutical Radiation Dose SR",
    "1.2.840.10008.5.1.4.1.1.88.76": "Patient Radiation Dose SR",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
}


class Cleaning(str, Enum):
    """What a ``C`` does to one attribute, by its VR and the options."""

    WALK = "walked"  #: a sequence: its items are de-identified by the same rules
    SHIFT = "shifted"  #: a date, time or date-time moved by the patient's keyed shift
    PSEUDONYM = "pseudonym"  #: an AE title replaced by a keyed pseudonym
    SCRUB = "scrubbed"  #: free text kept without the identifying values of its object
    REMOVE = "removed"  #: cannot be shown clean (free text not under Clean Descriptors, OB, offsets)


def burned_in_reason(ds: Dataset) -> str | None:
    """Why ``ds`` may carry burned-in text, or ``None`` if it may be harvested.

    BurnedInAnnotation other than ``NO``, secondary captures, dose reports and
    encapsulated documents are refused.  An absent BurnedInAnnotation counts as
    ``NO`` for other classes (the CT Image IOD does not require it).  The reason
    never quotes a value of the object.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in SECONDARY_CAPTURE_CLASSES:
        return "secondary capture (may carry burned-in text)"
    if sop_class in DOCUMENT_CLASSES:
        return f"{DOCUMENT_CLASSES[sop_class]} (dose report or document)"
    burned = ds.get("BurnedInAnnotation")
    if burned is not None and str(burned).strip().upper() != "NO":
        return "BurnedInAnnotation is not NO"
    image_type = {str(v).upper() for v in ds.get("ImageType", [])} if "ImageType" in ds else set()
    if image_type & {"SCREEN SAVE", "DOSE_INFO", "DOSE INFO", "DOSE REPORT"}:
        return "ImageType marks a screen capture or dose report"
    if "DOSE" in str(ds.get("SeriesDescription", "")).upper():
        return "series described as a dose report"
    return None


def patient_key(ds: Dataset) -> str:
    """What identifies the patient for pseudonyms and the date shift.

    IssuerOfPatientID + PatientID; without a PatientID each study is its own
    patient (keyed by StudyInstanceUID).
    """
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        return f"{str(ds.get('IssuerOfPatientID', '') or '').strip()}|{pid}"
    return "study|" + str(ds.get("StudyInstanceUID", "") or "").strip()


def shift_date(value: str, days: int) -> str:
    """Move a DA value (or a ``from-to`` range) ``days`` into the past; ``""`` if unparseable."""
    parts = value.split("-")
    try:
        moved = [
            (dt.datetime.strptime(p.strip(), "%Y%m%d").date() - dt.timedelta(days=days)).strftime("%Y%m%d")
            if p.strip() else ""
            for p in parts
        ]
    except ValueError:
        return ""
    return "-".join(moved)


def shift_time(value: str, seconds: int) -> str:
    """Move a TM value (or a ``from-to`` range) ``seconds`` later, modulo a day; ``""`` if unparseable.

    The precision of the value (hours, minutes, seconds, fraction) is kept.
    """
    moved = [_shift_one_time(p.strip(), seconds) if p.strip() else "" for p in value.split("-")]
    return "" if None in moved else "-".join(m or "" for m in moved)


def _shift_one_time(text: str, seconds: int) -> str | None:
    match = _TM.fullmatch(text)
    if match is None or int(match[1]) > 23 or int(match[2] or 0) > 59 or int(match[3] or 0) > 60:
        return None
    total = (int(match[1]) * 3600 + int(match[2] or 0) * 60 + min(int(match[3] or 0), 59) + seconds) % 86400
    out = f"{total // 3600:02d}"
    if match[2]:
        out += f"{total // 60 % 60:02d}"
    if match[3]:
        out += f"{total % 60:02d}" + (match[4] or "")
    return out


def shift_datetime(value: str, days: int, seconds: int = 0) -> str:
    """Move a DT value: its date ``days`` into the past, its time of day ``seconds`` later.

    Date and time move apart (no carry), as a DA and TM pair does; the UTC
    offset is dropped.  ``""`` if unparseable.
    """
    text = _DT_OFFSET.sub("", value.strip())
    date = shift_date(text[:8], days) if len(text) >= 8 else ""
    time = shift_time(text[8:], seconds) if len(text) > 8 else ""
    return "" if not date or (len(text) > 8 and not time) else date + time


@lru_cache(maxsize=4096)
def unknown_tag(tag: int) -> bool:
    """A group length, or a standard-group element that the data dictionary does not know."""
    if tag & 0xFFFF == 0:
        return True
    try:
        get_entry(tag)
    except KeyError:
        return True
    return False


@dataclass(frozen=True)
class DeidResult:
    """What one de-identification produced, besides the modified dataset."""

    dataset: Dataset
    patient_pseudonym: str
    date_shift_days: int | None
    #: whether text was removed from the encapsulated pixel data
    pixel_text_removed: bool = False


@dataclass
class _Context:
    shift_days: int | None
    shift_seconds: int
    scrub: tuple[str, ...]


class Deidentifier:
    """Applies Table E.1-1 under a set of options with keyed pseudonyms.

    Parameters
    ----------
    pseudonyms:
        Keyed pseudonym source; the same secret gives the same output.
    options:
        Profile options (:class:`~segnode.storage.deid_table.Option` or their names).
    """

    def __init__(self, pseudonyms: Pseudonymizer, options: Iterable[Option | str] = ()) -> None:
        self.pseudonyms = pseudonyms
        self.options = frozenset(Option(o) for o in options)
        self.table: Table = load_table()
        self._actions: dict[int, Action | None] = {}

    def action_for(self, tag: int) -> Action | None:
        """The resolved action for ``tag`` (``None``: not in the table)."""
        if tag not in self._actions:
            row = self.table.row_for(tag)
            self._actions[tag] = None if row is None else row.action(self.options, tag)
        return self._actions[tag]

    def scrubbed(self, tag: int) -> bool:
        """Whether a ``C`` on ``tag`` scrubs its text (Clean Descriptors on and ``C`` for it)."""
        row = self.table.row_for(tag)
        return (Option.CLEAN_DESCRIPTORS in self.options and row is not None
                and row.options.get(Option.CLEAN_DESCRIPTORS) is Action.CLEAN)

    def cleaning(self, tag: int, vr: str) -> Cleaning:
        """What a ``C`` on ``tag`` (of VR ``vr``) does under these options."""
        if vr == "SQ":
            return Cleaning.WALK
        if vr in _TEMPORAL_VRS:
            shifting = Option.RETAIN_LONGITUDINAL_MODIFIED_DATES in self.options
            return Cleaning.SHIFT if shifting else Cleaning.REMOVE
        if vr == "AE":
            return Cleaning.PSEUDONYM
        if vr in _TEXT_VRS and self.scrubbed(tag):
            return Cleaning.SCRUB
        return Cleaning.REMOVE

    def deidentify(self, ds: Dataset) -> DeidResult:
        """De-identify ``ds`` in place and return it with its pseudonyms.

        The file meta is rebuilt and the preamble cleared.  Raises
        :class:`~segnode.storage.pixel_text.PixelTextError` when the pixel data may hold
        text that cannot be removed losslessly.
        """
        pixel_text_removed = strip_stream_text(ds)
        key = patient_key(ds)
        shifting = Option.RETAIN_LONGITUDINAL_MODIFIED_DATES in self.options
        ctx = _Context(
            shift_days=self.pseudonyms.date_shift_days(key) if shifting else None,
            shift_seconds=self.pseudonyms.time_shift_seconds(key) if shifting else 0,
            scrub=self._scrub_terms(ds) if Option.CLEAN_DESCRIPTORS in self.options else (),
        )
        self._walk(ds, ctx)
        pseudonym = self.pseudonyms.patient_id(key)
        self._stamp(ds, pseudonym, shifting)
        return DeidResult(ds, pseudonym, ctx.shift_days, pixel_text_removed)

    # --- walking --------------------------------------------------------------------------
    def _walk(self, ds: Dataset, ctx: _Context) -> None:
        for tag in list(ds.keys()):
            elem = ds[tag]  # converts raw elements (UN with a known tag gets its real VR)
            self._apply(ds, elem, ctx)

    def _apply(self, ds: Dataset, elem: DataElement, ctx: _Context) -> None:
        tag = int(elem.tag)
        if elem.tag.is_private or elem.VR == "UN" or (tag >> 16) in _DROPPED_GROUPS or unknown_tag(tag):
            del ds[tag]  # private, uninspectable, file meta in the body, curves, overlays, unknown
            return
        if tag in (PATIENT_ID, PATIENT_NAME, ACCESSION):
            elem.value = self._identity_pseudonym(tag, ds, elem)
            return
        action = self.action_for(tag)
        if action is None and elem.VR in _TEMPORAL_VRS:
            self._clean(ds, elem, ctx)  # a date or time the table does not list
        elif action is None:
            self._keep(elem, ctx)
        elif action is Action.REMOVE:
            del ds[tag]
        elif action is Action.EMPTY:
            elem.value = DicomSequence() if elem.VR == "SQ" else None
        elif action is Action.DUMMY:
            elem.value = DicomSequence() if elem.VR == "SQ" else self._dummy(elem)
        elif action is Action.UID:
            elem.value = self._remap(elem.value) if elem.VR == "UI" else None
        elif action in (Action.UID_SEQUENCE, Action.KEEP):
            self._keep(elem, ctx)
        else:
            self._clean(ds, elem, ctx)

    def _identity_pseudonym(self, tag: int, ds: Dataset, elem: DataElement) -> str:
        if tag == ACCESSION:
            text = str(elem.value or "").strip()
            return self.pseudonyms.accession(text) if text else ""
        return self.pseudonyms.patient_id(patient_key(ds))

    def _keep(self, elem: DataElement, ctx: _Context) -> None:
        if elem.VR == "SQ":
            for item in elem.value:
                self._walk(item, ctx)
        elif elem.VR == "UI" and not _CLASS_LIKE.search(elem.keyword or "Unknown"):
            elem.value = self._remap(elem.value)

    def _remap(self, value: object) -> object:
        if value is None or value == "":
            return value
        if isinstance(value, str):
            return value if value in UID_dictionary else self.pseudonyms.uid(value)
        if isinstance(value, Iterable):
            return [self._remap(v) for v in value]  # multi-valued
        raise TypeError(f"a UID value of type {type(value).__name__}")

    def _dummy(self, elem: DataElement) -> object:
        if elem.VR == "UI":
            return self._remap(elem.value) if elem.value else self.pseudonyms.uid("dummy")
        if elem.VR in _BINARY_VRS:
            return b"\x00\x00"
        return _DUMMY.get(elem.VR, "ANONYMIZED")

    def _clean(self, ds: Dataset, elem: DataElement, ctx: _Context) -> None:
        """``C``: keep what can be kept without identity; remove what cannot be cleaned."""
        how = self.cleaning(int(elem.tag), elem.VR)
        if how is Cleaning.WALK:
            self._keep(elem, ctx)
        elif how is Cleaning.SHIFT:
            elem.value = self._shift(elem, ctx)
        elif how is Cleaning.PSEUDONYM:
            elem.value = self.pseudonyms.ae_title(str(elem.value or "")) if elem.value else elem.value
        elif how is Cleaning.SCRUB:
            elem.value = self._scrub(elem.value, ctx)
        else:  # unscrubbable free text, TimezoneOffsetFromUTC, OB timestamps, unshifted dates
            del ds[elem.tag]

    def _shift(self, elem: DataElement, ctx: _Context) -> object:
        assert ctx.shift_days is not None
        if not elem.value:
            return elem.value
        values = [elem.value] if isinstance(elem.value, str) else list(elem.value)
        moved = [self._shift_one(elem.VR, str(v), ctx) for v in values]
        return moved[0] if len(moved) == 1 else moved

    @staticmethod
    def _shift_one(vr: str, value: str, ctx: _Context) -> str:
        assert ctx.shift_days is not None
        if vr == "DA":
            return shift_date(value, ctx.shift_days)
        if vr == "TM":
            return shift_time(value, ctx.shift_seconds)
        return shift_datetime(value, ctx.shift_days, ctx.shift_seconds)

    # --- clean descriptors ----------------------------------------------------------------
    def _scrub_terms(self, ds: Dataset) -> tuple[str, ...]:
        """Identifying strings of this object (values of attributes not kept), longest first."""
        terms: set[str] = set()
        for elem in ds.iterall():
            if elem.VR not in _TEXT_VRS | {"DA", "DT"} or not self._removed(int(elem.tag)):
                continue
            values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
            for value in (str(v) for v in values if v is not None):
                terms.add(value.strip())
                terms.update(re.split(r"[\^=\s,/]+", value))
        return tuple(sorted((t for t in terms if len(t) >= 3), key=len, reverse=True))

    def _removed(self, tag: int) -> bool:
        """Whether the value of ``tag`` goes (so it is identifying wherever else it appears)."""
        if (tag >> 16) % 2 == 1 or unknown_tag(tag):
            return True
        return self.action_for(tag) not in (None, Action.KEEP, Action.CLEAN)

    def _scrub(self, value: object, ctx: _Context) -> object:
        if value is None:
            return value
        if not isinstance(value, str):
            if isinstance(value, Iterable):
                return [self._scrub(v, ctx) for v in value]
            raise TypeError(f"a text value of type {type(value).__name__}")
        text = str(value)
        for term in ctx.scrub:
            text = re.sub(re.escape(term), "", text, flags=re.IGNORECASE)
        text = re.sub(r"\d{5,}", "", text)  # long digit runs: dates, IDs, phone numbers
        return re.sub(r"\s{2,}", " ", text).strip()

    # --- stamping -------------------------------------------------------------------------
    def _stamp(self, ds: Dataset, pseudonym: str, shifting: bool) -> None:
        ds.PatientID = pseudonym
        ds.PatientName = pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if shifting else "REMOVED"
        used = [BASIC_PROFILE_CODE] + [OPTION_CODES[o] for o in sorted(self.options, key=str)]
        ds.DeidentificationMethod = ["segnode PS3.15 E.1"] + [meaning[:64] for _, meaning in used]
        ds.DeidentificationMethodCodeSequence = DicomSequence([_code(v, m) for v, m in used])
        ds.preamble = b"\x00" * 128
        ds.file_meta = _file_meta(ds)


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def _file_meta(ds: Dataset) -> FileMetaDataset:
    old = getattr(ds, "file_meta", None)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = old.TransferSyntaxUID if old is not None and "TransferSyntaxUID" in old else (
        pydicom.uid.ExplicitVRLittleEndian
    )
    stamp_file_meta(meta)
    return meta


def read_dicom(path: Path) -> Dataset:
    """Read one file, translating pydicom's errors to :class:`InputError`."""
    try:
        return pydicom.dcmread(path)
    except (OSError, pydicom.errors.InvalidDicomError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read DICOM: {exc}", where=path.name) from exc


def write_dicom(ds: Dataset, path: Path) -> None:
    """Write a de-identified dataset (little endian, with its rebuilt meta)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
