"""Text inside encapsulated pixel data: found and removed without re-encoding a pixel.

A compressed frame can carry text the attributes never show: JPEG and JPEG-LS
comment (``COM``) and application (``APPn``) marker segments, JPEG 2000
comment (``COM``) marker segments, and bytes after the end-of-image marker.
:func:`strip_stream_text` walks every frame's marker segments and copies the
ones a decoder needs, byte for byte, so the decoded pixels are unchanged:

* JPEG / JPEG-LS: every ``COM`` and ``APPn`` is dropped except the three that
  can change decoding (``APP0`` JFIF, rewritten without its thumbnail;
  ``APP14`` Adobe and JPEG-LS ``APP8`` ``mrfx``, cut to their fixed fields);
* JPEG 2000 / HTJ2K codestreams: every ``COM`` of the main and tile-part
  headers is dropped (tile-part lengths adjusted);
* RLE and native pixel data carry no text.

What cannot be cleaned this way (video, JPEG XL, JP2 file-format boxes,
undecodable streams) raises :class:`PixelTextError`; the dataset store
quarantines such a series.
"""

from __future__ import annotations

from collections.abc import Callable

import pydicom.uid as tsuid
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames

from segnode.errors import InputError

JPEG_SYNTAXES = frozenset({
    tsuid.JPEGBaseline8Bit, tsuid.JPEGExtended12Bit, tsuid.JPEGLossless, tsuid.JPEGLosslessSV1,
    tsuid.JPEGLSLossless, tsuid.JPEGLSNearLossless,
})
J2K_SYNTAXES = frozenset({
    tsuid.JPEG2000Lossless, tsuid.JPEG2000, tsuid.JPEG2000MCLossless, tsuid.JPEG2000MC,
    tsuid.HTJ2KLossless, tsuid.HTJ2KLosslessRPCL, tsuid.HTJ2K,
})
#: encapsulated syntaxes whose streams hold no text of their own
TEXT_FREE_SYNTAXES = frozenset({tsuid.RLELossless})

_EOI, _SOS, _COM = 0xD9, 0xDA, 0xFE
_RST = range(0xD0, 0xD8)
_APP = range(0xE0, 0xF0)
_JPEG_LS_MARKERS = {0xF7, 0xF8}  # SOF55, LSE
_J2K_SOC, _J2K_SOT, _J2K_SOD, _J2K_EOC, _J2K_COM, _J2K_TLM = 0xFF4F, 0xFF90, 0xFF93, 0xFFD9, 0xFF64, 0xFF55


class PixelTextError(InputError):
    """The pixel data may carry text that cannot be removed losslessly."""


def strip_stream_text(ds: Dataset) -> bool:
    """Remove text from ``ds``'s encapsulated frames in place; ``True`` if anything was removed."""
    if "PixelData" not in ds or not ds["PixelData"].is_undefined_length:
        return False
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax in TEXT_FREE_SYNTAXES:
        return False
    clean = _cleaner(syntax)
    frames = _frames(ds)
    cleaned = [clean(frame) for frame in frames]
    if cleaned == frames:
        return False
    for tag in (0x7FE00001, 0x7FE00002):  # extended offsets no longer match
        if tag in ds:
            del ds[tag]
    ds.PixelData = encapsulate(cleaned, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return True


def _cleaner(syntax: str | None) -> Callable[[bytes], bytes]:
    if syntax in JPEG_SYNTAXES:
        return clean_jpeg
    if syntax in J2K_SYNTAXES:
        return clean_j2k
    name = getattr(syntax, "name", None) or (str(syntax) if syntax else "an unknown transfer syntax")
    raise PixelTextError(f"pixel data in {name} cannot be inspected for embedded text")


def _frames(ds: Dataset) -> list[bytes]:
    count = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        return list(generate_frames(ds.PixelData, number_of_frames=count))
    except (ValueError, KeyError) as exc:
        raise PixelTextError(f"encapsulated pixel data cannot be split into frames: {exc}") from exc


# --- JPEG and JPEG-LS ---------------------------------------------------------------------------
def clean_jpeg(frame: bytes) -> bytes:
    """The frame with every marker segment a decoder does not need removed."""
    if frame[:2] != b"\xff\xd8":
        raise PixelTextError("a frame does not start with a JPEG start-of-image marker")
    out, pos = bytearray(b"\xff\xd8"), 2
    while True:
        marker, pos = _next_marker(frame, pos)
        if marker == _EOI:
            return bytes(out + b"\xff\xd9") + _padding(frame[pos:])
        if marker in _RST or marker == 0x01:
            out += bytes((0xFF, marker))
            continue
        end = pos + int.from_bytes(frame[pos:pos + 2], "big")
        if end > len(frame) or end < pos + 2:
            raise PixelTextError("a JPEG marker segment runs past the end of its frame")
        out += _needed_segment(marker, frame[pos + 2:end])
        pos = end
        if marker == _SOS:
            scan_end = _scan_end(frame, pos)
            out += frame[pos:scan_end]
            pos = scan_end


def _next_marker(frame: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(frame) or frame[pos] != 0xFF:
        raise PixelTextError("a JPEG frame has bytes outside any marker segment or has no end-of-image")
    while pos < len(frame) and frame[pos] == 0xFF:  # fill bytes
        pos += 1
    if pos >= len(frame):
        raise PixelTextError("a JPEG frame ends inside a marker")
    return frame[pos], pos + 1


def _scan_end(frame: bytes, pos: int) -> int:
    """Where the entropy-coded data starting at ``pos`` ends (the next real marker)."""
    while True:
        found = frame.find(b"\xff", pos)
        if found < 0 or found + 1 >= len(frame):
            raise PixelTextError("a JPEG scan has no end-of-image marker")
        following = frame[found + 1]
        # JPEG stuffs 0x00 after 0xFF, JPEG-LS a zero bit: neither is a marker; nor are restarts
        if following >= 0x80 and following != 0xFF and following not in _RST:
            return found
        pos = found + 1


def _needed_segment(marker: int, body: bytes) -> bytes:
    if marker == _COM:
        return b""
    if marker in _APP:
        body = _needed_app(marker, body)
        return _segment(marker, body) if body else b""
    if 0xF0 <= marker <= 0xFD and marker not in _JPEG_LS_MARKERS:
        raise PixelTextError(f"a JPEG frame holds an unknown extension marker 0xFF{marker:02X}")
    return _segment(marker, body)


def _needed_app(marker: int, body: bytes) -> bytes:
    """What of an APPn segment a decoder needs (``b""``: nothing)."""
    if marker == 0xE0 and body[:5] == b"JFIF\x00" and len(body) >= 14:
        return body[:12] + b"\x00\x00"  # version, units, density; no thumbnail
    if marker == 0xEE and body[:5] == b"Adobe" and len(body) >= 12:
        return body[:12]  # version, flags, colour transform
    if marker == 0xE8 and body[:4] == b"mrfx" and len(body) >= 5:
        return body[:5]  # JPEG-LS colour transform
    return b""


def _segment(marker: int, body: bytes) -> bytes:
    return bytes((0xFF, marker)) + (len(body) + 2).to_bytes(2, "big") + body


# --- JPEG 2000 ----------------------------------------------------------------------------------
def clean_j2k(frame: bytes) -> bytes:
    """The codestream with its comment marker segments removed."""
    if frame[4:8] == b"jP  ":
        raise PixelTextError("JPEG 2000 file-format boxes (not a bare codestream) cannot be inspected")
    if _u16(frame, 0) != _J2K_SOC:
        raise PixelTextError("a frame does not start with a JPEG 2000 start-of-codestream marker")
    out, pos, has_tlm = bytearray(frame[:2]), 2, False
    while _u16(frame, pos) != _J2K_SOT:
        marker, end = _u16(frame, pos), pos + 2 + _u16(frame, pos + 2)
        has_tlm |= marker == _J2K_TLM
        if marker != _J2K_COM:
            out += frame[pos:end]
        pos = end
    while _u16(frame, pos) == _J2K_SOT:
        part, pos = _tile_part(frame, pos, has_tlm)
        out += part
    if _u16(frame, pos) != _J2K_EOC:
        raise PixelTextError("a JPEG 2000 codestream has bytes after its last tile-part that are not EOC")
    return bytes(out + b"\xff\xd9") + _padding(frame[pos + 2:])


def _padding(tail: bytes) -> bytes:
    """Zero padding after the end marker is kept (fragments are even); anything else is dropped."""
    return tail if not tail.strip(b"\x00") else b""


def _tile_part(frame: bytes, start: int, has_tlm: bool) -> tuple[bytes, int]:
    psot = int.from_bytes(frame[start + 6:start + 10], "big")
    end = start + psot if psot else len(frame) - 2
    header, pos = bytearray(frame[start:start + 12]), start + 12
    while _u16(frame, pos) != _J2K_SOD:
        seg_end = pos + 2 + _u16(frame, pos + 2)
        if _u16(frame, pos) != _J2K_COM:
            header += frame[pos:seg_end]
        elif has_tlm:
            raise PixelTextError("a JPEG 2000 tile-part comment cannot be removed under a TLM index")
        pos = seg_end
    body = frame[pos:end]
    if psot:
        header[6:10] = (len(header) + len(body)).to_bytes(4, "big")
    return bytes(header + body), end


def _u16(frame: bytes, pos: int) -> int:
    if pos + 2 > len(frame):
        raise PixelTextError("a JPEG 2000 codestream ends inside a marker segment")
    return int.from_bytes(frame[pos:pos + 2], "big")
