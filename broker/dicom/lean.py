"""A lean reader for the common Part 10 file: explicit VR little endian, every value of defined
length (encapsulated Pixel Data and sequences aside), its tags in order, nothing after the last.

Ingest parses every received instance once, and `dcmread` (building a Dataset of
RawDataElements, the file meta as a second dataset, converting the values the parser asks for)
was a third of a parse worker's CPU per small instance. This walks the bytes already in memory
once and keeps, per top-level element, its tag, VR and where its value is (an undefined-length
sequence is read by pydicom's `read_sequence`, as dcmread does: its end is known no other way);
the DICOM JSON (`json_model.lean_instance_json`) is built from that. Anything else (implicit VR,
big endian, deflate, other undefined-length values, elements out of order, a file that ends
early or has bytes after its last element, a VR pydicom would guess at) is not read here: the
caller parses it with pydicom as before, so what is stored for an unusual file cannot change.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from pydicom.charset import convert_encodings, default_encoding
from pydicom.filereader import read_sequence
from pydicom.sequence import Sequence
from pydicom.valuerep import EXPLICIT_VR_LENGTH_16, EXPLICIT_VR_LENGTH_32
from pydicom.values import convert_string

# Explicit VR little endian and the encapsulated syntaxes (whose data sets are explicit VR
# little endian too); not deflate, which compresses the data set.
EXPLICIT_LE = "1.2.840.10008.1.2.1"
_ENCAPSULATED_PREFIX = "1.2.840.10008.1.2.4."
_RLE = "1.2.840.10008.1.2.5"
UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
# What the first read takes: the whole of a small instance, and the header of a CT slice
# (whose Pixel Data is skipped, never read).
FIRST_READ = 1 << 16
# The most a walk that needs more than the first read may hold in memory: an encapsulated
# multi-frame image of hundreds of MB is left to pydicom, which seeks past its frames.
WHOLE_READ = 4 << 20

_SHORT = {str(vr).encode(): str(vr) for vr in EXPLICIT_VR_LENGTH_16}
_LONG = {str(vr).encode(): str(vr) for vr in EXPLICIT_VR_LENGTH_32}
_HEAD = struct.Struct("<HH2sH").unpack_from
_U32 = struct.Struct("<L").unpack_from
_ITEM = struct.Struct("<HHL").unpack_from
_SKIPPABLE = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
# Above this a value is never needed here (json_model.BULK_THRESHOLD, pydicom's defer size).
_NEEDED_UP_TO = 1024


class NeedMore(Exception):
    """The walk needs bytes past what was read: read the whole file and walk again."""


@dataclass(slots=True)
class Lean:
    transfer_syntax_uid: str
    buf: bytes
    # (tag, VR, value offset in buf, value length) of each top-level element, in file order.
    elements: list[tuple[int, str, int, int]]
    # The undefined-length sequences, read as dcmread reads them (their end is known no other way).
    sequences: dict[int, Sequence]


def _ts_of(value: bytes) -> str | None:
    try:
        ts = value.decode("ascii").rstrip("\0 ")
    except UnicodeDecodeError:
        return None
    if ts in (EXPLICIT_LE, _RLE) or ts.startswith(_ENCAPSULATED_PREFIX):
        return ts
    return None


def _items_end(buf: bytes, pos: int) -> int | None:
    """Where encapsulated Pixel Data starting at `pos` ends (after its Sequence Delimitation
    Item), walking its items as pydicom does first; None if it is not a clean item list."""
    n = len(buf)
    while True:
        if pos + 8 > n:
            raise NeedMore
        group, elem, length = _ITEM(buf, pos)
        if group != 0xFFFE:
            return None
        if elem == 0xE0DD:
            return pos + 8 if length == 0 else None
        if elem != 0xE000 or length == UNDEFINED:
            return None
        pos += 8 + length


def read_lean(buf: bytes, size: int) -> Lean | None:
    """The top-level elements of the Part 10 file whose first `len(buf)` bytes are `buf` and
    whose size is `size`; None when the file is not the common case this reader handles.
    Raises NeedMore when a value it needs lies past `buf`."""
    n = len(buf)
    if n < 132 or buf[128:132] != b"DICM":
        return None
    pos = 132
    ts: str | None = None
    # File meta (group 2, always explicit VR little endian).
    while True:
        if pos + 8 > n:
            if n < size:
                raise NeedMore
            return None
        group, elem, vr, length = _HEAD(buf, pos)
        if group != 2:
            break
        if vr in _SHORT:
            start = pos + 8
        elif vr in _LONG:
            if pos + 12 > n:
                raise NeedMore
            length = _U32(buf, pos + 8)[0]
            start = pos + 12
            if length == UNDEFINED:
                return None
        else:
            return None
        if start + length > n:
            if start + length > size:
                return None
            raise NeedMore
        if elem == 0x0010:
            if vr != b"UI":
                return None
            ts = _ts_of(buf[start : start + length])
        pos = start + length
    if ts is None:
        return None
    elements: list[tuple[int, str, int, int]] = []
    sequences: dict[int, Sequence] = {}
    append = elements.append
    prev = 0x0002FFFF
    short, long_ = _SHORT, _LONG
    while pos < size:
        if pos + 8 > n:
            if pos + 8 > size:
                return None
            raise NeedMore
        group, elem, vr, length = _HEAD(buf, pos)
        tag = group << 16 | elem
        # In order, and no group 2 or item tags among the data set's own (pydicom treats those
        # specially).
        if tag <= prev or group == 0xFFFE:
            return None
        prev = tag
        name = short.get(vr)
        if name is not None:
            start = pos + 8
        else:
            name = long_.get(vr)
            if name is None:
                return None
            if pos + 12 > n:
                if pos + 12 > size:
                    return None
                raise NeedMore
            length = _U32(buf, pos + 8)[0]
            start = pos + 12
            if length == UNDEFINED:
                if name == "SQ":
                    if n < size:
                        raise NeedMore
                    # Its end is only known by reading its items: pydicom's own read_sequence,
                    # as dcmread's generator does it (with the character set read so far).
                    fp = io.BytesIO(buf)
                    fp.seek(start)
                    sequences[tag] = read_sequence(fp, False, True, UNDEFINED, _encoding(buf, elements))
                    append((tag, name, start, UNDEFINED))
                    pos = fp.tell()
                    continue
                if tag != PIXEL_DATA or (name != "OB" and name != "OW"):
                    return None
                end = _items_end(buf, start)
                # pydicom's fallback scan would stop at the first delimiter pattern; a clean
                # item list has none before its own.
                if end is None or buf.find(b"\xfe\xff\xdd\xe0", start) != end - 8:
                    return None
                append((tag, name, start, UNDEFINED))
                pos = end
                continue
        end = start + length
        if end > n:
            if end > size:
                return None  # truncated: pydicom's path says so
            if length <= _NEEDED_UP_TO or name not in _SKIPPABLE:
                raise NeedMore
        append((tag, name, start, length))
        pos = end
    if pos != size or not elements:
        return None
    return Lean(ts, buf, elements, sequences)


def _encoding(buf: bytes, elements: list[tuple[int, str, int, int]]) -> str | list[str]:
    """The character set dcmread's generator would hold at this point of the walk."""
    for tag, _vr, start, length in elements:
        if tag == 0x00080005:
            return convert_encodings(convert_string(buf[start : start + length], True))
    return default_encoding
