"""multipart/related bodies (RFC 2387, PS3.18 8.6.1.2) read from a socket, and written.

The reader streams: it never holds more than one part (up to ``max_part_bytes``)
and a read chunk.  A part over the cap is read past and reported as
``too_large`` (its bytes are dropped), so the request goes on and the client
learns which instance was refused.  Header blocks are capped (16 KiB), as are
the number of parts.  A body that ends before its closing delimiter raises
:class:`~segnode.errors.InputError`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from segnode.errors import InputError

CHUNK = 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024
_PARAM = re.compile(r';\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


@dataclass(frozen=True)
class MediaType:
    """A Content-Type: ``type/subtype`` (lower case) and its parameters (names lower case, quotes removed)."""

    value: str
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, header: str | None) -> MediaType:
        header = header or ""
        value = header.split(";", 1)[0].strip().lower()
        params = {k.lower(): v[1:-1].replace('\\"', '"') if v.startswith('"') else v
                  for k, v in _PARAM.findall(header[len(header.split(";", 1)[0]):])}
        return cls(value, params)


@dataclass
class Part:
    """One body part: its headers (names lower case) and bytes; ``too_large`` parts have no bytes."""

    headers: dict[str, str]
    body: bytearray
    too_large: bool = False

    @property
    def content_type(self) -> MediaType:
        return MediaType.parse(self.headers.get("content-type"))


class BodyTooLarge(InputError):
    """A chunked body grew past its cap while being read."""


class ByteStream(Protocol):
    """What the body readers read from: a request's ``rfile``, a response's raw stream, a ``BytesIO``."""

    def read(self, size: int, /) -> bytes: ...

    def readline(self, size: int, /) -> bytes: ...


class LengthBody:
    """Exactly ``length`` bytes of ``stream`` (a Content-Length body), read in chunks."""

    def __init__(self, stream: ByteStream, length: int) -> None:
        self.stream = stream
        self.remaining = length

    def read(self) -> bytes:
        if self.remaining <= 0:
            return b""
        data = self.stream.read(min(CHUNK, self.remaining))
        if not data:
            raise InputError("the request body ended before its Content-Length")
        self.remaining -= len(data)
        return data

    def drain(self) -> None:
        while self.read():
            pass


class ChunkedBody(LengthBody):
    """A ``Transfer-Encoding: chunked`` body (RFC 9112 7.1), at most ``limit`` bytes of data."""

    def __init__(self, stream: ByteStream, limit: int) -> None:
        super().__init__(stream, 0)
        self.limit = limit
        self.total = 0
        self.done = False

    def read(self) -> bytes:
        if self.remaining <= 0 and (self.done or not self._next_chunk()):
            return b""
        data = self.stream.read(min(CHUNK, self.remaining))
        if not data:
            raise InputError("the request body ended inside a chunk")
        self.remaining -= len(data)
        if self.remaining == 0 and self.stream.read(2) != b"\r\n":
            raise InputError("a chunk does not end with CRLF")
        return data

    def _next_chunk(self) -> bool:
        line = self.stream.readline(1024)
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise InputError("bad chunk size line in a chunked body") from None
        if size == 0:
            while self.stream.readline(1024).strip():  # trailer fields
                pass
            self.done = True
            return False
        self.total += size
        if self.total > self.limit:
            raise BodyTooLarge(f"body larger than {self.limit} bytes")
        self.remaining = size
        return True


def iter_parts(body: LengthBody, boundary: str, *, max_part_bytes: int, max_parts: int) -> Iterator[Part]:
    """The parts of a multipart ``body``; the body is read to its end."""
    if not 0 < len(boundary) <= 70:
        raise InputError("multipart boundary missing or longer than 70 characters")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    buf = bytearray(b"\r\n")  # the first delimiter has no CRLF before it
    count = 0
    buf = _skip_to(body, buf, delimiter)  # the preamble
    while True:
        while len(buf) < 2:
            more = body.read()
            if not more:
                raise InputError("multipart body ends inside a delimiter")
            buf += more
        if buf[:2] == b"--":  # close delimiter: the epilogue is ignored
            body.drain()
            return
        count += 1
        if count > max_parts:
            raise InputError(f"more than {max_parts} parts in one request")
        headers, buf = _headers(body, buf)
        part, buf = _part_body(body, buf, delimiter, max_part_bytes)
        yield Part(headers, part if part is not None else bytearray(), too_large=part is None)


def _skip_to(body: LengthBody, buf: bytearray, delimiter: bytes) -> bytearray:
    start = 0
    while (at := buf.find(delimiter, start)) < 0:
        start = max(0, len(buf) - len(delimiter) + 1)
        more = body.read()
        if not more:
            raise InputError("no multipart delimiter in the body (wrong boundary?)")
        buf += more
        if len(buf) > MAX_HEADER_BYTES + len(delimiter):  # a preamble is not a place to store data
            del buf[:start]
            start = 0
    return buf[at + len(delimiter):]


def _headers(body: LengthBody, buf: bytearray) -> tuple[dict[str, str], bytearray]:
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if len(buf) > MAX_HEADER_BYTES:
            raise InputError("a part's headers are longer than 16 KiB")
        more = body.read()
        if not more:
            raise InputError("multipart body ends inside a part's headers")
        buf += more
    block = bytes(buf[:end]).decode("latin-1")
    headers: dict[str, str] = {}
    for line in block.split("\r\n")[1:]:  # the first line is the rest of the delimiter line
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers, buf[end + 4:]


def _part_body(body: LengthBody, buf: bytearray, delimiter: bytes,
               limit: int) -> tuple[bytearray | None, bytearray]:
    """The part's bytes up to the next delimiter (``None`` past ``limit``) and what follows the delimiter."""
    start, dropped = 0, 0
    while (at := buf.find(delimiter, start)) < 0:
        keep = len(delimiter) - 1
        if dropped or len(buf) - keep > limit:  # over the cap: read past it, keeping only a possible delimiter's start
            dropped += max(0, len(buf) - keep)
            del buf[:max(0, len(buf) - keep)]
        start = max(0, len(buf) - keep)
        more = body.read()
        if not more:
            raise InputError("multipart body ends inside a part (no closing delimiter)")
        buf += more
    if dropped or at > limit:
        return None, buf[at + len(delimiter):]
    return buf[:at], buf[at + len(delimiter):]


def new_boundary() -> str:
    return "segnode-" + secrets.token_hex(16)


def encode_parts(parts: Iterable[tuple[dict[str, str], bytes]], boundary: str) -> Iterator[bytes]:
    """The bytes of a multipart body: each part's headers and bytes, then the close delimiter."""
    for headers, data in parts:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        yield f"--{boundary}\r\n{head}\r\n".encode("latin-1")
        yield data
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("latin-1")
