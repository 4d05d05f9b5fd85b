"""Canary: unique PHI tokens planted everywhere must not reach any byte the store holds.

A generated study (names in Latin, kanji, kana and Greek; IDs; accession; dates;
institution; descriptions; private tags; nested sequences) and a second study of
the same patient are harvested with their SEGs; the PHI-laden files of
``tests/data/deid`` go through the store too (quarantined when they may carry
burned-in text, de-identified otherwise).  Then every file under the store,
every de-identified copy, every NIfTI (decompressed) and the DEBUG log are
searched for every token.
"""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.charset import encode_string

from segnode.errors import InputError
from segnode.storage.dataset import DatasetStore, QuarantinedError, harvest
from segnode.storage.deid import write_dicom
from segnode.storage.deid_table import Action
from tests.deid_study import make_canary_study, make_seg

SECRET = b"canary-secret-0123456789"
_TEXT_VRS = {"PN", "LO", "SH", "LT", "ST", "UT", "UC", "UI", "DA", "DT", "AE"}


def _file_tokens(path: Path, store: DatasetStore) -> set[bytes]:
    """Every identifying value of a PHI-laden file, in the byte forms it could take."""
    ds = pydicom.dcmread(path)
    deid = store.deidentifier()
    encodings = pydicom.charset.convert_encodings(ds.get("SpecificCharacterSet", "ISO_IR 6"))
    out: set[bytes] = set()
    kept: set[bytes] = set()  # values the standard keeps elsewhere (procedure codes...) are no leak
    for elem in ds.iterall():
        action = None if elem.tag.is_private else deid.action_for(int(elem.tag))
        removed = elem.tag.is_private or action in (Action.REMOVE, Action.EMPTY, Action.DUMMY, Action.UID)
        if int(elem.tag) in (0x00100010, 0x00100020, 0x00080050):
            removed = True
        if action is Action.CLEAN and elem.VR in ("DA", "DT"):
            removed = True  # shifted: the original date must be gone
        if elem.VR not in _TEXT_VRS | {"UN", "OB"} or elem.value in (None, ""):
            continue
        if isinstance(elem.value, bytes):
            values = [elem.value.rstrip(b"\x00 ")]
        else:
            items = elem.value if isinstance(elem.value, pydicom.multival.MultiValue) else [elem.value]
            values = []
            for value in map(str, items):
                parts = [value, *value.replace("=", "^").split("^")]
                values += [p.encode("utf-8") for p in parts] + [encode_string(p, encodings) for p in parts]
        (out if removed else kept).update(v for v in values if _distinctive(v))
    return out - kept


def _distinctive(value: bytes) -> bool:
    """Names and words (a letter, 6+ bytes), 8-digit dates, and UIDs; not bare numbers like 0.1000."""
    numeric = value.strip(b"0123456789.+- ") == b""
    if not numeric:
        return len(value) >= 6
    return (len(value) == 8 and value.isdigit()) or (len(value) >= 16 and b"." in value)


def _all_bytes(folders: list[Path]) -> list[tuple[Path, bytes]]:
    blobs = []
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            blobs.append((path, data))
            if data[:2] == b"\x1f\x8b":
                blobs.append((path, gzip.decompress(data)))
    return blobs


def test_no_canary_token_survives_anywhere(tmp_path: Path, data_dir: Path) -> None:
    inputs, tokens = _prepare(tmp_path, data_dir)
    log_file = tmp_path / "store-debug.log"
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        store = _fill_store(tmp_path, inputs, tokens)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
    blobs = _all_bytes([store.root, tmp_path / "deid_out"]) + [(log_file, log_file.read_bytes())]
    assert len(blobs) > 20 and log_file.stat().st_size > 0 and len(tokens) > 100
    found = sorted({(t, p.name) for t in tokens for p, data in blobs if t in data})
    assert not found, f"PHI tokens found in the store: {found[:40]}"


def _prepare(tmp_path: Path, data_dir: Path) -> tuple[list[tuple[list[Path], Path]], set[bytes]]:
    """Inputs (series files, SEG) and the tokens they carry; built before logging is captured."""
    probe = DatasetStore.open(tmp_path / "store", SECRET)
    inputs, tokens = [], {b"CNRYCALLAE", b"CNRYAE"}
    for tag, patient in (("a1", "a1"), ("b2", "a1")):  # two studies of one patient
        files, tok = make_canary_study(tmp_path / f"study_{tag}", tag, patient_tag=patient)
        seg = make_seg(files, tmp_path / f"seg_{tag}.dcm")
        inputs.append((files, seg))
        tokens |= {v.encode("utf-8") for v in tok.values()} | {_seg_uid(seg).encode()}
    for path in sorted((data_dir / "deid").rglob("*.dcm")):
        tokens |= _file_tokens(path, probe)
        copy = tmp_path / "in" / path.name
        copy.parent.mkdir(exist_ok=True)
        shutil.copy(path, copy)
        try:
            seg = make_seg([copy], tmp_path / f"seg_{path.stem}.dcm")
        except (ValueError, AttributeError, TypeError, KeyError):
            seg = tmp_path / "seg_a1.dcm"  # highdicom cannot build a SEG of this object
        inputs.append(([copy], seg))
    return inputs, tokens


def _fill_store(tmp_path: Path, inputs: list[tuple[list[Path], Path]], tokens: set[bytes]) -> DatasetStore:
    store = DatasetStore.open(tmp_path / "store", SECRET)
    for files, seg in inputs:
        try:
            harvest(store, dataset="Canary", series_files=files, seg_path=seg, profile="liver",
                    backend="hu_based", model_version="1", weights_hash="0" * 8, rule="canary",
                    calling_ae="CNRYCALLAE")
        except (QuarantinedError, InputError):
            pass  # quarantined or not a usable series: de-identified on its own below
        if len(files) == 1:
            ds = pydicom.dcmread(files[0])
            write_dicom(store.deidentifier().deidentify(ds).dataset, tmp_path / "deid_out" / files[0].name)
    assert len(store.quarantined()) >= 7  # the secondary captures
    assert len(store.cases("Canary")) >= 2
    return store


def _seg_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.mark.parametrize("name", ["chrH31.dcm", "chrX1.dcm", "chrRuss.dcm"])
def test_non_latin_names_are_replaced(name: str, data_dir: Path, tmp_path: Path) -> None:
    store = DatasetStore.open(tmp_path / "store", SECRET)
    ds = pydicom.dcmread(data_dir / "deid" / "charset" / name)
    out = store.deidentifier().deidentify(ds).dataset
    write_dicom(out, tmp_path / name)
    back = pydicom.dcmread(tmp_path / name)
    assert str(back.PatientName).startswith("P") and "=" not in str(back.PatientName)
