"""The C-STORE handler's header walker gives what pydicom reads, on every test file it can read."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from segnode.node.ingest.header import WANTED, HeaderError, read_header

from tests.paths import DATA

FILES = sorted(p for p in DATA.rglob("*.dcm") if p.stat().st_size < 8_000_000)


def dataset_bytes(path: Path) -> tuple[bytes, str]:
    """The dataset as a sender would put it on the wire (no preamble, no file meta), and its syntax."""
    with path.open("rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        return fp.read(), str(meta.TransferSyntaxUID)


def readable() -> list[Path]:
    out = []
    for path in FILES:
        try:
            dataset_bytes(path)
            dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, AttributeError, EOFError, OSError, ValueError, KeyError):
            continue  # files without a preamble/meta, or that pydicom itself refuses
        out.append(path)
    return out


READABLE = readable()


def test_there_is_something_to_compare() -> None:
    assert len(READABLE) > 20


@pytest.mark.parametrize("path", READABLE, ids=lambda p: str(p.relative_to(DATA)))
def test_walker_agrees_with_pydicom(path: Path) -> None:
    data, syntax = dataset_bytes(path)
    ours = read_header(data, syntax)
    if ours is None:  # big endian, deflate, or an undefined-length UN: pydicom's job
        return
    ds = dcmread(path, stop_before_pixels=True)
    theirs = {kw: str(ds.get(kw)) for kw in WANTED.values() if ds.get(kw) is not None}
    assert ours == theirs


def test_undefined_length_sequences_before_the_uids_are_skipped() -> None:
    def el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        head = group.to_bytes(2, "little") + elem.to_bytes(2, "little") + vr
        if vr in (b"SQ", b"OB"):
            return head + b"\0\0" + len(value).to_bytes(4, "little") + value
        return head + len(value).to_bytes(2, "little") + value

    undefined = (0xFFFFFFFF).to_bytes(4, "little")
    item_start, item_end = b"\xfe\xff\x00\xe0" + undefined, b"\xfe\xff\x0d\xe0" + bytes(4)
    seq_end = b"\xfe\xff\xdd\xe0" + bytes(4)
    inner = el(0x0008, 0x1150, b"UI", b"1.2.9\0") + el(0x0008, 0x0018, b"UI", b"9.9.9\0")  # not top level
    data = (el(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0") + el(0x0008, 0x0018, b"UI", b"1.2.3\0")
            + el(0x0008, 0x0060, b"CS", b"CT")
            + b"\x08\x00\x40\x11SQ\0\0" + undefined + item_start + inner + item_end + seq_end
            + el(0x0020, 0x000D, b"UI", b"1.2\0") + el(0x0020, 0x000E, b"UI", b"1.2.4 ")
            + el(0x7FE0, 0x0010, b"OB", b"\0" * 4))
    assert read_header(data, "1.2.840.10008.1.2.1") == {
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "SOPInstanceUID": "1.2.3", "Modality": "CT",
        "StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.4"}
    with pytest.raises(HeaderError):  # the sequence never ends
        read_header(data[:90], "1.2.840.10008.1.2.1")


def test_a_length_past_the_end_is_an_error_and_big_endian_is_left_to_pydicom() -> None:
    bad = b"\x08\x00\x18\x00UI" + (200).to_bytes(2, "little") + b"1.2.3"
    with pytest.raises(HeaderError):
        read_header(bad, "1.2.840.10008.1.2.1")
    assert read_header(bad, "1.2.840.10008.1.2.2") is None


@pytest.mark.parametrize("sop_uid, source_ae, checked", [("1.2.3", "CT_SCANNER", True), ("1.2.34", "SCANNER1", False),
                                                         ("1.2.3", "", True)])
def test_hand_encoded_file_meta_equals_pydicoms(sop_uid: str, source_ae: str, checked: bool) -> None:
    from io import BytesIO

    from pynetdicom.dsutils import create_file_meta, encode_file_meta
    from segnode.storage.part10 import CHECK_CREATOR_UID, dataset_check, file_prefix

    meta = create_file_meta(sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=sop_uid,
                            transfer_syntax="1.2.840.10008.1.2.1")
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    check = dataset_check(b"\x08\x00\x18\x00UI\x06\x001.2.3\x00") if checked else None
    if checked:
        meta.PrivateInformationCreatorUID = CHECK_CREATOR_UID
        meta.PrivateInformation = check
    ours = file_prefix("1.2.840.10008.5.1.4.1.1.2", sop_uid, "1.2.840.10008.1.2.1", source_ae, check)
    assert ours == b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    read = dcmread(BytesIO(ours + b"\x08\x00\x18\x00UI\x06\x001.2.3\x00"))
    assert read.file_meta.MediaStorageSOPInstanceUID == sop_uid and read.SOPInstanceUID == "1.2.3"
