"""How long an indexed value may be: the maximum length of its VR (PS3.5 Table 6.2-1).

The index (its rows, the per-level JSON QIDO-RS and C-FIND answer from) holds each value cut to
its VR's maximum, so a sender's 5,000,000-character PatientName costs the index 64 characters
per component group, not megabytes in every row and every matching answer. The stored object
keeps the whole value: WADO-RS returns the instance byte for byte.

Ingest (index/parse.py) and index sync (federation/sync.py) both derive their rows through
`bound_dataset`; the query engine cuts single-value match values by the same rule, so a value
longer than its VR allows still finds the object it came from.
"""

from __future__ import annotations

from typing import Any

# Characters per value (PS3.5 Table 6.2-1); PN is per component group (Alphabetic, Ideographic,
# Phonetic). UC, UR and UT have no limit below 2^32-2: the index keeps as much as an LT holds.
MAX_CHARS: dict[str, int] = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DA": 8,
    "DS": 16,
    "DT": 26,
    "IS": 12,
    "LO": 64,
    "LT": 10240,
    "PN": 64,
    "SH": 16,
    "ST": 1024,
    "TM": 14,
    "UC": 10240,
    "UI": 64,
    "UR": 10240,
    "UT": 10240,
}
# VM and sequence items are not bounded by the standard; the index copy keeps this many.
MAX_VALUES = 256
MAX_ITEMS = 64
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def bound_text(vr: str, text: str) -> str:
    """One string value cut to its VR's maximum length (PN: each `=`-separated group)."""
    limit = MAX_CHARS.get(vr)
    if limit is None or len(text) <= limit:
        return text
    if vr == "PN":
        return "=".join(group[:limit] for group in text.split("=")[:3])
    return text[:limit]


def _bound_value(vr: str, value: Any) -> Any:
    if isinstance(value, str):
        return bound_text(vr, value)
    if vr == "PN" and isinstance(value, dict):
        return {
            k: (v[: MAX_CHARS["PN"]] if isinstance(v, str) else v)
            for k, v in value.items()
            if k in _PN_GROUPS
        }
    if vr == "SQ" and isinstance(value, dict):
        return bound_dataset(value)
    return value


def bound_element(element: dict[str, Any]) -> dict[str, Any]:
    """A DICOM JSON element (PS3.18 F.2) with each value bounded; other members untouched."""
    values = element.get("Value")
    if not isinstance(values, list):
        return element
    vr = str(element.get("vr", ""))
    cap = MAX_ITEMS if vr == "SQ" else MAX_VALUES
    if len(values) <= cap:
        # Every instance's index attributes pass through here: a plain loop, not a generator
        # per element, for the common case of nothing to cut.
        limit = MAX_CHARS.get(vr, 1 << 62)
        for v in values:
            if (isinstance(v, str) and len(v) > limit) or isinstance(v, dict):
                break
        else:
            return element
    return {**element, "Value": [_bound_value(vr, v) for v in values[:cap]]}


def bound_dataset(attrs: dict[str, Any]) -> dict[str, Any]:
    """A DICOM JSON dataset with every value bounded (sequences recursively)."""
    return {tag: bound_element(el) if isinstance(el, dict) else el for tag, el in attrs.items()}
