"""De-identification driven by the vendored PS3.15 Table E.1-1: table-driven checks and pseudonyms."""

from __future__ import annotations

import copy
import io
import re
from pathlib import Path

import pydicom
import pytest
from pydicom import config
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value
from segnode.errors import ConfigError
from segnode.storage.deid import (
    Deidentifier,
    burned_in_reason,
    shift_date,
    shift_datetime,
    shift_time,
)
from segnode.storage.deid_table import (
    Action,
    Option,
    load_table,
    raw_rows,
    resolve_combined,
)
from segnode.storage.pseudonyms import Pseudonymizer, load_secret
from segnode.uids import is_valid_uid

from tests.paths import REPO

SECRET = b"0123456789abcdef-test-secret"
#: PatientID, PatientName, AccessionNumber carry pseudonyms (checked separately)
PSEUDONYM_TAGS = {0x00100020, 0x00100010, 0x00080050}


def _tag(row: dict) -> int | None:
    text = row["tag"]
    if "X" in text.upper()[1:5] or "X" in text.upper()[6:10] or "ODD" in text.upper():
        return None
    return int(text[1:5] + text[6:10], 16)


def _single_rows() -> list[dict]:
    out = []
    for row in raw_rows():
        tag = _tag(row)
        if tag is None or tag in PSEUDONYM_TAGS or tag >> 16 in (0x0000, 0x0002):  # command, file meta
            continue
        try:
            dictionary_VR(tag)
        except KeyError:
            continue
        out.append(row)
    return out


ROWS = _single_rows()
_SAMPLE = {
    "PN": "Token^Person", "LO": "TOKEN-LO", "SH": "TOKEN-SH", "CS": "TOKEN", "LT": "token text",
    "ST": "token text", "UT": "token text", "UC": "token", "AE": "TOKENAE", "DA": "20010203",
    "TM": "101010", "DT": "20010203101010", "AS": "045Y", "IS": "7", "DS": "7.5", "UR": "http://token",
    "US": 7, "UL": 7, "SS": 7, "SL": 7, "FL": 7.0, "FD": 7.0, "SV": 7, "UV": 7, "AT": 0x00100010,
    "OB": b"\x01\x02", "OW": b"\x01\x02", "OF": b"\x01\x02\x03\x04", "OD": b"\x01" * 8, "OL": b"\x01" * 4,
    "OV": b"\x01" * 8, "UN": b"\x01\x02",
}


def _vr(tag: int) -> str:
    return dictionary_VR(tag).split(" or ")[0]


def _dataset_with(tag: int, uid: str = "1.2.826.0.1.3680043.8.498.777") -> Dataset:
    ds = Dataset()
    vr = _vr(tag)
    if vr == "SQ":
        item = Dataset()
        item.CodeMeaning = "token in a sequence"
        value: object = [item]
    elif vr == "UI":
        value = uid
    else:
        value = _SAMPLE[vr]
    ds.add_new(tag, vr, value)
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.1"
    return ds


def _roundtrip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


@pytest.fixture(scope="module")
def deid() -> Deidentifier:
    return Deidentifier(Pseudonymizer(SECRET))


def test_table_has_every_row_of_the_standard() -> None:
    table = load_table()
    assert len(raw_rows()) == 621
    assert len(table.by_tag) + len(table.repeating) + 1 == 621
    assert table.row_for(0x00110010) is table.private  # odd group: private
    assert table.row_for(0x50020010).name == "Curve Data"
    assert table.row_for(0x60023000).name == "Overlay Data"


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r["tag"])
def test_basic_profile_action(row: dict, deid: Deidentifier) -> None:
    tag = _tag(row)
    original = _dataset_with(tag)
    before = original[tag].value
    out = _roundtrip(deid.deidentify(original).dataset)
    action = resolve_combined(load_table().by_tag[tag].basic, tag)
    assert deid.action_for(tag) is action
    vr = _vr(tag)
    if action is Action.REMOVE or vr == "UN":  # UN cannot be inspected: always removed
        assert tag not in out
    elif action is Action.REMOVE:
        assert tag not in out
    elif action is Action.EMPTY:
        assert tag in out and (out[tag].value in (None, "", b"") or len(out[tag].value) == 0)
    elif action is Action.DUMMY:
        value = out[tag].value
        assert value not in (None, "", b"")
        if vr not in ("SQ", "UI"):
            assert value != before or vr in ("US", "UL", "SS", "SL", "FL", "FD", "SV", "UV", "AT")
            validate_value(vr, value, config.RAISE)
    elif action is Action.UID:
        assert is_valid_uid(out[tag].value) and out[tag].value != before
        assert out[tag].value == deid.pseudonyms.uid(before)
    elif action is Action.UID_SEQUENCE:
        assert tag in out  # references kept, their UIDs remapped (see test_sequences_are_walked)
    else:  # pragma: no cover - the basic profile has no K/C of its own
        pytest.fail(f"unexpected basic action {action}")


def _option_rows(option: Option, code: str) -> list[dict]:
    return [r for r in ROWS if r.get(option.value) == code]


@pytest.mark.parametrize(
    "option", [Option.RETAIN_PATIENT_CHARACTERISTICS, Option.RETAIN_DEVICE_IDENTITY], ids=lambda o: o.value
)
def test_keep_only_under_its_option(option: Option) -> None:
    rows = _option_rows(option, "K")
    assert rows
    with_option = Deidentifier(Pseudonymizer(SECRET), [option])
    without = Deidentifier(Pseudonymizer(SECRET))
    for row in rows:
        tag = _tag(row)
        kept = with_option.deidentify(_dataset_with(tag)).dataset
        if _vr(tag) != "SQ" and _vr(tag) != "UI":
            assert kept[tag].value == _dataset_with(tag)[tag].value, row["name"]
        dropped = without.deidentify(_dataset_with(tag)).dataset
        original = _dataset_with(tag)[tag].value
        assert tag not in dropped or dropped[tag].value != original, row["name"]


def test_modified_dates_shift_every_date_by_one_keyed_amount() -> None:
    deid = Deidentifier(Pseudonymizer(SECRET), [Option.RETAIN_LONGITUDINAL_MODIFIED_DATES])
    shifted = set()
    for row in _option_rows(Option.RETAIN_LONGITUDINAL_MODIFIED_DATES, "C"):
        tag = _tag(row)
        if _vr(tag) != "DA":
            continue
        ds = _dataset_with(tag)
        ds.PatientID = "PAT-1"
        result = deid.deidentify(ds)
        shifted.add(result.dataset[tag].value)
        assert result.dataset[tag].value == shift_date("20010203", result.date_shift_days)
    assert len(shifted) == 1 and "20010203" not in shifted
    assert Deidentifier(Pseudonymizer(SECRET)).action_for(0x00080020) is Action.EMPTY  # no option: Z


def test_clean_descriptors_scrub_identifying_values() -> None:
    deid = Deidentifier(Pseudonymizer(SECRET), [Option.CLEAN_DESCRIPTORS])
    ds = _dataset_with(0x00081030)
    ds.PatientName = "Doe^Johnathan"
    ds.PatientID = "ID123456789"
    ds.StudyDescription = "CT chest Johnathan ID123456789 follow-up"
    ds.SeriesDescription = "Doe 20190101 lung"
    out = deid.deidentify(ds).dataset
    assert out.StudyDescription == "CT chest follow-up"
    assert out.SeriesDescription == "lung"


def test_private_curves_overlays_and_unknown_un_are_removed(deid: Deidentifier) -> None:
    ds = _dataset_with(0x00080018)
    block = ds.private_block(0x0029, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", "secret")
    ds.add_new(0x50000010, "US", 1)
    ds.add_new(0x60003000, "OW", b"\x00" * 8)
    ds.add_new(0x60000010, "US", 8)
    out = deid.deidentify(ds).dataset
    assert not any(e.tag.is_private for e in out)
    assert not any(e.tag.group in (0x5000, 0x6000) for e in out)


def test_sequences_are_walked_and_references_remapped(deid: Deidentifier) -> None:
    ds = _dataset_with(0x00080018)
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    series = Dataset()
    series.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.98"
    series.ReferencedInstanceSequence = [copy.deepcopy(ref)]
    series.ReferringPhysicianName = "Nested^Doctor"
    ds.ReferencedSeriesSequence = [series]  # not in the table: walked
    ds.SourceImageSequence = [ref]  # X/Z/U*: kept, remapped
    out = deid.deidentify(ds).dataset
    item = out.ReferencedSeriesSequence[0]
    assert item.SeriesInstanceUID == deid.pseudonyms.uid("1.2.826.0.1.3680043.8.498.98")
    inner = item.ReferencedInstanceSequence[0]
    assert inner.ReferencedSOPInstanceUID == deid.pseudonyms.uid("1.2.826.0.1.3680043.8.498.99")
    assert inner.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # class UIDs never remapped
    assert "ReferringPhysicianName" not in item or not item.ReferringPhysicianName
    assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == inner.ReferencedSOPInstanceUID


def test_identity_attributes_and_method_are_set(deid: Deidentifier) -> None:
    ds = _dataset_with(0x00080018)
    ds.PatientID, ds.IssuerOfPatientID, ds.AccessionNumber = "12345", "HOSP", "ACC9"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    ds.file_meta.SourceApplicationEntityTitle = "SCANNER"
    out = deid.deidentify(ds).dataset
    assert out.PatientIdentityRemoved == "YES"
    assert out.PatientID == out.PatientName == deid.pseudonyms.patient_id("HOSP|12345")
    assert out.AccessionNumber == deid.pseudonyms.accession("ACC9")
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert out.file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless  # never remapped
    assert "SourceApplicationEntityTitle" not in out.file_meta
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    options = Deidentifier(Pseudonymizer(SECRET), list(Option)).deidentify(_dataset_with(0x00080018)).dataset
    codes = {item.CodeValue for item in options.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113107", "113108", "113109", "113105"}


def test_same_secret_same_pseudonyms_other_secret_others() -> None:
    a, b, c = Pseudonymizer(SECRET), Pseudonymizer(SECRET), Pseudonymizer(b"another-secret-of-16+")
    uid = "1.2.826.0.1.3680043.8.498.5"
    assert a.uid(uid) == b.uid(uid) and a.uid(uid) != c.uid(uid)
    assert a.patient_id("x|1") == b.patient_id("x|1") != c.patient_id("x|1")
    assert a.date_shift_days("x|1") == b.date_shift_days("x|1")
    assert all(is_valid_uid(a.uid(str(i))) for i in range(200))
    assert all(1 <= a.date_shift_days(str(i)) <= 3652 for i in range(200))


def test_secret_is_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEGNODE_DEID_SECRET_FILE", raising=False)
    with pytest.raises(ConfigError, match="no de-identification secret"):
        load_secret(None)
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        load_secret(short)
    good = tmp_path / "good"
    good.write_bytes(SECRET)
    monkeypatch.setenv("SEGNODE_DEID_SECRET_FILE", str(good))
    assert load_secret(None) == SECRET


@pytest.mark.parametrize(
    ("attrs", "quarantined"),
    [
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, True),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.67"}, True),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "BurnedInAnnotation": "YES"}, True),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"]}, True),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "SeriesDescription": "Dose Report"}, True),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "BurnedInAnnotation": "NO"}, False),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}, False),
    ],
)
def test_burned_in_text_is_detected(attrs: dict, quarantined: bool) -> None:
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    assert (burned_in_reason(ds) is not None) is quarantined


def test_keywords_of_rows_exist_in_pydicom() -> None:
    # guards the table loader: every single-tag row resolves to a real attribute
    assert all(keyword_for_tag(_tag(r)) for r in ROWS)


# --- C: what "clean" does per option ------------------------------------------------------------
CHARACTERISTICS_TEXT = {"Allergies": "penicillin Doe", "PatientState": "fasting Doe",
                        "SpecialNeeds": "wheelchair Doe", "PreMedication": "aspirin Doe"}


def _patient_text() -> Dataset:
    ds = _dataset_with(0x00080018)
    ds.PatientName = "Doe^Johnathan"
    for keyword, value in CHARACTERISTICS_TEXT.items():
        setattr(ds, keyword, value)
    return ds


def test_free_text_under_patient_characteristics_alone_is_removed() -> None:
    out = Deidentifier(Pseudonymizer(SECRET), [Option.RETAIN_PATIENT_CHARACTERISTICS]).deidentify(_patient_text())
    assert not [k for k in CHARACTERISTICS_TEXT if k in out.dataset]


def test_free_text_is_scrubbed_only_where_clean_descriptors_says_c() -> None:
    options = [Option.RETAIN_PATIENT_CHARACTERISTICS, Option.CLEAN_DESCRIPTORS]
    out = Deidentifier(Pseudonymizer(SECRET), options).deidentify(_patient_text()).dataset
    assert out.Allergies == "penicillin" and out.PatientState == "fasting"  # C under both options
    assert "SpecialNeeds" not in out and "PreMedication" not in out  # C only under the characteristics


def test_dates_option_shifts_times_drops_offsets_and_removes_ob_timestamps() -> None:
    deid = Deidentifier(Pseudonymizer(SECRET), [Option.RETAIN_LONGITUDINAL_MODIFIED_DATES])
    ds = _dataset_with(0x00080018)
    ds.PatientID = "PAT-1"
    ds.StudyDate, ds.StudyTime, ds.SeriesTime = "20010203", "101010.250", "1010"
    ds.AcquisitionDateTime = "20010203101010+0100"
    ds.TimezoneOffsetFromUTC = "+0100"
    ds.add_new(0x00340007, "OB", b"\x01\x02\x03\x04\x05\x06\x07\x08")  # FrameOriginTimestamp
    ds.add_new(0x04000310, "OB", b"20010203101010")  # CertifiedTimestamp
    out = deid.deidentify(ds).dataset
    seconds = deid.pseudonyms.time_shift_seconds("|PAT-1")
    days = deid.pseudonyms.date_shift_days("|PAT-1")
    assert out.StudyTime == shift_time("101010.250", seconds) != "101010.250"
    assert out.SeriesTime == shift_time("1010", seconds) and len(out.SeriesTime) == 4
    assert out.AcquisitionDateTime == shift_date("20010203", days) + out.StudyTime[:6]
    assert "TimezoneOffsetFromUTC" not in out and "FrameOriginTimestamp" not in out
    assert "CertifiedTimestamp" not in out


def test_shift_time_keeps_precision_ranges_and_wraps() -> None:
    assert shift_time("235959", 2) == "000001"
    assert shift_time("10", 3600) == "11" and shift_time("1030", 60) == "1031"
    assert shift_time("101010.5-111111", 1) == "101011.5-111112"
    assert shift_time("25", 1) == "" and shift_time("10:10", 1) == ""
    assert shift_datetime("2001", 1) == "" and shift_datetime("20010203", 1, 5) == "20010202"


def test_dates_and_times_the_table_does_not_list_are_cleaned_too() -> None:
    unlisted = {0x00140102: ("DA", "20010203"), 0x00140103: ("TM", "101010"), 0x0008041F: ("DT", "20010203101010")}
    assert all(load_table().row_for(tag) is None for tag in unlisted)
    for options, shifted in (([Option.RETAIN_LONGITUDINAL_MODIFIED_DATES], True), ([], False)):
        ds = _dataset_with(0x00080018)
        for tag, (vr, value) in unlisted.items():
            ds.add_new(tag, vr, value)
        out = Deidentifier(Pseudonymizer(SECRET), options).deidentify(ds).dataset
        for tag, (_, value) in unlisted.items():
            assert (tag in out and out[tag].value != value) if shifted else tag not in out


def test_unknown_standard_group_elements_and_group_lengths_are_removed(deid: Deidentifier) -> None:
    ds = _dataset_with(0x00080018)
    ds.add_new(0x00A00010, "LO", "Token^Unknown")
    ds.add_new(0x00A00012, "OB", b"token")
    ds.add_new(0x00A00016, "SQ", [Dataset()])
    ds.add_new(0x00080000, "UL", 100)
    ds.add_new(0x00101005, "UN", b"Token^Birthname")  # known tag stored as UN: read as PN, then table X
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    read = _roundtrip(ds)
    assert read[0x00A00010].value == "Token^Unknown" and read.PatientBirthName == "Token^Birthname"
    out = _roundtrip(deid.deidentify(read).dataset)
    assert not [e for e in out if e.tag.group == 0x00A0 or e.tag.element == 0]
    assert "PatientBirthName" not in out


def option_effects(option: Option) -> dict[str, set[str]]:
    """Per outcome (kept, shifted, scrubbed, ...), the keywords of the rows ``option`` names."""
    deid = Deidentifier(Pseudonymizer(SECRET), [option])
    out: dict[str, set[str]] = {}
    for row in raw_rows():
        tag = _tag(row)
        if row.get(option.value) is None or tag is None or tag >> 16 in (0x0000, 0x0002):
            continue
        try:
            vr = _vr(tag)
        except KeyError:
            continue
        kind = "kept" if deid.action_for(tag) is Action.KEEP else deid.cleaning(tag, vr).value
        out.setdefault(kind, set()).add(keyword_for_tag(tag))
    return out


def test_the_curators_table_lists_what_each_option_does() -> None:
    docs = (REPO / "docs" / "curators.md").read_text(encoding="utf-8")
    listed = {(m[1], m[2]): (int(m[3]), set(m[4].split(", ")))
              for m in re.finditer(r"^- `(\w+) (\w+)` \((\d+)\): (.*)$", docs, re.MULTILINE)}
    expected = {(o.value, kind): (len(names), names) for o in Option for kind, names in option_effects(o).items()}
    assert listed == expected
