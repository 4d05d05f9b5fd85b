"""Text in encapsulated pixel data: removed without re-encoding (decoded pixels unchanged) or quarantined."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)
from segnode.storage.dataset import DatasetStore, QuarantinedError, harvest
from segnode.storage.deid import Deidentifier, write_dicom
from segnode.storage.pixel_text import PixelTextError, clean_jpeg, strip_stream_text
from segnode.storage.pseudonyms import Pseudonymizer

from tests.deid_study import (
    canary_tokens,
    compress_with_text,
    jpeg_segment,
    make_canary_study,
    make_seg,
)
from tests.dicomtools import dciodvfy

SECRET = b"pixel-text-secret-0123456"
TOKENS = canary_tokens("px")


def _image(frames: int, size: int = 32, bits: int = 16) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.10"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.NumberOfFrames = 1, "MONOCHROME2", frames
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    dtype = np.uint16 if bits == 16 else np.uint8
    pixels = np.random.default_rng(7).integers(0, 250, (frames, size, size)).astype(dtype)
    ds.PixelData = pixels.tobytes()
    return ds


def _jpeg_baseline(frames: int) -> Dataset:
    """Pillow's JPEG frames with a JFIF header, a comment, Exif (APP1) and an ICC profile (APP2)."""
    ds = _image(frames, bits=8)
    encoded = []
    for frame in np.frombuffer(ds.PixelData, np.uint8).reshape(frames, 32, 32):
        out = io.BytesIO()
        Image.fromarray(frame, "L").save(out, "JPEG", quality=90, comment=TOKENS["pixel_com"].encode(),
                                         exif=b"Exif\x00\x00" + TOKENS["pixel_app"].encode(),
                                         icc_profile=b"ICC" + TOKENS["j2k_com"].encode())
        encoded.append(out.getvalue() + TOKENS["pixel_tail"].encode())
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


def _with_text(syntax: str, frames: int) -> Dataset:
    ds = _image(frames)
    compress_with_text(ds, syntax, TOKENS)
    return ds


def _written(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _planted(data: bytes) -> list[str]:
    keys = ("pixel_com", "pixel_app", "pixel_tail", "j2k_com", "j2k_tile_com")
    return [k for k in keys if TOKENS[k].encode() in data]


@pytest.mark.parametrize(
    "make",
    [lambda: _jpeg_baseline(2), lambda: _with_text(JPEGLSLossless, 3), lambda: _with_text(JPEG2000Lossless, 2)],
    ids=["jpeg-baseline", "jpeg-ls", "jpeg2000"],
)
def test_stream_text_is_removed_and_decoded_pixels_are_unchanged(make) -> None:
    ds = make()
    assert _planted(_written(ds))  # the tokens are there before
    before = ds.pixel_array.copy()
    out = Deidentifier(Pseudonymizer(SECRET)).deidentify(ds)
    data = _written(out.dataset)
    assert out.pixel_text_removed and _planted(data) == []
    back = pydicom.dcmread(io.BytesIO(data))
    assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID  # not re-encoded
    assert np.array_equal(back.pixel_array, before)


def test_a_clean_stream_is_left_byte_for_byte() -> None:
    ds = _image(2)
    ds.compress(JPEGLSLossless)
    pixel_data = ds.PixelData
    assert strip_stream_text(ds) is False and ds.PixelData == pixel_data


def test_only_the_app_fields_a_decoder_needs_survive() -> None:
    text = b"CNRYAPPTEXT"
    jfif = b"JFIF\x00\x01\x02\x00\x00\x48\x00\x48\x02\x01" + text + b"\x00" * 3  # 2x1 thumbnail
    adobe = b"Adobe\x00\x64\x00\x00\x00\x00\x01" + text
    scan = jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\x12\xff\x00\x34\xff\xd0\x56"
    frame = (b"\xff\xd8" + jpeg_segment(0xE0, jfif) + jpeg_segment(0xEE, adobe) + jpeg_segment(0xE8, b"mrfx\x01" + text)
             + jpeg_segment(0xE2, b"ICC_PROFILE\x00" + text) + jpeg_segment(0xDB, b"\x00" * 65) + scan
             + jpeg_segment(0xFE, text) + b"\xff\xff\xd9" + text)
    cleaned = clean_jpeg(frame)
    assert text not in cleaned
    assert cleaned == (b"\xff\xd8" + jpeg_segment(0xE0, jfif[:12] + b"\x00\x00") + jpeg_segment(0xEE, adobe[:12])
                       + jpeg_segment(0xE8, b"mrfx\x01") + jpeg_segment(0xDB, b"\x00" * 65) + scan + b"\xff\xd9")


def _encapsulated(syntax: str, frame: bytes) -> Dataset:
    ds = _image(1, bits=8)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


@pytest.mark.parametrize(
    ("syntax", "frame", "reason"),
    [
        (MPEG2MPML, b"\x00\x00\x01\xb3" + b"\x00" * 8, "cannot be inspected"),
        (JPEG2000Lossless, b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 8, "file-format boxes"),
        (JPEGBaseline8Bit, b"GIF89a" + b"\x00" * 6, "start-of-image"),
        (JPEGBaseline8Bit, b"\xff\xd8\xff\xfe\x00\x09CNRY", "past the end"),
    ],
    ids=["video", "jp2-boxes", "not-jpeg", "truncated"],
)
def test_streams_that_cannot_be_cleaned_are_refused(syntax: str, frame: bytes, reason: str) -> None:
    with pytest.raises(PixelTextError, match=reason):
        strip_stream_text(_encapsulated(syntax, frame))


def test_rle_and_native_pixel_data_are_left_alone() -> None:
    native = _image(1)
    assert strip_stream_text(native) is False
    rle = _image(2)
    rle.compress(RLELossless)
    before = rle.PixelData
    assert strip_stream_text(rle) is False and rle.PixelData == before


def test_a_series_whose_stream_cannot_be_cleaned_is_quarantined(tmp_path: Path) -> None:
    files, _ = make_canary_study(tmp_path / "study", "pq", n_slices=2)
    seg = make_seg(files, tmp_path / "seg.dcm")
    ds = pydicom.dcmread(files[1])
    ds.PixelData = encapsulate([b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 8])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(files[1])
    store = DatasetStore.open(tmp_path / "store", SECRET)
    with pytest.raises(QuarantinedError, match="file-format boxes"):
        harvest(store, dataset="Liver", series_files=files, seg_path=seg, profile="liver", backend="b",
                model_version="1", weights_hash="h", rule="r", calling_ae="AE")
    assert [q["reason"] for q in store.quarantined()] == [
        "JPEG 2000 file-format boxes (not a bare codestream) cannot be inspected"]
    assert store.cases("Liver") == {} and not (store.root / "objects").exists()


def test_multi_fragment_frames_are_rejoined() -> None:
    ds = _with_text(JPEGLSLossless, 2)
    frames = list(generate_frames(ds.PixelData, number_of_frames=2))
    before = ds.pixel_array.copy()
    ds.PixelData = encapsulate(frames, fragments_per_frame=2)
    strip_stream_text(ds)
    assert _planted(ds.PixelData) == [] and np.array_equal(ds.pixel_array, before)


@pytest.mark.peer
@pytest.mark.parametrize(("syntax", "decoder"), [(JPEGLSLossless, "dcmdjpls"), (JPEGBaseline8Bit, "dcmdjpeg")])
def test_dcmtk_decodes_the_cleaned_stream_to_the_same_pixels(syntax: str, decoder: str, tmp_path: Path) -> None:
    """An independent decoder (DCMTK) and dciodvfy accept what the cleaner wrote."""
    exe = shutil.which(decoder)
    assert exe, f"{decoder} (DCMTK) is required: make peers"
    files, _ = make_canary_study(tmp_path / "study", "dk", n_slices=1, syntax=JPEGLSLossless)
    source = pydicom.dcmread(files[0]) if syntax == JPEGLSLossless else _jpeg_baseline(1)
    before = source.pixel_array.copy()
    cleaned = tmp_path / "cleaned.dcm"
    write_dicom(Deidentifier(Pseudonymizer(SECRET)).deidentify(source).dataset, cleaned)
    subprocess.run([exe, str(cleaned), str(tmp_path / "decoded.dcm")], check=True, capture_output=True, timeout=60)
    assert np.array_equal(pydicom.dcmread(tmp_path / "decoded.dcm").pixel_array, before)
    if syntax == JPEGLSLossless:  # a CT image: the validator finds only the canary study's own omissions
        assert {e for e in dciodvfy(cleaned) if "Laterality" not in e and "PatientPosition" not in e} == set()


REAL_STREAMS = ["edge_cases/pydicom/JPGExtended.dcm", "edge_cases/pydicom/MR_small_jp2klossless.dcm",
                "edge_cases/pydicom/MR_small_jpeg_ls_lossless.dcm", "edge_cases/pydicom/JPEGLSNearLossless_16.dcm",
                "upper_abdomen/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016573"]


@pytest.mark.parametrize("name", REAL_STREAMS, ids=lambda n: Path(n).name[:24])
def test_real_encoders_streams_keep_their_pixels(name: str, data_dir: Path) -> None:
    """Streams written by real encoders (NEMA, Kakadu/OpenJPEG, CharLS, a Siemens scanner)."""
    ds = pydicom.dcmread(data_dir / name)
    before = ds.pixel_array.copy()
    strip_stream_text(ds)
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
    assert np.array_equal(ds.pixel_array, before)
    assert strip_stream_text(ds) is False  # nothing left to remove
    assert not any(b"\xff\xfe" in f[:64] or b"\xff\x64" in f[:256] for f in frames)
