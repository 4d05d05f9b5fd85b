"""De-identification driven by the vendored PS3.15 Table E.1-1: table-driven checks and pseudonyms."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pydicom
import pytest
from pydicom import config
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

from segnode.errors import ConfigError
from segnode.storage.deid import Deidentifier, burned_in_reason, shift_date
from segnode.storage.deid_table import Action, Option, load_table, raw_rows, resolve_combined
from segnode.storage.pseudonyms import Pseudonymizer, load_secret
from segnode.uids import is_valid_uid

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
