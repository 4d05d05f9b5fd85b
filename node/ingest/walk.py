"""A bounded structural walk of a received dataset: can it be read to its end?

The store path (:mod:`segnode.node.ingest.store`) runs :func:`walk_dataset` on
every instance before anything is written, so that a dataset cut short in
transit (in its Pixel Data, in an element header, inside a sequence) is
refused with ``0xC210`` and its reason instead of acknowledged and failed
later by the job.  The walk reads element headers only, and checks:

- every element header is whole and every defined length lies inside the data
  (and inside its item, for an element of a defined-length item);
- sequences and items, of defined and undefined length, are closed (their
  delimiters present) and nested at most :data:`MAX_DEPTH` deep; at most
  :data:`MAX_ELEMENTS` element headers in all;
- native Pixel Data (7FE0,0010) holds Rows × Columns × SamplesPerPixel ×
  NumberOfFrames × BitsAllocated / 8 bytes (bits packed for BitsAllocated 1,
  rounded up to even), read from the attributes of the dataset (or item) that
  holds it; more is trailing padding, which readers drop, and is let through
  (pydicom's MR_small_padded.dcm); it is native under a native transfer
  syntax and encapsulated under any other;
- encapsulated Pixel Data is a Basic Offset Table item (a multiple of 4
  bytes), one or more whole fragment items, then the sequence delimiter;
- the dataset of an image storage class (or a segmentation) has Pixel Data
  (cut exactly between two elements, it would otherwise be well formed).

It reads little and big endian, explicit and implicit VR (an undefined-length
UN element's items as implicit VR little endian, PS3.5 6.2.2); a deflated
dataset (PS3.5 A.5) is walked as it inflates, a chunk at a time and never held
whole, and no further than the node's instance limit (as
:mod:`segnode.node.ingest.inflate` counts it).  :func:`walk_dataset` returns
``None`` or a reason of at most 64 characters (the C-STORE Error Comment); it
never raises, allocates nothing in proportion to a declared length (it keeps
an element header, a value of a few bytes, or one inflated chunk) and reads
each byte once.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Protocol

from pydicom.uid import UID

#: how deep sequences may nest (a sequence in an item of a sequence: 2).
MAX_DEPTH = 32
#: how many element headers (items and delimiters included) a dataset may have: what bounds the
#: walk's time (~1 µs each) when a dataset is a long run of tiny elements; a 2,000-frame enhanced
#: CT with per-frame functional groups has ~100,000.
MAX_ELEMENTS = 2_000_000
DEFLATED = "1.2.840.10008.1.2.1.99"
_IMPLICIT_LE, _EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
#: transfer syntaxes whose Pixel Data is native; every other one encapsulates it.
_NATIVE = frozenset({_IMPLICIT_LE, "1.2.840.10008.1.2.1", _EXPLICIT_BE, DEFLATED})
#: explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
_ROWS, _COLUMNS, _SAMPLES, _FRAMES, _BITS = 0x00280010, 0x00280011, 0x00280002, 0x00280008, 0x00280100
_IMAGE_TAGS = frozenset({_ROWS, _COLUMNS, _SAMPLES, _FRAMES, _BITS})
_SMALL = 16  # the longest image attribute value read (NumberOfFrames is an IS of at most 12)
_INFLATE_CHUNK = 1 << 20
#: Segmentation and Label Map Segmentation Storage: Pixel Data required, "Image" not in their names
_SEGMENTATION = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})


class _Fault(Exception):
    """Why the dataset cannot be read (the reason answered)."""


@dataclass(frozen=True)
class _Syntax:
    """How element headers are encoded: ``head`` is tag and VR and short length, or tag and length."""

    explicit: bool
    head: struct.Struct
    u16: struct.Struct
    u32: struct.Struct


_LE = _Syntax(True, struct.Struct("<HH2sH"), struct.Struct("<H"), struct.Struct("<L"))
_BE = _Syntax(True, struct.Struct(">HH2sH"), struct.Struct(">H"), struct.Struct(">L"))
_IMPLICIT = _Syntax(False, struct.Struct("<HHL"), _LE.u16, _LE.u32)


def walk_dataset(dataset: memoryview | bytes, transfer_syntax: str, sop_class_uid: str, *,
                 inflate_limit: int) -> str | None:
    """``None`` if ``dataset`` is whole and well formed, else the reason (≤ 64 characters)."""
    view = memoryview(dataset).cast("B")
    cursor: _Cursor = _Inflating(view, inflate_limit) if transfer_syntax == DEFLATED else _View(view)
    syntax = _BE if transfer_syntax == _EXPLICIT_BE else _IMPLICIT if transfer_syntax == _IMPLICIT_LE else _LE
    try:
        pixels = _Walk(cursor, encapsulated=transfer_syntax not in _NATIVE).dataset(syntax, 0, None, delimited=False)
        if not cursor.complete():
            return "deflate stream cut short"
    except _Fault as fault:
        return str(fault)[:64]
    except zlib.error:
        return "deflate stream does not decode"
    if not pixels and needs_pixel_data(sop_class_uid):
        return "no Pixel Data in an image instance"
    return None


def needs_pixel_data(sop_class_uid: str) -> bool:
    """Whether instances of this storage class carry Pixel Data: the "… Image Storage" classes and SEG."""
    return sop_class_uid in _SEGMENTATION or "Image Storage" in UID(sop_class_uid).name


class _Cursor(Protocol):
    """The dataset's bytes, read forward once: ``buf[i:size]`` is at hand, ``base + i`` bytes are read."""

    buf: memoryview | bytes
    i: int
    size: int
    base: int

    def fill(self, n: int) -> bool:
        """Make ``n`` bytes at hand from ``i`` (``i`` and ``base`` may move); ``False`` if fewer are left."""

    def skip(self, n: int) -> bool:
        """Pass ``n`` bytes; ``False`` if the data end first."""

    def at_end(self) -> bool:
        """Nothing is left."""

    def complete(self) -> bool:
        """The encoding ended where it should (a deflate stream: its final block was read)."""


class _View:
    """A dataset held in memory: all of it at hand."""

    def __init__(self, data: memoryview) -> None:
        self.buf: memoryview | bytes = data
        self.i, self.size, self.base = 0, len(data), 0

    def fill(self, n: int) -> bool:
        return self.i + n <= self.size

    def skip(self, n: int) -> bool:
        self.i += n
        return self.i <= self.size

    def at_end(self) -> bool:
        return self.i >= self.size

    def complete(self) -> bool:
        return True


class _Inflating:
    """A deflated dataset (raw deflate, PS3.5 A.5), inflated a chunk at a time as it is read."""

    def __init__(self, data: memoryview, limit: int) -> None:
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._input: memoryview | bytes = data
        self._limit, self._inflated = limit, 0
        self.buf: memoryview | bytes = b""
        self.i, self.size, self.base = 0, 0, 0

    def _more(self) -> bool:
        """Inflate the next chunk behind what is left at hand; ``False`` when nothing more comes."""
        while not self._z.eof:
            out = self._z.decompress(self._input, _INFLATE_CHUNK)
            self._input = self._z.unconsumed_tail
            if out:
                self._inflated += len(out)
                if self._inflated > self._limit:
                    raise _Fault("inflated dataset larger than the node accepts")
                self.buf, self.base = bytes(self.buf[self.i:]) + out, self.base + self.i
                self.i, self.size = 0, len(self.buf)
                return True
            if not self._input:
                break
        return False

    def fill(self, n: int) -> bool:
        while self.size - self.i < n:
            if not self._more():
                return False
        return True

    def skip(self, n: int) -> bool:
        while self.size - self.i < n:
            n -= self.size - self.i
            self.buf, self.base, self.i, self.size = b"", self.base + self.size, 0, 0
            if not self._more():
                return False
        self.i += n
        return True

    def at_end(self) -> bool:
        return self.i >= self.size and not self._more()

    def complete(self) -> bool:
        return self._z.eof


def _name(tag: int) -> str:
    return "Pixel Data" if tag == PIXEL_DATA else f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walk:
    """One walk over a cursor: datasets, sequences and their items, Pixel Data."""

    def __init__(self, cursor: _Cursor, *, encapsulated: bool) -> None:
        self.cur = cursor
        self.encapsulated = encapsulated  # the transfer syntax encapsulates the top-level Pixel Data
        self.left = MAX_ELEMENTS  # element headers still allowed

    def dataset(self, syntax: _Syntax, depth: int, end: int | None, *, delimited: bool) -> bool:
        """Walk a dataset (the top one, or an item's) to its end; whether it held Pixel Data.

        ``end``: where a defined-length item ends (``None``: where the data
        end); ``delimited``: it ends with an item delimiter instead.
        """
        image: dict[int, bytes | None] = {}  # Rows, Columns, …: read as they pass, judged by the Pixel Data
        pixels = False
        cur = self.cur
        while not self._ended(end, delimited, "item"):
            tag, vr, length = self.element(syntax)
            if (end is None and tag < PIXEL_DATA and tag not in _IMAGE_TAGS and vr != b"SQ"
                    and length != _UNDEFINED and cur.i + length <= cur.size):
                cur.i += length  # most elements: a plain value at hand, passed
            elif tag == PIXEL_DATA:
                self.pixel_data(syntax, depth, end, length, image)
                pixels = True
            elif length == _UNDEFINED:
                if tag == _ITEM_END and delimited:
                    return pixels
                self.sequence(_IMPLICIT if vr == b"UN" else syntax, depth + 1, end, delimited=True, tag=tag, vr=vr)
            elif tag >> 16 == 0xFFFE:
                if tag == _ITEM_END and delimited:
                    return pixels
                raise _Fault(f"{_name(tag)} outside a sequence")
            elif vr == b"SQ":
                self.sequence(syntax, depth + 1, self._inside(end, length, tag), delimited=False, tag=tag, vr=vr)
            elif tag in _IMAGE_TAGS:
                image[tag] = self._value(end, length, tag)
            else:
                self.skip(end, length, tag)
        return pixels

    def sequence(self, syntax: _Syntax, depth: int, end: int | None, *, delimited: bool, tag: int, vr: bytes) -> None:
        """Walk a sequence's items to its end (``delimited``: to its sequence delimiter)."""
        if vr not in (b"SQ", b"UN", b"") or tag >> 16 == 0xFFFE:
            raise _Fault(f"{_name(tag)} of undefined length is not a sequence")
        if depth > MAX_DEPTH:
            raise _Fault(f"sequences nested deeper than {MAX_DEPTH}")
        while not self._ended(end, delimited, "sequence"):
            item, _, length = self.element(syntax)
            if item == _SEQ_END and delimited:
                return
            if item != _ITEM:
                raise _Fault(f"{_name(tag)} holds {_name(item)}, not an item")
            if length == _UNDEFINED:
                self.dataset(syntax, depth, end, delimited=True)
            else:
                self.dataset(syntax, depth, self._inside(end, length, tag), delimited=False)

    def pixel_data(self, syntax: _Syntax, depth: int, end: int | None, length: int,
                   image: dict[int, bytes | None]) -> None:
        """Native Pixel Data of the size its dataset's attributes say, or whole encapsulated fragments."""
        encapsulated = length == _UNDEFINED
        if depth == 0 and encapsulated != self.encapsulated:
            raise _Fault("Pixel Data encapsulated under a native transfer syntax" if encapsulated
                         else "Pixel Data not encapsulated under its transfer syntax")
        if encapsulated:
            self.fragments(syntax, end)
            return
        expected = _native_size(image, syntax)
        if length < expected:  # more is trailing padding, which readers drop (pydicom: with a warning)
            raise _Fault(f"Pixel Data has {length} bytes, its attributes say {expected}")
        self.skip(end, length, PIXEL_DATA)

    def fragments(self, syntax: _Syntax, end: int | None) -> None:
        """A Basic Offset Table item, one or more whole fragment items, the sequence delimiter (PS3.5 A.4)."""
        count = -1  # the offset table first
        while not self._ended(end, True, "encapsulated Pixel Data"):
            tag, _, length = self.element(syntax)
            if tag == _SEQ_END and count >= 0:
                if count == 0:
                    raise _Fault("encapsulated Pixel Data without fragments")
                return
            if tag != _ITEM or length == _UNDEFINED:
                raise _Fault(f"encapsulated Pixel Data holds {_name(tag)}, not a fragment"
                             if count >= 0 else "encapsulated Pixel Data without its offset table")
            if count < 0 and length % 4:
                raise _Fault("basic offset table length not a multiple of 4")
            self.skip(end, length, PIXEL_DATA)
            count += 1

    def element(self, syntax: _Syntax) -> tuple[int, bytes, int]:
        """``(tag, vr, length)`` of the next element header (``vr`` empty for implicit VR and items)."""
        cur = self.cur
        if cur.size - cur.i < 12 and not cur.fill(12) and not cur.fill(8):
            raise _Fault("dataset ends inside an element header")
        self.left -= 1
        if not self.left:
            raise _Fault(f"more than {MAX_ELEMENTS} elements")
        buf, i = cur.buf, cur.i
        if not syntax.explicit:
            group, elem, length = syntax.head.unpack_from(buf, i)
            cur.i = i + 8
            return group << 16 | elem, b"", length
        group, elem, vr, length = syntax.head.unpack_from(buf, i)
        if group == 0xFFFE:  # items and delimiters: no VR in any transfer syntax
            cur.i = i + 8
            return group << 16 | elem, b"", syntax.u32.unpack_from(buf, i + 4)[0]
        if vr not in _LONG_VRS:
            cur.i = i + 8
            return group << 16 | elem, vr, length
        if cur.size - i < 12:
            raise _Fault("dataset ends inside an element header")
        cur.i = i + 12
        return group << 16 | elem, vr, syntax.u32.unpack_from(buf, i + 8)[0]

    def skip(self, end: int | None, length: int, tag: int) -> None:
        """Pass a value of defined ``length``: inside its item, and inside the data."""
        cur = self.cur
        if end is not None and cur.base + cur.i + length > end:
            raise _Fault(f"{_name(tag)} runs past the end of its item")
        if cur.i + length <= cur.size:
            cur.i += length
        elif not cur.skip(length):
            raise _Fault(f"{_name(tag)} runs past the end of the dataset")

    def _value(self, end: int | None, length: int, tag: int) -> bytes | None:
        """A short value (an image attribute's); ``None``, skipped, if it is longer than any valid one."""
        if length > _SMALL:
            self.skip(end, length, tag)
            return None
        self._inside(end, length, tag)
        cur = self.cur
        if not cur.fill(length):
            raise _Fault(f"{_name(tag)} runs past the end of the dataset")
        cur.i += length
        return bytes(cur.buf[cur.i - length:cur.i])

    def _inside(self, end: int | None, length: int, tag: int) -> int:
        """Where a value of ``length`` starting here ends; it must not pass its item's ``end``."""
        stop = self.cur.base + self.cur.i + length
        if end is not None and stop > end:
            raise _Fault(f"{_name(tag)} runs past the end of its item")
        return stop

    def _ended(self, end: int | None, delimited: bool, what: str) -> bool:
        """Whether a dataset, sequence or item reached its ``end`` (or the data theirs); wrong if ``delimited``."""
        cur = self.cur
        if end is not None and cur.base + cur.i >= end:
            pass
        elif cur.i < cur.size or not cur.at_end():
            return False
        elif end is not None:
            raise _Fault(f"dataset ends inside a defined-length {what}")
        if delimited:
            raise _Fault(f"{what} without its delimiter")
        return True


def _image_value(image: dict[int, bytes | None], tag: int, syntax: _Syntax, default: int | None = None) -> int:
    """Rows, Columns, SamplesPerPixel, BitsAllocated (one US) or NumberOfFrames (an IS) as a number."""
    if tag not in image:
        if default is None:
            raise _Fault("Pixel Data without Rows, Columns or BitsAllocated")
        return default
    raw = image[tag]
    if raw is None:
        raise _Fault(f"{_name(tag)} is too long")
    if tag == _FRAMES:
        text = raw.decode("latin-1").strip(" \x00")
        if not text.isdigit():
            raise _Fault("NumberOfFrames is not a number")
        return int(text)
    if len(raw) != 2:
        raise _Fault(f"{_name(tag)} is not one US value")
    return int(syntax.u16.unpack_from(raw)[0])


def _native_size(image: dict[int, bytes | None], syntax: _Syntax) -> int:
    """The bytes native Pixel Data must have, from its dataset's attributes: packed bits, rounded up to even."""
    bits = _image_value(image, _SAMPLES, syntax, 1) * _image_value(image, _FRAMES, syntax, 1)
    for tag in (_ROWS, _COLUMNS, _BITS):
        bits *= _image_value(image, tag, syntax)
    size = (bits + 7) // 8
    return size + (size & 1)
