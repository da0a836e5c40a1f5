"""DICOM UIDs (PS3.5 9.1): digits and dots, no leading zero in a component, at most 64 chars.

Anything that becomes part of a storage key or a URL passes through `require_uid` first, so a
path-like or hostile string can never reach a path or a key.
"""

from __future__ import annotations

import re

from broker.errors import InvalidUID

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.match(value) is not None


def require_uid(value: object, what: str = "UID") -> str:
    if not is_valid_uid(value):
        shown = repr(value)[:80] if isinstance(value, str) else type(value).__name__
        raise InvalidUID(f"{what} is not a valid DICOM UID: {shown}")
    return value  # type: ignore[return-value]
