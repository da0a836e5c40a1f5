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


@dataclass(frozen=True, slots=True)
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


def walk(
    fp: BinaryIO, *, start: int, implicit: bool, size: int, stop: Callable[[int], bool]
) -> tuple[list[Element], int]:
    """The top-level elements from `start` up to the first whose tag `stop` accepts (or the end
    of the file), and where that one starts. Raises Unsupported on anything it cannot follow:
    a truncated element, tags out of order, an item outside a sequence, an unknown VR."""
    fp.seek(start)
    out: list[Element] = []
    last = -1
    pos = start
    while pos < size:
        raw = fp.read(8)
        if len(raw) == 8:
            group, element = _TAG.unpack_from(raw)
            if stop(group << 16 | element):
                return out, pos  # before its VR is read: the data set after the file meta may be implicit
        tag, vr, length = _header(fp, implicit, raw)
        if tag <= last or tag >> 16 == 0xFFFE:
            raise Unsupported(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) out of place")
        if length == UNDEFINED and vr == b"UN":
            raise Unsupported("UN of undefined length")
        value = fp.tell()
        _skip(fp, length, implicit=implicit, size=size)
        end = fp.tell()
        out.append(Element(tag, vr, pos, end, value - pos))
        last, pos = tag, end
    return out, pos


def _header(fp: BinaryIO, implicit: bool, raw: bytes = b"") -> tuple[int, bytes, int]:
    raw = raw or fp.read(8)
    if len(raw) < 8:
        raise Unsupported("truncated element header")
    group, element, word = _HEAD.unpack(raw)
    tag = group << 16 | element
    if implicit or group == 0xFFFE:  # items and delimiters: tag and 4-byte length in any encoding
        return tag, b"", word
    vr = raw[4:6]
    if vr in _LONG_VRS:
        more = fp.read(4)
        if len(more) < 4:
            raise Unsupported("truncated element header")
        return tag, vr, _LENGTH.unpack(more)[0]
    if not (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B):
        raise Unsupported("not a VR")
    return tag, vr, word >> 16


def _skip(fp: BinaryIO, length: int, *, implicit: bool, size: int) -> None:
    """Past a value: its length, or for undefined length its items up to the sequence delimiter.
    pydicom parses a sequence of undefined length and re-encodes it when it writes; what that
    would not give back byte for byte is refused here (Unsupported: the caller's whole-file path
    keeps pydicom's behaviour): a UN of undefined length (written back as SQ) and a retired group
    length in an item (dropped)."""
    if length != UNDEFINED:
        if fp.seek(length, 1) > size:
            raise Unsupported("truncated value")
        return
    while True:
        tag, _, length = _header(fp, implicit)
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM:
            raise Unsupported("not an item in a sequence of undefined length")
        end = None if length == UNDEFINED else fp.tell() + length
        while end is None or fp.tell() < end:
            tag, vr, length = _header(fp, implicit)
            if tag == _ITEM_END and end is None:
                break
            if tag & 0xFFFF == 0 and tag >> 16 > 6:
                raise Unsupported("group length in a sequence item")
            if length == UNDEFINED and vr == b"UN":
                raise Unsupported("UN of undefined length")
            _skip(fp, length, implicit=implicit, size=size)
        if end is not None and fp.tell() != end:
            raise Unsupported("item length does not match its elements")
