"""WADO-RS (PS3.18 10.4): instances, metadata, frames and bulk data of what the node holds.

Every answer is a :class:`WebAnswer` (status, content type, body chunks and
their total length) that either HTTP server sends as it is:

* instances, a series, a study: ``multipart/related; type="application/dicom"``,
  each part a Part 10 file as stored (no transcoding; an ``Accept`` asking for
  another transfer syntax is a 406);
* metadata: ``application/dicom+json``, every attribute of each instance with
  the pixel data and other values over :data:`BULK_THRESHOLD` bytes as a
  ``BulkDataURI`` (PS3.18 8.7.3);
* frames (``1,2,...``, numbered from 1): one part each, the frame's bytes as
  stored: ``application/octet-stream; transfer-syntax=...`` for native pixel
  data (single-bit frames, as a SEG stores them, repacked to start on a byte),
  the encapsulated frame for compressed ones;
* bulk data (``.../bulkdata/{tag}``): that attribute's value; multipart unless
  the client accepts only ``application/octet-stream``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from segnode.node.http_in.base import HttpError
from segnode.node.http_in.catalogue import StoredInstance
from segnode.node.http_in.multipart import MediaType, new_boundary

BULK_THRESHOLD = 4096
MAX_FRAMES = 10_000
PIXEL_DATA = Tag(0x7FE00010)


@dataclass
class WebAnswer:
    """A response of the DICOMweb read side: status, content type, the body as chunks, its length."""

    status: HTTPStatus
    content_type: str
    chunks: Iterable[bytes]
    length: int
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, data: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK) -> WebAnswer:
        return cls(status, content_type, [data], len(data))

    def body(self) -> bytes:
        return b"".join(self.chunks)


# -- Accept ----------------------------------------------------------------------------------------


def accepted(accept: str | None) -> list[MediaType]:
    """The media ranges of an ``Accept`` header (empty: anything)."""
    return [MediaType.parse(item) for item in (accept or "").split(",") if item.strip()] if accept else []


def _multipart_accepts(ranges: list[MediaType], part_type: str, syntax: str) -> bool:
    """May the answer be ``multipart/related; type=part_type`` with parts in transfer syntax ``syntax``?"""
    if not ranges:
        return True
    for media in ranges:
        if media.value in ("*/*", "multipart/*") and not media.params.get("type"):
            return True
        if media.value == "multipart/related":
            kind = media.params.get("type", part_type).lower()
            wanted = media.params.get("transfer-syntax", "*")
            if kind in (part_type, "*/*") and wanted in ("*", syntax):
                return True
            if kind == part_type and part_type == "application/dicom" and not wanted:
                return True
    return False


def _single_accepts(ranges: list[MediaType]) -> bool:
    """Does the client ask for one ``application/octet-stream`` body rather than a multipart one?"""
    return bool(ranges) and not any(m.value.startswith("multipart/") for m in ranges) and any(
        m.value in ("application/octet-stream", "*/*") for m in ranges)


def multipart(parts: list[tuple[dict[str, str], bytes | Path]], part_type: str) -> WebAnswer:
    """A ``multipart/related`` answer of ``parts`` (bytes, or a file read when sent)."""
    boundary = new_boundary()
    heads = [f"--{boundary}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n" for h, _ in parts]
    sizes = [len(b) if isinstance(b, bytes) else b.stat().st_size for _, b in parts]
    tail = f"--{boundary}--\r\n".encode("latin-1")
    length = sum(len(h.encode("latin-1")) + 2 for h in heads) + sum(sizes) + len(tail)

    def chunks() -> Iterator[bytes]:
        for head, (_, body) in zip(heads, parts, strict=True):
            yield head.encode("latin-1")
            yield body if isinstance(body, bytes) else body.read_bytes()
            yield b"\r\n"
        yield tail

    content_type = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return WebAnswer(HTTPStatus.OK, content_type, chunks(), length)


# -- instances -------------------------------------------------------------------------------------


def retrieve(instances: list[StoredInstance], syntaxes: dict[str, str], accept: str | None) -> WebAnswer:
    """The instances as Part 10 files; ``syntaxes`` maps each SOP Instance UID to its transfer syntax."""
    ranges = accepted(accept)
    for instance in instances:
        if not _multipart_accepts(ranges, "application/dicom", syntaxes[instance.sop_uid]):
            raise HttpError(HTTPStatus.NOT_ACCEPTABLE, "instances are sent as multipart/related; "
                            'type="application/dicom" in their stored transfer syntax (transfer-syntax=*)')
    parts: list[tuple[dict[str, str], bytes | Path]] = [
        ({"Content-Type": f"application/dicom; transfer-syntax={syntaxes[i.sop_uid]}"}, i.path) for i in instances]
    return multipart(parts, "application/dicom")


# -- metadata --------------------------------------------------------------------------------------


def instance_url(base: str, instance: StoredInstance) -> str:
    return f"{base}/studies/{instance.study_uid}/series/{instance.series_uid}/instances/{instance.sop_uid}"


def metadata(header: Dataset, instance: StoredInstance, base: str) -> dict[str, object]:
    """One instance's DICOM JSON: bulk data (the pixel data, large binary values) as ``BulkDataURI``."""
    url = instance_url(base, instance)

    def bulk(element: object) -> str:
        return f"{url}/bulkdata/{int(getattr(element, 'tag')):08X}"

    data = dict(header.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=bulk))
    if "Rows" in header and "Columns" in header:  # an image: its pixel data follows the header
        bits = int(header.get("BitsAllocated", 16))
        syntax = header.file_meta.get("TransferSyntaxUID") if hasattr(header, "file_meta") else None
        vr = "OB" if bits <= 8 or (syntax is not None and UID(syntax).is_compressed) else "OW"
        data["7FE00010"] = {"vr": vr, "BulkDataURI": f"{url}/bulkdata/7FE00010"}
    return dict(sorted(data.items()))


# -- frames and bulk data -------------------------------------------------------------------------------


def frame_numbers(text: str) -> list[int]:
    """``1,3,5`` as frame numbers (from 1); 400 on anything else."""
    if not re.fullmatch(r"[0-9]{1,6}(,[0-9]{1,6}){0,999}", text) or any(int(n) < 1 for n in text.split(",")):
        raise HttpError(HTTPStatus.BAD_REQUEST, "frames must be a comma-separated list of numbers from 1")
    return [int(n) for n in text.split(",")]


def read_full(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, f"the stored instance cannot be read: {exc}") from exc


def frames_of(ds: Dataset) -> list[bytes]:
    """Every frame of ``ds``'s pixel data as stored (single-bit frames repacked from a byte boundary)."""
    if PIXEL_DATA not in ds:
        raise HttpError(HTTPStatus.NOT_FOUND, "this instance has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    data: bytes = ds.PixelData
    if UID(ds.file_meta.TransferSyntaxUID).is_compressed:
        return list(generate_frames(data, number_of_frames=count))
    pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
    bits = int(ds.BitsAllocated)
    if bits == 1:
        flat = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
        return [np.packbits(flat[n * pixels:(n + 1) * pixels], bitorder="little").tobytes() for n in range(count)]
    size = pixels * bits // 8
    return [data[n * size:(n + 1) * size] for n in range(count)]


def frames(ds: Dataset, numbers: list[int], accept: str | None) -> WebAnswer:
    """The frames ``numbers`` of ``ds``, one part each."""
    syntax = str(ds.file_meta.TransferSyntaxUID)
    all_frames = frames_of(ds)
    if max(numbers) > len(all_frames):
        raise HttpError(HTTPStatus.NOT_FOUND, f"the instance has {len(all_frames)} frame(s), not {max(numbers)}")
    compressed = UID(syntax).is_compressed
    ranges = accepted(accept)
    ok = _multipart_accepts(ranges, "application/octet-stream", syntax) or (
        compressed and any(m.value == "multipart/related" and m.params.get("transfer-syntax") in ("*", syntax)
                           for m in ranges))
    if not ok:
        raise HttpError(HTTPStatus.NOT_ACCEPTABLE, "frames are sent as multipart/related; "
                        f"type=\"application/octet-stream\"; transfer-syntax={syntax} (as stored)")
    head = {"Content-Type": f"application/octet-stream; transfer-syntax={syntax}"}
    return multipart([(head, all_frames[n - 1]) for n in numbers], "application/octet-stream")


def bulk_tag(text: str) -> BaseTag:
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", text):
        raise HttpError(HTTPStatus.BAD_REQUEST, "a bulk data URI ends with the attribute's tag (8 hex digits)")
    return Tag(int(text, 16))


def _find(ds: Dataset, tag: BaseTag) -> bytes | None:
    """The bytes of the first ``tag`` in ``ds`` (depth first through sequences)."""
    if tag in ds:
        value = ds[tag].value
        return value if isinstance(value, bytes) else None
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                found = _find(item, tag)
                if found is not None:
                    return found
    return None


def bulkdata(ds: Dataset, tag: BaseTag, accept: str | None) -> WebAnswer:
    """The value of attribute ``tag`` as stored (the pixel data: all frames, as the file holds them)."""
    value = _find(ds, tag)
    if value is None:
        raise HttpError(HTTPStatus.NOT_FOUND, f"no bulk data {int(tag):08X} in this instance")
    ranges = accepted(accept)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if _single_accepts(ranges):
        return WebAnswer.of(value, "application/octet-stream")
    if not _multipart_accepts(ranges, "application/octet-stream", syntax):
        raise HttpError(HTTPStatus.NOT_ACCEPTABLE, "bulk data is sent as application/octet-stream")
    return multipart([({"Content-Type": "application/octet-stream"}, value)], "application/octet-stream")
