"""How an instance's stored DICOM JSON metadata is packed in its index row.

The metadata is most of the index (3.4 KB of a 5.3 KB instance row for a small CT slice): every
attribute name is a quoted tag, every value a {"vr": ..., "Value": [...]} object, UIDs share
their roots. Deflate packs it to about a third. A packed value starts with a format byte; a
value that starts with "{" is JSON as stored before packing (index rows written by earlier
versions are read as they are, never rewritten).

Measured on the archive benchmark's CT instances (3,451 bytes of JSON each): deflate level 6
gives 1,169 bytes; a preset dictionary of the 60 most common tags with their VRs gave 1,118
(4% smaller) but took 65% longer to unpack (the dictionary is loaded for every value), and
metadata reads unpack every instance of a study: not worth it.
"""

from __future__ import annotations

import zlib

# Format bytes. Never reuse one: rows keep the format they were written in.
_DEFLATE = 0x01
_JSON = ord("{")
_LEVEL = 6
_WBITS = -15  # raw deflate: no zlib header or checksum (SQLite pages have their own integrity)


# deflate's memory level for an instance's metadata of up to _SMALL bytes (nearly all of them).
# Setting up a compressor clears its hash table, 2^(level+8) bytes: at the default (8) that took
# ~60% of packing a small CT instance's 3 KB; at 5 packing took ~35% less time and the packed
# bytes were as small (809 of 3,022 bytes either way, the archive benchmark's CT instances).
# Larger metadata (an enhanced multi-frame's) keeps the default: its longer input fills a larger
# table. Unpacking is the same for both.
_SMALL = 16384
_SMALL_MEM_LEVEL = 5


def pack_metadata(metadata: bytes) -> bytes:
    """The bytes stored for one instance's DICOM JSON metadata."""
    mem_level = _SMALL_MEM_LEVEL if len(metadata) <= _SMALL else zlib.DEF_MEM_LEVEL
    co = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, mem_level)
    return bytes((_DEFLATE,)) + co.compress(metadata) + co.flush()


def unpack_metadata(stored: bytes | memoryview) -> bytes:
    """The DICOM JSON a stored value holds, whichever format it was written in."""
    data = bytes(stored)
    if not data or data[0] == _JSON:
        return data
    if data[0] == _DEFLATE:
        return zlib.decompress(memoryview(data)[1:], _WBITS)
    raise ValueError(f"unknown metadata format {data[0]:#04x}")
