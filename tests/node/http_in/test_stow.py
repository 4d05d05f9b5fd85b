"""STOW-RS parts' file meta (node/http_in/stow.py read_file_meta): read as pydicom reads it; a cut one is refused."""

from __future__ import annotations

from pydicom.filereader import read_file_meta_info
from segnode.node.http_in.stow import read_file_meta

from tests.paths import DATA

CT = DATA / "thorax_cta" / "CT0001.dcm"


def test_file_meta_matches_pydicom_and_the_dataset_follows_it() -> None:
    data = CT.read_bytes()
    meta, theirs = read_file_meta(data), read_file_meta_info(CT)
    assert meta is not None
    assert (meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax) == (
        theirs.MediaStorageSOPClassUID, theirs.MediaStorageSOPInstanceUID, theirs.TransferSyntaxUID)
    assert data[meta.dataset_offset:meta.dataset_offset + 2] == b"\x08\x00"  # group 0008 comes next


def test_a_part_cut_anywhere_in_its_file_meta_is_refused_never_an_exception() -> None:
    """Cut before the transfer syntax is whole: not DICOM; after it: a meta that never reads past the cut
    (what follows is a broken dataset, which the store path refuses as it does a C-STORE's)."""
    data = CT.read_bytes()
    end = read_file_meta(data).dataset_offset  # type: ignore[union-attr]
    for cut in range(end):
        meta = read_file_meta(data[:cut])
        assert meta is None or meta.dataset_offset <= cut, cut
    assert read_file_meta(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff") is None  # length past the end
