"""Deflated datasets read with a bound (node/ingest/inflate.py)."""

from __future__ import annotations

import zlib

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from segnode.node.ingest.header import HeaderError
from segnode.node.ingest.inflate import InflatesTooLarge, inflated_header

CT = "1.2.840.10008.5.1.4.1.1.2"


def deflated(prefix_padding: int = 0, payload: int = 1000) -> bytes:
    """A deflated explicit VR LE dataset: an OB of ``prefix_padding`` bytes before the UIDs, pixels after."""
    ds = Dataset()
    if prefix_padding:
        ds.add_new(0x00091010, "OB", bytes(prefix_padding))  # a private element in group 0009: before 0020
    ds.SOPClassUID, ds.SOPInstanceUID = CT, "1.2.3.4"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.4.5", "CT"
    ds.PixelData = bytes(payload)
    ds["PixelData"].VR = "OB"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(buffer.getvalue()) + deflater.flush()


def test_the_header_is_read_from_a_prefix_grown_as_needed() -> None:
    values = inflated_header(memoryview(deflated(prefix_padding=300_000)), 1 << 30)  # past the first 64 KiB
    assert values == {"SOPClassUID": CT, "SOPInstanceUID": "1.2.3.4", "StudyInstanceUID": "1.2.3",
                      "SeriesInstanceUID": "1.2.3.4.5", "Modality": "CT"}


def test_a_pad_byte_after_the_stream_is_fine() -> None:
    assert inflated_header(memoryview(deflated() + b"\x00"), 1 << 20)["SOPInstanceUID"] == "1.2.3.4"


def test_past_the_limit_inflated_it_is_refused() -> None:
    data = deflated(payload=8 << 20)
    assert len(data) < 64 << 10  # a bomb: tiny on the wire
    assert inflated_header(memoryview(data), 9 << 20)["SeriesInstanceUID"] == "1.2.3.4.5"
    with pytest.raises(InflatesTooLarge):
        inflated_header(memoryview(data), 8 << 20)


def test_a_truncated_or_corrupt_stream_does_not_decode() -> None:
    data = deflated(payload=1 << 20)
    with pytest.raises(HeaderError):
        inflated_header(memoryview(data[:len(data) // 2]), 1 << 30)
    with pytest.raises(zlib.error):
        inflated_header(memoryview(b"\xff" * 100), 1 << 30)
