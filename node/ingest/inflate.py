"""Deflated datasets (PS3.5 A.5), read without inflating them whole.

A deflated dataset's header is read from an inflated prefix (64 KiB,
doubled up to 16 MiB while the wanted UIDs are not all there); the rest is
inflated a chunk at a time only to be counted, and refused past the node's
``limits.max_instance_bytes`` — a 255 KiB "bomb" that would inflate to
256 MiB costs one chunk of memory and stops at the limit.
"""

from __future__ import annotations

import zlib

from segnode.node.ingest.header import HeaderError, read_header


class InflatesTooLarge(Exception):
    """A deflated dataset inflates past ``limits.max_instance_bytes``."""


DEFLATED = "1.2.840.10008.1.2.1.99"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
#: the inflated prefix searched for the header starts at this size and doubles up to the maximum
_HEADER_WINDOW, _HEADER_MAX = 64 << 10, 16 << 20
_INFLATE_CHUNK = 1 << 20


class _Inflater:
    """Raw deflate (PS3.5 A.5: no zlib header), inflated a bounded piece at a time."""

    def __init__(self, data: memoryview) -> None:
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._input: bytes | memoryview = data
        self.done = False  # the input is used up and nothing is left to inflate
        self.inflated = 0

    def read(self, size: int) -> bytes:
        """Up to ``size`` more inflated bytes."""
        out = self._z.decompress(self._input, size)
        self._input = self._z.unconsumed_tail
        self.inflated += len(out)
        self.done = self._z.eof or (not self._input and len(out) < size)
        return out

    @property
    def complete(self) -> bool:
        return self._z.eof


def inflated_header(dataset: memoryview, limit: int) -> dict[str, str]:
    """The header of a deflated dataset from a bounded inflated prefix; the rest is only counted.

    Raises :class:`InflatesTooLarge` past ``limit`` inflated bytes (at most
    ``limit`` plus one chunk is ever inflated, and never held), ``HeaderError``
    or ``zlib.error`` when it does not decode.
    """
    inflater = _Inflater(dataset)
    head = bytearray(inflater.read(_HEADER_WINDOW))
    while True:
        try:
            values = read_header(head, _EXPLICIT_LE) or {}
        except HeaderError:
            if inflater.done or len(head) >= _HEADER_MAX:
                raise
            values = {}
        if "SeriesInstanceUID" in values or inflater.done or len(head) >= _HEADER_MAX:
            break  # the last attribute wanted, or all there is
        head += inflater.read(len(head))
    del head
    while not inflater.done and inflater.inflated <= limit:
        inflater.read(_INFLATE_CHUNK)
    if inflater.inflated > limit:
        raise InflatesTooLarge
    if not inflater.complete:
        raise HeaderError("deflated dataset ends before its deflate stream does")
    return values
