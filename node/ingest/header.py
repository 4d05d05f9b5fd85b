"""The few identifying attributes of a received dataset, read from its first bytes.

The C-STORE handler needs five values (SOP Class/Instance, Study, Series
UIDs, Modality), all in groups 0008 and 0020 near the start of a dataset.
pydicom takes ~0.3–0.5 ms to get there (it builds an element for everything
it passes); this walker reads element headers only, skips the values it does
not need (undefined-length sequences included) and stops at the first tag
past (0020,000E): ~20 µs.  It reads little endian, implicit and explicit VR
(every compressed transfer syntax encodes its dataset as explicit VR little
endian); for anything else (big endian, deflate, an undefined-length element
that is not a sequence) it returns ``None`` and the caller asks pydicom.
"""

from __future__ import annotations

import struct

#: tag → keyword of the attributes returned.
WANTED = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080060: "Modality",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
_LAST = max(WANTED)
IMPLICIT_LE = "1.2.840.10008.1.2"
#: transfer syntaxes whose dataset is not little endian, or not readable as it is.
_NOT_READ = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})  # explicit big endian, deflated
#: explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")


class HeaderError(ValueError):
    """The dataset's element structure is broken before the attributes needed."""


class _Unsupported(Exception):
    """An encoding this walker does not read; pydicom will."""


def read_header(data: memoryview | bytes, transfer_syntax: str) -> dict[str, str] | None:
    """The :data:`WANTED` attributes present in ``data`` (values stripped of padding).

    Returns ``None`` when the encoding is not one this walker reads; raises
    :class:`HeaderError` when the structure is broken (a length past the end).
    """
    if transfer_syntax in _NOT_READ:
        return None
    view = memoryview(data)
    out: dict[str, str] = {}
    try:
        _walk(view, 0, len(view), transfer_syntax != IMPLICIT_LE, out, top=True)
    except _Unsupported:
        return None
    except struct.error as exc:
        raise HeaderError(f"dataset ends inside an element header: {exc}") from exc
    return out


def element_at(view: memoryview, pos: int, explicit: bool) -> tuple[int, bytes, int, int]:
    """``(tag, vr, length, value_offset)`` of the element starting at ``pos``."""
    group, elem = _TAG.unpack_from(view, pos)
    tag = group << 16 | elem
    if group == 0xFFFE:  # item and delimiters: no VR in any transfer syntax
        return tag, b"", _U32.unpack_from(view, pos + 4)[0], pos + 8
    if not explicit:
        return tag, b"", _U32.unpack_from(view, pos + 4)[0], pos + 8
    vr = bytes(view[pos + 4:pos + 6])
    if vr in _LONG_VRS:
        return tag, vr, _U32.unpack_from(view, pos + 8)[0], pos + 12
    return tag, vr, _U16.unpack_from(view, pos + 6)[0], pos + 8


def _walk(view: memoryview, pos: int, end: int, explicit: bool, out: dict[str, str], *, top: bool) -> int:
    """Walk elements from ``pos``; return the offset after the item/sequence delimiter (or ``end``)."""
    while pos + 8 <= end:
        tag, vr, length, value = element_at(view, pos, explicit)
        if tag in (_ITEM_END, _SEQ_END):
            return value
        if top and tag > _LAST:
            return pos
        if length == _UNDEFINED:
            if vr not in (b"SQ", b"") or tag == 0x7FE00010:
                raise _Unsupported  # UN of undefined length, encapsulated pixel data
            pos = _skip_sequence(view, value, end, explicit)
            continue
        if value + length > end:
            raise HeaderError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end of the dataset")
        if top and tag in WANTED:
            text = bytes(view[value:value + length]).decode("latin-1").rstrip("\x00 ")
            out[WANTED[tag]] = text.lstrip(" ") if tag == 0x00080060 else text  # CS: leading spaces too
        pos = value + length
    if not top:
        raise HeaderError("sequence or item without its delimiter")
    return pos


def _skip_sequence(view: memoryview, pos: int, end: int, explicit: bool) -> int:
    """Skip the items of an undefined-length sequence; return the offset after its delimiter."""
    while pos + 8 <= end:
        tag, _, length, value = element_at(view, pos, explicit)
        if tag == _SEQ_END:
            return value
        if tag != _ITEM:
            raise HeaderError(f"expected an item in a sequence, found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
        if length == _UNDEFINED:
            pos = _walk(view, value, end, explicit, {}, top=False)
        elif value + length > end:
            raise HeaderError("sequence item runs past the end of the dataset")
        else:
            pos = value + length
    raise HeaderError("sequence without its delimiter")
