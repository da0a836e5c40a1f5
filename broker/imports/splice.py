"""Where each top-level element of a little-endian DICOM data set lies in a file, from the
element headers alone (tag, VR, length: no value is read or decoded).

The import's coercion changes a dozen top-level attributes of a header of a hundred or more;
parsing and re-encoding all of them with pydicom cost most of its time (profiled: the writer
~55 %, the reader ~15 %), on elements written back exactly as they were read. With their
offsets, `reconcile.coerce_file` hands pydicom only the few elements it may change and copies
the others as the source's own bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

# Explicit VR encodings with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
_HEAD = struct.Struct("<HHL")
_LENGTH = struct.Struct("<L")
_TAG = struct.Struct("<HH")


class Unsupported(Exception):
    """An encoding this walk does not follow (the caller parses the file with pydicom instead)."""


@dataclass(slots=True)  # not frozen: a frozen dataclass is slower to create, and one is made per element
class Element:
    tag: int
    vr: bytes  # b"" in implicit VR
    start: int  # offset of the element's tag
    end: int  # offset just past its value (a sequence's delimiter included)
    header: int  # bytes of tag, VR and length before the value


def looks_explicit(first: bytes) -> bool:
    """Whether a data set whose first element starts with `first` (6 bytes) is explicit VR:
    the test pydicom applies, two upper-case letters where a VR would be."""
    return len(first) >= 6 and 0x40 < first[4] < 0x5B and 0x40 < first[5] < 0x5B


class Window:
    """A seekable file read ahead a block at a time: a walk of its element headers costs a
    slice of bytes per element, not a read and a seek (the walk was most of a splice's time)."""

    BLOCK = 1 << 16

    def __init__(self, fp: BinaryIO, size: int) -> None:
        self.fp, self.size = fp, size
        self._base, self._data = 0, b""

    def at(self, pos: int, n: int) -> tuple[bytes, int]:
        """A buffer holding the `n` bytes from `pos` (fewer at the end of the file), and where
        they start in it."""
        off = pos - self._base
        if off < 0 or off + n > len(self._data):
            self.fp.seek(pos)
            self._base, self._data, off = pos, self.fp.read(max(n, self.BLOCK)), 0
        return self._data, off

    def read(self, start: int, end: int) -> bytes:
        data, off = self.at(start, end - start)
        return data[off : off + end - start]

    def holds(self, start: int, end: int) -> bool:
        """Whether [start, end) is in memory now (no read needed)."""
        return self._base <= start and end <= self._base + len(self._data)


def walk(
    win: Window, *, start: int, implicit: bool, stop: Callable[[int], bool]
) -> tuple[list[Element], int]:
    """The top-level elements from `start` up to the first whose tag `stop` accepts (or the end
    of the file), and where that one starts. Raises Unsupported on anything it cannot follow:
    a truncated element, tags out of order, an item outside a sequence, an unknown VR."""
    out: list[Element] = []
    last = -1
    pos = start
    size = win.size
    data, off = win.at(pos, 12)
    base = pos - off  # the file offset of data[0]
    # `_header` inlined: this loop runs once per top-level element of every file imported.
    while pos < size:
        off = pos - base
        if off + 12 > len(data):
            data, off = win.at(pos, 12)
            base = pos - off
        if len(data) - off < 8:
            raise Unsupported("truncated element header")
        group, element, word = _HEAD.unpack_from(data, off)
        tag = group << 16 | element
        if stop(tag):
            return out, pos  # before its VR is read: the data set after the file meta may be implicit
        if tag <= last or group == 0xFFFE:
            raise Unsupported(f"element ({group:04X},{element:04X}) out of place")
        if implicit:
            vr, length, value = b"", word, pos + 8
        else:
            vr = data[off + 4 : off + 6]
            if vr in _LONG_VRS:
                if len(data) - off < 12:
                    raise Unsupported("truncated element header")
                length, value = _LENGTH.unpack_from(data, off + 8)[0], pos + 12
            elif 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B:
                length, value = word >> 16, pos + 8
            else:
                raise Unsupported("not a VR")
        if length == UNDEFINED:
            if vr == b"UN":
                raise Unsupported("UN of undefined length")
            end = _skip(win, value, length, implicit=implicit)
        else:
            end = value + length
            if end > size:
                raise Unsupported("truncated value")
        out.append(Element(tag, vr, pos, end, value - pos))
        last, pos = tag, end
    return out, pos


def _header(win: Window, pos: int, implicit: bool) -> tuple[int, bytes, int, int]:
    """(tag, VR, length, where the value starts) of the element header at `pos`."""
    data, off = win.at(pos, 12)
    if len(data) - off < 8:
        raise Unsupported("truncated element header")
    group, element, word = _HEAD.unpack_from(data, off)
    tag = group << 16 | element
    if implicit or group == 0xFFFE:  # items and delimiters: tag and 4-byte length in any encoding
        return tag, b"", word, pos + 8
    vr = data[off + 4 : off + 6]
    if vr in _LONG_VRS:
        if len(data) - off < 12:
            raise Unsupported("truncated element header")
        return tag, vr, _LENGTH.unpack_from(data, off + 8)[0], pos + 12
    if not (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B):
        raise Unsupported("not a VR")
    return tag, vr, word >> 16, pos + 8


def _skip(win: Window, pos: int, length: int, *, implicit: bool) -> int:
    """Where a value starting at `pos` ends: after its length, or for undefined length after its
    items up to the sequence delimiter. pydicom parses a sequence of undefined length and
    re-encodes it when it writes; what that would not give back byte for byte is refused here
    (Unsupported: the caller's whole-file path keeps pydicom's behaviour): a UN of undefined
    length (written back as SQ) and a retired group length in an item (dropped)."""
    if length != UNDEFINED:
        if pos + length > win.size:
            raise Unsupported("truncated value")
        return pos + length
    while True:
        tag, _, length, pos = _header(win, pos, implicit)
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise Unsupported("not an item in a sequence of undefined length")
        end = None if length == UNDEFINED else pos + length
        while end is None or pos < end:
            tag, vr, length, pos = _header(win, pos, implicit)
            if tag == _ITEM_END and end is None:
                break
            if tag & 0xFFFF == 0 and tag >> 16 > 6:
                raise Unsupported("group length in a sequence item")
            if length == UNDEFINED and vr == b"UN":
                raise Unsupported("UN of undefined length")
            pos = _skip(win, pos, length, implicit=implicit)
        if end is not None and pos != end:
            raise Unsupported("item length does not match its elements")
