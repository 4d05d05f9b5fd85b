"""The structural walk (node/ingest/walk.py): every real file passes, every cut one fails, it never raises.

Real files of every transfer syntax in tests/data (explicit and implicit VR
little endian, explicit big endian, deflated, JPEG baseline/extended/lossless,
JPEG-LS, JPEG 2000, RLE); the files that fail are the ones pydicom cannot
decode either.  Cut points: every byte of a file's header region and a
sample of its Pixel Data, for each encoding.
"""

from __future__ import annotations

import random
import struct
import tracemalloc
import warnings
import zlib
from collections.abc import Iterable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedSRStorage,
    SegmentationStorage,
)
from segnode.node.http_in.stow import read_file_meta
from segnode.node.ingest.walk import (
    MAX_DEPTH,
    MAX_ELEMENTS,
    needs_pixel_data,
    walk_dataset,
)

from tests.paths import DATA

EDGE = DATA / "edge_cases" / "pydicom"
EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
DEFLATED, RLE = "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5"
LIMIT = 1 << 30
CT = CTImageStorage

#: files in tests/data that do not decode, with the walk's reason: pydicom cannot give their pixels either.
BROKEN = {
    "MR_truncated.dcm": "Pixel Data runs past the end of the dataset",
    "rtplan_truncated.dcm": "(300A,00B0) runs past the end of the dataset",
    "badVR.dcm": "NumberOfFrames is not a number",  # "1A"
    "nested_priv_SQ.dcm": "Pixel Data without Rows, Columns or BitsAllocated",
    "bad.dcm": "no Pixel Data in an image instance",  # dicognito: a file meta and no dataset
    # parser samples of an image class whose pixels were left out
    "UN_sequence.dcm": "no Pixel Data in an image instance",
    "priv_SQ.dcm": "no Pixel Data in an image instance",
    "no_meta_group_length.dcm": "no Pixel Data in an image instance",
    "chrJapMulti.dcm": "no Pixel Data in an image instance",
}


def part10_files() -> list[Path]:
    """Every Part 10 file in tests/data (with a file meta and a transfer syntax)."""
    out = []
    for path in sorted(p for p in DATA.rglob("*") if p.is_file() and p.suffix not in {".json", ".md", ".nrrd"}):
        with path.open("rb") as file:
            head = file.read(132)
        if head[128:132] == b"DICM" and read_file_meta(path.read_bytes()) is not None:
            out.append(path)
    return out


def dataset_of(path: Path) -> tuple[bytes, str, str]:
    """The dataset after the file meta, its transfer syntax and SOP class."""
    data = path.read_bytes()
    meta = read_file_meta(data)
    assert meta is not None, path
    return data[meta.dataset_offset:], meta.transfer_syntax, meta.sop_class_uid


def walk(data: bytes, syntax: str = EXPLICIT_LE, sop_class: str = CT, limit: int = LIMIT) -> str | None:
    return walk_dataset(memoryview(data), syntax, sop_class, inflate_limit=limit)


FILES = part10_files()


def test_the_real_files_cover_every_transfer_syntax_the_node_reads() -> None:
    syntaxes = {dataset_of(p)[1] for p in FILES}
    assert {EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE, DEFLATED, RLE, "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"} <= syntaxes
    assert len(FILES) > 200 and set(BROKEN) <= {p.name for p in FILES}


@pytest.mark.parametrize("path", [p for p in FILES if p.name not in BROKEN], ids=lambda p: p.name)
def test_a_real_file_passes(path: Path) -> None:
    assert walk(*dataset_of(path)) is None


@pytest.mark.parametrize("path", [p for p in FILES if p.name in BROKEN], ids=lambda p: p.name)
def test_a_file_that_does_not_decode_fails_with_its_reason(path: Path) -> None:
    assert walk(*dataset_of(path)) == BROKEN[path.name]
    with warnings.catch_warnings(), pytest.raises(Exception):  # noqa: B017 (whatever pydicom raises: it cannot)
        warnings.simplefilter("ignore")  # badVR.dcm's IS "1A"
        dcmread(path).pixel_array  # noqa: B018


def _pixel_value_start(data: bytes, syntax: str) -> int:
    tag = b"\x7f\xe0\x00\x10" if syntax == EXPLICIT_BE else b"\xe0\x7f\x10\x00"
    start = data.rfind(tag)
    assert start > 0
    return start + (8 if syntax == IMPLICIT_LE else 12)


@pytest.mark.parametrize("name", ["thorax_cta/CT0001.dcm", "liver_3slice/01.dcm",
                                  "edge_cases/pydicom/MR_small_bigendian.dcm",
                                  "edge_cases/pydicom_data/emri_small_big_endian.dcm",
                                  "edge_cases/pydicom/MR_small_jp2klossless.dcm",
                                  "edge_cases/pydicom/JPEG2000-embedded-sequence-delimiter.dcm",
                                  "seg_objects/23x38x3/seg/label.seg"])
def test_every_cut_in_the_header_and_a_sample_in_the_pixels_fails(name: str) -> None:
    data, syntax, sop_class = dataset_of(DATA / name)
    pixels = _pixel_value_start(data, syntax)
    cuts = [*range(pixels + 1), *range(pixels, len(data), max(1, (len(data) - pixels) // 97))]
    passed = [cut for cut in cuts if walk(data[:cut], syntax, sop_class) is None]
    assert passed == [], f"{len(passed)} cut(s) pass, the first at {passed[:3]} of {len(data)}"
    assert walk(data, syntax, sop_class) is None


def test_cut_reasons_say_where() -> None:
    data, _, _ = dataset_of(DATA / "thorax_cta" / "CT0001.dcm")
    pixels = _pixel_value_start(data, EXPLICIT_LE)
    assert walk(data[:-1000]) == "Pixel Data runs past the end of the dataset"
    assert walk(data[:pixels - 7]) == "dataset ends inside an element header"
    assert walk(data[:pixels - 12]) == "no Pixel Data in an image instance"  # cut between two elements
    assert walk(data[:pixels - 12], sop_class=EnhancedSRStorage) is None  # a class without pixels: whole


def _deflate(data: bytes) -> bytes:
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = z.compress(data) + z.flush()
    return out + b"\0" * (len(out) % 2)  # PS3.5 A.5: padded to even


def test_a_deflated_dataset_cut_before_or_after_deflating_fails() -> None:
    stream, syntax, sop_class = dataset_of(EDGE / "image_dfl.dcm")
    assert syntax == DEFLATED
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = inflater.decompress(stream)
    end = len(stream) - len(inflater.unused_data)  # the deflate stream's own end
    assert all(walk(stream[:cut], DEFLATED, sop_class) is not None for cut in range(end))
    assert walk(_deflate(inflated), DEFLATED, sop_class) is None
    for cut in (0, 100, 800, len(inflated) // 2, len(inflated) - 1):
        assert walk(_deflate(inflated[:cut]), DEFLATED, sop_class) is not None, cut
    assert walk(b"\xff" * 64, DEFLATED, sop_class) == "deflate stream does not decode"


def _across_a_chunk(shift: int) -> bytes:
    """A CT dataset whose element headers (in sequence items too) lie across the first 1 MiB inflated."""
    ds = _ct(rows=64, columns=64)
    ds.add_new(0x00091010, "OB", bytes((1 << 20) - 3000 + shift))
    items = []
    for k in range(120):
        item = Dataset()
        item.ReferencedSOPInstanceUID, item.ReferencedFrameNumber = f"1.2.{k}", k % 100 + 1
        item.add_new(0x00091011, "LO", "x" * (k % 13 + 1))
        item.is_undefined_length_sequence_item = k % 2 == 0
        items.append(item)
    ds.add_new(0x00091020, "SQ", Sequence(items))  # after the padding
    ds[0x00091020].is_undefined_length = True
    return _encode(ds)


def test_a_deflated_dataset_is_walked_across_its_inflated_chunks() -> None:
    for shift in range(0, 24, 2):  # every header byte of the small elements falls on the 1 MiB boundary once
        data = _across_a_chunk(shift)
        stream = _deflate(data)
        assert walk(data) is None and walk(stream, DEFLATED) is None, shift
        for cut in ((1 << 20) - 7, (1 << 20) + 3, len(data) - 9):
            assert walk(_deflate(data[:cut]), DEFLATED) is not None, (shift, cut)
        assert walk(stream, DEFLATED, limit=len(data) - 1) == "inflated dataset larger than the node accepts"
        assert walk(stream[:len(stream) // 2], DEFLATED) is not None


def test_a_deflate_bomb_is_walked_without_holding_it() -> None:
    ds = _ct(rows=4096, columns=4096)  # 32 MiB of zeros, deflated to ~32 KiB
    stream = _deflate(_encode(ds))
    assert len(stream) < 256 << 10
    tracemalloc.start()
    try:
        assert walk(stream, DEFLATED) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_a_declared_length_is_never_allocated() -> None:
    huge = struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, 0xFFFFFFF0)  # 4 GiB declared, 12 bytes sent
    tracemalloc.start()
    try:
        assert walk(huge) == "(0009,1010) runs past the end of the dataset"
        assert walk(struct.pack("<HH2sH", 0x0028, 0x0008, b"IS", 0xFFF0)) == \
            "(0028,0008) runs past the end of the dataset"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10, peak


# -- hand-made datasets ---------------------------------------------------------------------------------


def _ct(rows: int = 4, columns: int = 4, bits: int = 16, frames: int | None = None, samples: int = 1) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT, "1.2.3.4"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.1", "CT"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = rows, columns, bits, samples
    if frames is not None:
        ds.NumberOfFrames = frames
    size = (rows * columns * samples * (frames or 1) * bits + 7) // 8
    ds.PixelData = bytes(size + size % 2)
    return ds


def _encode(ds: Dataset, *, implicit: bool = False, big: bool = False) -> bytes:
    out = BytesIO()
    ds.save_as(out, implicit_vr=implicit, little_endian=not big)
    return out.getvalue()


def test_native_pixel_data_must_hold_what_its_attributes_say() -> None:
    assert walk(_encode(_ct())) is None
    assert walk(_encode(_ct(rows=5, columns=3, bits=1, frames=3))) is None  # 45 bits: 6 bytes, even
    assert walk(_encode(_ct(rows=3, columns=3, bits=8, samples=3))) is None  # 27 bytes, padded to 28
    short = _ct()
    short.Rows = 5
    assert walk(_encode(short)) == "Pixel Data has 32 bytes, its attributes say 40"
    frames = _ct(frames=2)
    frames.NumberOfFrames = 3
    assert walk(_encode(frames)) == "Pixel Data has 64 bytes, its attributes say 96"
    padded = _ct()
    padded.PixelData += bytes(8)  # trailing padding: readers drop it
    assert walk(_encode(padded)) is None
    bare = _ct()
    del bare.Rows
    assert walk(_encode(bare)) == "Pixel Data without Rows, Columns or BitsAllocated"
    empty = _ct()
    empty.Rows = None
    assert walk(_encode(empty)) == "(0028,0010) is not one US value"
    plain = _encode(_ct())
    rows = plain.index(b"\x28\x00\x10\x00US")
    long_frames = plain[:rows] + _el(0x0028, 0x0008, b"IS", b"1" + b" " * 31) + plain[rows:]
    assert walk(long_frames) == "(0028,0008) is too long"
    del empty.PixelData  # an empty Rows without Pixel Data: nothing to judge
    assert walk(_encode(empty), sop_class=EnhancedSRStorage) is None
    for implicit, big in ((True, False), (False, True)):
        assert walk(_encode(short, implicit=implicit, big=big),
                    IMPLICIT_LE if implicit else EXPLICIT_BE) == "Pixel Data has 32 bytes, its attributes say 40"


def _el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHL", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _item(content: bytes, *, undefined: bool = True) -> bytes:
    if undefined:
        return struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + content + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(content)) + content


def _sq(items: Iterable[bytes], *, undefined: bool = True, vr: bytes = b"SQ") -> bytes:
    body = b"".join(items)
    if undefined:
        return (struct.pack("<HH2sHL", 0x0008, 0x1140, vr, 0, 0xFFFFFFFF) + body
                + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    return struct.pack("<HH2sHL", 0x0008, 0x1140, vr, 0, len(body)) + body


def _nested(depth: int) -> bytes:
    inner = _el(0x0008, 0x1155, b"UI", b"1.2.3\0")
    for _ in range(depth):
        inner = _sq([_item(inner)])
    return inner


def test_sequences_and_items_must_be_closed() -> None:
    leaf = _el(0x0008, 0x1155, b"UI", b"1.2.3\0")
    for undefined_sq in (True, False):
        for undefined_item in (True, False):
            good = _sq([_item(leaf, undefined=undefined_item)] * 2, undefined=undefined_sq)
            assert walk(good, sop_class=EnhancedSRStorage) is None
            for cut in range(1, len(good)):  # (empty: no sequence at all)
                assert walk(good[:cut], sop_class=EnhancedSRStorage) is not None, (undefined_sq, undefined_item, cut)
    assert walk(_nested(MAX_DEPTH), sop_class=EnhancedSRStorage) is None
    assert walk(_nested(MAX_DEPTH + 1), sop_class=EnhancedSRStorage) == f"sequences nested deeper than {MAX_DEPTH}"
    wrong = _sq([_item(leaf, undefined=False)], undefined=False)
    wrong = wrong[:8] + struct.pack("<L", len(wrong) - 12 - 1) + wrong[12:]  # sequence one byte short of its item
    assert walk(wrong, sop_class=EnhancedSRStorage) == "(0008,1140) runs past the end of its item"
    stray = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + leaf
    assert walk(stray, sop_class=EnhancedSRStorage) == "(FFFE,E00D) outside a sequence"
    not_an_item = _sq([leaf])
    assert walk(not_an_item, sop_class=EnhancedSRStorage) == "(0008,1140) holds (0008,1155), not an item"
    undefined_text = struct.pack("<HH2sHL", 0x0008, 0x0100, b"UT", 0, 0xFFFFFFFF)
    assert walk(undefined_text, sop_class=EnhancedSRStorage) == "(0008,0100) of undefined length is not a sequence"


def test_the_number_of_elements_is_bounded() -> None:
    empty = struct.pack("<HH2sH", 0x0009, 0x1010, b"LO", 0)
    assert walk(empty * (MAX_ELEMENTS - 1), sop_class=EnhancedSRStorage) is None
    assert walk(empty * MAX_ELEMENTS, sop_class=EnhancedSRStorage) == f"more than {MAX_ELEMENTS} elements"


def test_an_undefined_length_un_sequence_is_read_as_implicit_vr() -> None:
    implicit_leaf = struct.pack("<HHL", 0x0008, 0x1155, 6) + b"1.2.3\0"
    good = _sq([_item(implicit_leaf)], vr=b"UN")
    assert walk(good, sop_class=EnhancedSRStorage) is None
    assert walk(good[:-10], sop_class=EnhancedSRStorage) is not None


def _encapsulated(*items: bytes, delimiter: bool = True) -> bytes:
    out = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + b"".join(items)
    return out + (struct.pack("<HHL", 0xFFFE, 0xE0DD, 0) if delimiter else b"")


def test_encapsulated_pixel_data_must_be_an_offset_table_fragments_and_a_delimiter() -> None:
    head = _el(0x0028, 0x0010, b"US", struct.pack("<H", 4))
    bot, fragment = _item(b"", undefined=False), _item(b"\xff\xd8" + bytes(30), undefined=False)
    jpeg = "1.2.840.10008.1.2.4.50"
    assert walk(head + _encapsulated(bot, fragment, fragment), jpeg) is None
    assert walk(head + _encapsulated(_item(bytes(8), undefined=False), fragment), jpeg) is None
    assert walk(head + _encapsulated(bot), jpeg) == "encapsulated Pixel Data without fragments"
    assert walk(head + _encapsulated(bot, fragment, delimiter=False), jpeg) == \
        "encapsulated Pixel Data without its delimiter"
    assert walk(head + _encapsulated(_item(bytes(6), undefined=False), fragment), jpeg) == \
        "basic offset table length not a multiple of 4"
    assert walk(head + _encapsulated(head), jpeg) == "encapsulated Pixel Data without its offset table"
    assert walk(head + _encapsulated(bot, fragment, head), jpeg) == \
        "encapsulated Pixel Data holds (0028,0010), not a fragment"
    whole = head + _encapsulated(bot, fragment)
    assert all(walk(whole[:cut], jpeg) is not None for cut in range(len(whole)))
    assert walk(whole, EXPLICIT_LE) == "Pixel Data encapsulated under a native transfer syntax"
    assert walk(_encode(_ct()), jpeg) == "Pixel Data not encapsulated under its transfer syntax"


def test_it_never_raises_on_garbage() -> None:
    """Random bytes flipped and cuts in real files of each encoding: a reason or None, never an exception."""
    rng = random.Random(21)
    samples = [dataset_of(p) for p in (DATA / "thorax_cta" / "CT0001.dcm", EDGE / "MR_small_bigendian.dcm",
                                       DATA / "liver_3slice" / "01.dcm", EDGE / "JPEG2000-embedded-sequence-delimiter.dcm",
                                       EDGE / "image_dfl.dcm", EDGE / "MR_small_RLE.dcm")]
    for _ in range(1500):
        data, syntax, sop_class = rng.choice(samples)
        mutated = bytearray(data[:rng.randrange(len(data) + 1)])
        for _ in range(rng.randrange(1, 6)):
            if mutated:
                mutated[rng.randrange(min(len(mutated), 4096))] = rng.randrange(256)
        reason = walk(bytes(mutated), syntax, sop_class)
        assert reason is None or 0 < len(reason) <= 64


def test_which_classes_must_carry_pixel_data() -> None:
    assert needs_pixel_data(CT) and needs_pixel_data("1.2.840.10008.5.1.4.1.1.2.1")  # CT, Enhanced CT
    assert needs_pixel_data(SegmentationStorage) and not needs_pixel_data(EnhancedSRStorage)
    assert not needs_pixel_data("1.2.840.10008.5.1.4.1.1.66.5")  # Surface Segmentation: meshes
    assert not needs_pixel_data("1.2.3.4")  # unknown: not required
