"""Canary: unique PHI tokens planted everywhere must not reach any byte the store holds.

A generated study (names in Latin, kanji, kana and Greek; IDs; accession; dates;
institution; descriptions; private tags of VR LO/OB/UN/SQ; standard-group
elements unknown to the dictionary and a known one stored as UN; C-coded free
text such as PatientState holding the family name; TimezoneOffsetFromUTC; OB
timestamps; nested sequences), a second study of the same patient whose frames
are JPEG-LS with tokens in COM/APP1 segments and after the end of image, and a
third in JPEG 2000 with tokens in main and tile-part comments are harvested with
their SEGs; one is imported again with ``dataset add`` into another dataset, and
an MSD folder and NIfTI pairs with tokens in their file names and headers are
added too; a
case is corrected with the store's own (already de-identified) SEG, and a SEG
de-identified under another key is refused; the version is frozen and exported.
The PHI-laden files of ``tests/data/deid`` go through the store too (quarantined
when they may carry burned-in text, de-identified otherwise).  Then every file
under the store, the export, every de-identified copy, every NIfTI
(decompressed) and the DEBUG log are searched for every token.

Under each profile option on its own and all together, the same study is
harvested again: only the tokens of attributes that the options keep (``K``) or
scrub (``C`` under Clean Descriptors) may survive, and the identifying values
planted inside scrubbed text may not.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.charset import encode_string
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless
from segnode.errors import InputError
from segnode.storage.dataset import DatasetStore, QuarantinedError, harvest
from segnode.storage.deid import Deidentifier, write_dicom
from segnode.storage.deid_table import Action, Option
from segnode.storage.export_nnunet import export_nnunet
from segnode.storage.importers import import_path
from segnode.storage.pseudonyms import Pseudonymizer

from tests.deid_study import TOKEN_TAGS, make_canary_study, make_seg

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
        tokens |= _import_nifti_layouts(store, tmp_path)
        _import_correct_and_export(store, tmp_path)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
    blobs = _all_bytes([store.root, tmp_path / "deid_out", tmp_path / "export"])
    blobs.append((log_file, log_file.read_bytes()))
    assert len(blobs) > 20 and log_file.stat().st_size > 0 and len(tokens) > 100
    found = sorted({(t, p.name) for t in tokens for p, data in blobs if t in data})
    assert not found, f"PHI tokens found in the store: {found[:40]}"


def _prepare(tmp_path: Path, data_dir: Path) -> tuple[list[tuple[list[Path], Path]], set[bytes]]:
    """Inputs (series files, SEG) and the tokens they carry; built before logging is captured."""
    probe = DatasetStore.open(tmp_path / "store", SECRET)
    inputs, tokens = [], {b"CNRYCALLAE", b"CNRYAE"}
    studies = (("a1", "a1", None, 24), ("b2", "a1", JPEGLSLossless, 24), ("c3", "c3", JPEG2000Lossless, 32))
    for tag, patient, syntax, size in studies:  # a1 and b2: two studies of one patient
        files, tok = make_canary_study(tmp_path / f"study_{tag}", tag, patient_tag=patient, syntax=syntax, size=size)
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
    assert len(store.cases("Canary")) >= 3
    return store


def _import_correct_and_export(store: DatasetStore, tmp_path: Path) -> None:
    """``dataset add`` of a study already harvested, corrections with de-identified SEGs, freeze, export."""
    folder = tmp_path / "curated"
    shutil.copytree(tmp_path / "study_a1", folder / "ct")
    shutil.copy(tmp_path / "seg_a1.dcm", folder / "seg.dcm")
    imported = import_path(store, folder, dataset="CanaryImport", profile="liver").added
    harvested = [r for r in store.cases("Canary").values() if r.instances]
    assert len(imported) == 1 and imported[0].case_id not in store.cases("Canary")  # no shared case ID
    case = harvested[0]
    own = tmp_path / "own_seg.dcm"  # the store's own SEG: already de-identified, references match
    own.write_bytes(store.read_object(case.seg))
    assert store.correct(case.case_id, own, dataset="Canary").label_status.value == "corrected"
    foreign = tmp_path / "foreign_seg.dcm"  # de-identified under another key: refused, nothing changes
    original = next(p for p in sorted(tmp_path.glob("seg_*.dcm")) if _seg_references(p, case, store))
    other = Deidentifier(Pseudonymizer(b"another-key-0123456789"), store.options)
    write_dicom(other.deidentify(pydicom.dcmread(original)).dataset, foreign)
    before = store.cases("Canary")[case.case_id]
    with pytest.raises(InputError, match="not all of them"):
        store.correct(case.case_id, foreign, dataset="Canary")
    assert store.cases("Canary")[case.case_id] == before
    store.freeze("Canary")
    export_nnunet(store, "Canary@1", tmp_path / "export", test_fraction=0.3)


def _import_nifti_layouts(store: DatasetStore, tmp_path: Path) -> set[bytes]:
    """``dataset add`` of an MSD folder and of plain NIfTI pairs whose names and headers hold tokens."""
    tokens: set[bytes] = set()
    for layout, images, labels in (("msd", "imagesTr", "labelsTr"), ("nifti", "images", "labels")):
        folder = tmp_path / layout
        for sub in (images, labels):
            (folder / sub).mkdir(parents=True)
        name = f"cnryniftiname_{layout}"
        image = nib.Nifti1Image(np.arange(6 * 8 * 4, dtype=np.int16).reshape(6, 8, 4), np.diag([0.8, 0.8, 2.0, 1]))
        image.header["descrip"] = f"CnryNiftiDescrip{layout}".encode()
        image.header["aux_file"] = f"CnryAux{layout}".encode()
        label = nib.Nifti1Image((np.asarray(image.dataobj) % 2).astype(np.uint8), image.affine)
        label.header["intent_name"] = f"CnryInt{layout}".encode()
        nib.save(image, folder / images / f"{name}.nii.gz")
        nib.save(label, folder / labels / f"{name}.nii.gz")
        (folder / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
        report = import_path(store, folder, dataset=f"Canary_{layout}", mapping={1: "liver"}, profile="liver")
        assert len(report.added) == 1
        tokens |= {name.encode(), f"CnryNiftiDescrip{layout}".encode(), f"CnryAux{layout}".encode(),
                   f"CnryInt{layout}".encode()}
    return tokens


def _seg_references(path: Path, case, store: DatasetStore) -> bool:
    """Whether the original SEG at ``path`` is the one harvested as ``case``."""
    seg = pydicom.dcmread(path, stop_before_pixels=True)
    series = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    return store.pseudonyms.uid(series) == case.series_uid


def _seg_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


OPTION_SETS = [[], *([o] for o in Option), list(Option)]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "+".join(x.value for x in o) or "basic")
def test_only_what_the_options_keep_survives(options: list[Option], tmp_path: Path) -> None:
    files, tok = make_canary_study(tmp_path / "study", "o1", n_slices=3, syntax=JPEGLSLossless)
    seg = make_seg(files, tmp_path / "seg.dcm")
    store = DatasetStore.open(tmp_path / "store", SECRET, options=options)
    record = harvest(store, dataset="Options", series_files=files, seg_path=seg, profile="liver",
                     backend="hu_based", model_version="1", weights_hash="0", rule="r", calling_ae="CNRYCALLAE")
    deid = store.deidentifier()
    allowed = {key for key, tag in TOKEN_TAGS.items()
               if deid.action_for(tag) is Action.KEEP or (deid.action_for(tag) is Action.CLEAN and deid.scrubbed(tag))}
    blobs = _all_bytes([store.root])
    leaked = sorted(key for key, value in tok.items() if key not in allowed
                    and any(value.encode("utf-8") in data for _, data in blobs))
    assert not leaked, leaked
    stored = pydicom.dcmread(store.object_path(record.dicom[0]))
    state = stored.get("PatientState")
    if Option.CLEAN_DESCRIPTORS in options:  # scrubbed: the characteristic stays, the family name goes
        assert state.startswith("fasting ") and tok["patient_family"].lower() not in state.lower()
    else:  # C under Retain Patient Characteristics alone: free text cannot be shown clean, removed
        assert state is None and "Allergies" not in stored and "SpecialNeeds" not in stored
    if Option.RETAIN_PATIENT_CHARACTERISTICS in options:
        assert stored.PatientSex == "F" and stored.PatientAge == "061Y"
    assert "TimezoneOffsetFromUTC" not in stored and "CertifiedTimestamp" not in stored
    dates = Option.RETAIN_LONGITUDINAL_MODIFIED_DATES in options  # C on an OB timestamp: removed; else D
    assert stored.get("FrameOriginTimestamp") == (None if dates else b"\x00\x00")
    assert not any(e.tag.group == 0x00A0 or e.tag.is_private for e in stored)
    assert np.array_equal(stored.pixel_array, pydicom.dcmread(files[0]).pixel_array)


@pytest.mark.parametrize("name", ["chrH31.dcm", "chrX1.dcm", "chrRuss.dcm"])
def test_non_latin_names_are_replaced(name: str, data_dir: Path, tmp_path: Path) -> None:
    store = DatasetStore.open(tmp_path / "store", SECRET)
    ds = pydicom.dcmread(data_dir / "deid" / "charset" / name)
    out = store.deidentifier().deidentify(ds).dataset
    write_dicom(out, tmp_path / name)
    back = pydicom.dcmread(tmp_path / name)
    assert str(back.PatientName).startswith("P") and "=" not in str(back.PatientName)
