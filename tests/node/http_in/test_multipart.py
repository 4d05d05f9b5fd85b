"""The multipart/related reader (node/http_in/multipart.py): streamed, capped, strict about its end."""

from __future__ import annotations

import io

import pytest
from segnode.errors import InputError
from segnode.node.http_in import multipart
from segnode.node.http_in.multipart import (
    BodyTooLarge,
    ChunkedBody,
    LengthBody,
    MediaType,
    encode_parts,
    iter_parts,
)


def body(parts: list[tuple[dict[str, str], bytes]], boundary: str = "xyz") -> bytes:
    return b"".join(encode_parts(parts, boundary))


def read(data: bytes, *, boundary: str = "xyz", max_part: int = 1 << 20, max_parts: int = 100) -> list:
    return list(iter_parts(LengthBody(io.BytesIO(data), len(data)), boundary, max_part_bytes=max_part,
                           max_parts=max_parts))


def test_parts_round_trip_across_read_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multipart, "CHUNK", 7)  # every delimiter and header block split between reads
    parts = [({"Content-Type": "application/dicom"}, bytes(range(256)) * 3), ({"Content-Type": "text/plain"}, b"")]
    got = read(body(parts))
    assert [bytes(p.body) for p in got] == [parts[0][1], b""]
    assert [p.content_type.value for p in got] == ["application/dicom", "text/plain"]


def test_a_part_over_the_cap_is_skipped_and_reported_the_next_one_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multipart, "CHUNK", 5)
    got = read(body([({}, b"a" * 100), ({}, b"small")]), max_part=50)
    assert [p.too_large for p in got] == [True, False] and bytes(got[1].body) == b"small"


def test_truncated_body_and_too_many_parts_are_input_errors() -> None:
    data = body([({}, b"abc")])
    with pytest.raises(InputError, match="no closing delimiter|ends"):
        read(data[:-12])
    with pytest.raises(InputError, match="more than 1 parts"):
        read(body([({}, b"a"), ({}, b"b")]), max_parts=1)
    with pytest.raises(InputError, match="no multipart delimiter"):
        read(data, boundary="other")


def test_chunked_body_is_decoded_and_capped() -> None:
    data = body([({"Content-Type": "application/dicom"}, b"x" * 40)])
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (data[:10], data[10:])) + b"0\r\n\r\n"
    [part] = list(iter_parts(ChunkedBody(io.BytesIO(chunked), 1000), "xyz", max_part_bytes=100, max_parts=5))
    assert bytes(part.body) == b"x" * 40
    with pytest.raises(BodyTooLarge):
        list(iter_parts(ChunkedBody(io.BytesIO(chunked), 20), "xyz", max_part_bytes=100, max_parts=5))


def test_media_type_parameters() -> None:
    media = MediaType.parse('Multipart/Related; type="application/dicom"; boundary="a b"')
    assert media.value == "multipart/related" and media.params == {"type": "application/dicom", "boundary": "a b"}
