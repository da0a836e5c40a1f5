"""The index's layout of object keys in the store.

An instance's object is stored under its content address, `dcm/<first two hex digits>/<sha256>.dcm`
(75 bytes in every index row). Releases before this one stored it under
`studies/<study>/series/<series>/instances/<sop>/<sha256>.dcm` (about 290 bytes): those keys
stay valid (rows are never rewritten) and every reader takes the key from the row as it is, so
nodes of either version read objects of both. Two different objects claiming one SOP Instance
UID still never overwrite each other (different bytes, different key); two copies of the same
bytes are one object, which is also what a re-sent instance was before.
"""

from __future__ import annotations

from broker.dicom.uids import require_uid

INSTANCE_PREFIX = "dcm/"
LEGACY_INSTANCE_PREFIX = "studies/"  # written by earlier releases; still read, listed and reaped
CONFLICT_PREFIX = "conflicts/"
# Where instance objects (named by instance.object_key) can be.
INSTANCE_PREFIXES = (INSTANCE_PREFIX, LEGACY_INSTANCE_PREFIX)


_HEX = frozenset("0123456789abcdef")


def _require_sha256(sha256: str) -> str:
    # A set test rather than a look at each character in Python: ingest names each object's key
    # several times per instance.
    if len(sha256) != 64 or not _HEX.issuperset(sha256):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    return sha256


def instance_key(sha256: str) -> str:
    """Content-addressed, fanned out over 256 folders so no local directory grows huge."""
    _require_sha256(sha256)
    return f"{INSTANCE_PREFIX}{sha256[:2]}/{sha256}.dcm"


def conflict_key(sop_uid: str, sha256: str) -> str:
    return f"{CONFLICT_PREFIX}{require_uid(sop_uid, 'SOPInstanceUID')}/{_require_sha256(sha256)}.dcm"
