"""The DICOM JSON model (PS3.18 F.2), computed once per instance at ingest.

Large binary values are never inlined: they become a BulkDataURI under a placeholder base that
is replaced by the serving route's own base URL, so stored bytes can be served as they are.
Values are decoded through SpecificCharacterSet by pydicom, so the JSON is UTF-8 whatever the
input used.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

BULK_BASE = "@@SCANONCE_BASE@@"
BULK_BASE_BYTES = BULK_BASE.encode()
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
BULK_THRESHOLD = 1024
_UNDEFINED = 0xFFFFFFFF


def _vr_of(ds: Dataset, tag: int, raw: DataElement | RawDataElement) -> str:
    vr = raw.VR
    if vr and " or " not in vr:
        return str(vr)
    if tag == 0x7FE00010:
        encapsulated = not getattr(ds, "file_meta", None) or ds.file_meta.get("TransferSyntaxUID") not in (
            "1.2.840.10008.1.2",
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.1.99",
        )
        if encapsulated or int(ds.get("BitsAllocated", 16)) <= 8:
            return "OB"
        return "OW"
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


def instance_json(ds: Dataset, *, bulk_prefix: str) -> dict[str, Any]:
    """The instance's top-level attributes as DICOM JSON; bulk values as BulkDataURI.

    `bulk_prefix` is the instance's path under the DICOMweb root (studies/.../instances/...);
    deferred values (read with `defer_size`) are never loaded.
    """
    out: dict[str, Any] = {}
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset yields elements (and converts them)
        tag = Tag(tag)
        if tag.group == 0x0002 or tag.element == 0:  # file meta and group lengths are not content
            continue
        if tag == 0x00080005:
            # The JSON is UTF-8 whatever the input used (PS3.18 F.2).
            out["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
            continue
        raw = ds.get_item(tag)
        if raw is None:
            continue
        vr = _vr_of(ds, int(tag), raw)
        length = getattr(raw, "length", None)
        if vr in BULK_VRS and (
            isinstance(raw, RawDataElement) and (length == _UNDEFINED or (length or 0) > BULK_THRESHOLD)
        ):
            out[f"{int(tag):08X}"] = {
                "vr": vr,
                "BulkDataURI": f"{BULK_BASE}/{bulk_prefix}/bulk/{int(tag):08X}",
            }
            continue
        try:
            elem = ds[tag]
            if elem.VR in BULK_VRS and elem.value is not None and len(elem.value) > BULK_THRESHOLD:
                out[f"{int(tag):08X}"] = {
                    "vr": elem.VR,
                    "BulkDataURI": f"{BULK_BASE}/{bulk_prefix}/bulk/{int(tag):08X}",
                }
                continue
            out[f"{int(tag):08X}"] = elem.to_json_dict(None, 1 << 30)
        except Exception:  # noqa: BLE001 - one unreadable value must not sink the instance
            # A value pydicom cannot decode is kept as bytes behind a BulkDataURI rather than dropped.
            out[f"{int(tag):08X}"] = {
                "vr": "UN",
                "BulkDataURI": f"{BULK_BASE}/{bulk_prefix}/bulk/{int(tag):08X}",
            }
    return out


def first_value(attrs: dict[str, Any], tag: str) -> Any:
    item = attrs.get(tag)
    if not item:
        return None
    values = item.get("Value")
    if not values:
        return None
    return values[0]


def str_value(attrs: dict[str, Any], tag: str) -> str:
    v = first_value(attrs, tag)
    if v is None:
        return ""
    if isinstance(v, dict):  # PN
        return str(v.get("Alphabetic", ""))
    return str(v)


def all_values(attrs: dict[str, Any], tag: str) -> list[Any]:
    item = attrs.get(tag)
    return list(item.get("Value") or []) if item else []


def casefold_pn(name: str) -> str:
    """PatientName for case-insensitive matching: trailing empty components dropped, casefolded."""
    return name.rstrip("^ ").casefold()


def fuzzy_pn(name: str) -> str:
    """PatientName for fuzzy matching: casefolded and stripped of accents (Müller -> muller)."""
    decomposed = unicodedata.normalize("NFKD", casefold_pn(name))
    return "".join(c for c in decomposed if not unicodedata.combining(c))
