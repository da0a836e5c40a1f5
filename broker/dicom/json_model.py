"""The DICOM JSON model (PS3.18 F.2), computed once per instance at ingest.

Large binary values are never inlined: they become a BulkDataURI under a placeholder base that
is replaced by the serving route's own base URL, so stored bytes can be served as they are.
Values are decoded through SpecificCharacterSet by pydicom, so the JSON is UTF-8 whatever the
input used.
"""

from __future__ import annotations

import base64
import struct
import unicodedata
from typing import Any, cast

from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import STANDARD_VR

from broker.dicom.lean import Lean

BULK_BASE = "@@SCANONCE_BASE@@"
BULK_BASE_BYTES = BULK_BASE.encode()
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
BULK_THRESHOLD = 1024
# Pixel Data (and its float and double-float forms) is always a BulkDataURI, whatever its size:
# a viewer fetches pixels as frames, never from the metadata, and a 16x16 image inlined is 700
# bytes of base64 in every metadata response and index row (Orthanc references it too).
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
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


_NUMERIC = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
_NO_SPLIT = frozenset({"ST", "LT", "UT", "UR"})
_RSTRIP_ONLY = frozenset({"ST", "LT", "UT", "UC"})
_CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
_STRING_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UC", "UI", "ST", "LT", "UT", "UR", "PN"}
)
# Character sets decodable by one Python codec; anything else (ISO 2022 code extensions,
# several values) goes through pydicom's full decoder.
_CODECS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 192": "utf-8", "ISO_IR 100": "latin-1"}


def _ambiguous(tag: int) -> bool:
    try:
        return " or " in dictionary_VR(tag)
    except KeyError:
        return True


def _bulk(tag: int, vr: str, bulk_prefix: str) -> dict[str, Any]:
    return {"vr": vr, "BulkDataURI": f"{BULK_BASE}/{bulk_prefix}/bulk/{tag:08X}"}


def _fast_value(raw: RawDataElement, vr: str, codec: str | None) -> dict[str, Any] | None:
    """DICOM JSON for a raw element straight from its bytes, or None to let pydicom do it.

    pydicom converting every element to Python objects and back is most of the cost of
    ingest; the common VRs are cheap to read directly."""
    value = raw.value
    if value is None:
        return None
    return _fast_bytes(value, vr, codec, raw.is_little_endian)


def _fast_bytes(value: bytes, vr: str, codec: str | None, little_endian: bool) -> dict[str, Any] | None:
    """`_fast_value` of a value's bytes (shared with the lean reader's path)."""
    if not value:
        return {"vr": vr}
    if vr in _STRING_VRS:
        if vr in _CHARSET_VRS:
            if codec is None:
                return None
            try:
                text = value.decode(codec)
            except UnicodeDecodeError:
                return None
        else:
            text = value.decode("ascii", "replace")
        text = text.rstrip("\x00 ") if vr in _RSTRIP_ONLY else text.strip("\x00 ")
        if not text:
            return {"vr": vr}
        if vr in _NO_SPLIT:
            return {"vr": vr, "Value": [text]}
        parts = text.split("\\")
        if vr == "PN":
            if codec != "utf-8" and codec != "ascii" and codec != "latin-1":
                return None
            out: list[Any] = []
            for part in parts:
                part = part.strip()
                if not part:
                    out.append(None)
                    continue
                groups = part.split("=")
                while len(groups) > 1 and not groups[-1]:
                    groups.pop()
                item = {"Alphabetic": groups[0]}
                if len(groups) > 1:
                    item["Ideographic"] = groups[1]
                if len(groups) > 2:
                    item["Phonetic"] = groups[2]
                out.append(item)
            return {"vr": vr, "Value": out}
        return {"vr": vr, "Value": [p.strip() or None for p in parts] if vr != "UC" else parts}
    if vr == "DS" or vr == "IS":
        nums: list[Any] = []
        for part in value.decode("ascii", "replace").split("\\"):
            part = part.strip("\x00 ")
            if not part:
                nums.append(None)
                continue
            try:
                if vr == "IS":
                    f = float(part)
                    if f != int(f):
                        return None
                    nums.append(int(f))
                else:
                    f = float(part)
                    if f != f or f in (float("inf"), float("-inf")):
                        return None
                    nums.append(f)
            except ValueError:
                return None
        return {"vr": vr, "Value": nums} if any(n is not None for n in nums) else {"vr": vr}
    fmt = _NUMERIC.get(vr)
    if fmt is not None:
        size = struct.calcsize(fmt)
        if len(value) % size:
            return None
        endian = "<" if little_endian else ">"
        return {"vr": vr, "Value": list(struct.unpack(f"{endian}{len(value) // size}{fmt}", value))}
    if vr == "AT":
        if len(value) % 4:
            return None
        endian = "<" if little_endian else ">"
        words = struct.unpack(f"{endian}{len(value) // 2}H", value)
        return {"vr": vr, "Value": [f"{words[i]:04X}{words[i + 1]:04X}" for i in range(0, len(words), 2)]}
    if vr in BULK_VRS and len(value) <= BULK_THRESHOLD and vr not in ("OW", "OF", "OD", "OL", "OV"):
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode()}
    return None


def _codec_of(raw_cs: Any) -> str | None:
    """The one Python codec a SpecificCharacterSet value names, or None (pydicom decodes)."""
    if isinstance(raw_cs, bytes):
        raw_cs = raw_cs.decode("ascii", "replace")
    if isinstance(raw_cs, str):
        return _CODECS.get(raw_cs.strip("\x00 "))
    if raw_cs is not None:  # already converted: MultiValue
        values = list(raw_cs)
        return _CODECS.get(str(values[0]).strip()) if len(values) == 1 else None
    return "ascii"


def instance_json(ds: Dataset, *, bulk_prefix: str) -> dict[str, Any]:
    """The instance's top-level attributes as DICOM JSON; bulk values as BulkDataURI.

    `bulk_prefix` is the instance's path under the DICOMweb root (studies/.../instances/...);
    deferred values (read with `defer_size`) are never loaded.
    """
    out: dict[str, Any] = {}
    charset = ds.get_item(0x00080005)
    codec = _codec_of(charset.value) if charset is not None else "ascii"
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset yields elements (and converts them)
        tag = Tag(tag)
        if tag.group == 0x0002 or tag.element == 0:  # file meta and group lengths are not content
            continue
        if tag == 0x00080005:
            # The JSON is UTF-8 whatever the input used (PS3.18 F.2).
            out["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
            continue
        raw = ds.get_item(tag, keep_deferred=True)
        if raw is None:
            continue
        key = f"{int(tag):08X}"
        vr = _vr_of(ds, int(tag), raw)
        length = getattr(raw, "length", None)
        if isinstance(raw, RawDataElement):
            if vr in BULK_VRS and (
                length == _UNDEFINED or (length or 0) > BULK_THRESHOLD or int(tag) in PIXEL_TAGS
            ):
                out[key] = _bulk(int(tag), vr, bulk_prefix)
                continue
            # UN on the wire, ambiguous implicit VRs (US or SS), sequences and private tags
            # need pydicom's knowledge; everything else is read directly.
            if raw.VR != "UN" and (raw.VR is not None or not _ambiguous(int(tag))):
                fast = _fast_value(raw, vr, codec) if vr != "SQ" and not tag.is_private else None
                if fast is not None:
                    out[key] = fast
                    continue
        out[key] = _element_json(ds, tag, f"{bulk_prefix}/bulk")
    return out


# The value pydicom gives a zero-length element of each VR when reading (None for numbers,
# which `instance_json` then hands to pydicom's JSON).
_EMPTY_RAW: dict[str, bytes | None] = {
    str(vr): cast(bytes | None, empty_value_for_VR(vr, raw=True)) for vr in STANDARD_VR
}
_KEYS: dict[int, str] = {}
# The DICOM JSON of short values already seen, per character set: the instances of a series (and
# of a study) repeat most of their values (patient, study, series, equipment, geometry), and a
# dictionary lookup costs a tenth of `_fast_bytes`; it took a third off parsing a small CT
# instance (docs/benchmarks.md). The element objects are shared between the instances that
# have the same value: what the parse returns is read and serialised, never changed in place.
# Bounded: emptied when full, so that an odd stream of distinct values cannot grow it.
_KNOWN: dict[str | None, dict[tuple[int, str, bytes], dict[str, Any]]] = {}
_KNOWN_VALUE_BYTES = 64
_KNOWN_MAX = 4096


def lean_instance_json(lean: Lean, *, bulk_prefix: str) -> dict[str, Any]:
    """`instance_json` of the file `lean` was read from, equal to it member for member, without
    pydicom for the values `_fast_bytes` reads; the rest (sequences, private tags, UN, long
    text, empty numbers) goes through pydicom as before, from a Dataset of the same raw
    elements that `dcmread` would have made."""
    buf = lean.buf
    elements = lean.elements
    codec: str | None = "ascii"
    for tag, _vr, start, length in elements:
        if tag == 0x00080005:
            codec = _codec_of(buf[start : start + length])
            break
        if tag > 0x00080005:
            break
    out: dict[str, Any] = {}
    slow: list[int] = []
    keys = _KEYS
    known = _KNOWN.get(codec)
    if known is None:
        known = _KNOWN[codec] = {}
    for tag, vr, start, length in elements:
        if not tag & 0xFFFF:  # group lengths are not content
            continue
        key = keys.get(tag)
        if key is None:
            key = keys[tag] = f"{tag:08X}"
        if tag == 0x00080005:
            out[key] = {"vr": "CS", "Value": ["ISO_IR 192"]}
            continue
        if vr in BULK_VRS and (length == _UNDEFINED or length > BULK_THRESHOLD or tag in PIXEL_TAGS):
            out[key] = _bulk(tag, vr, bulk_prefix)
            continue
        if vr != "UN" and vr != "SQ" and not (tag >> 16) & 1 and length <= BULK_THRESHOLD:
            value = buf[start : start + length] if length else _EMPTY_RAW[vr]
            if value is not None:
                seen = (tag, vr, value)
                fast = known.get(seen)
                if fast is None:
                    fast = _fast_bytes(value, vr, codec, True)
                    if fast is not None and length <= _KNOWN_VALUE_BYTES:
                        if len(known) >= _KNOWN_MAX:
                            known.clear()
                        known[seen] = fast
                if fast is not None:
                    out[key] = fast
                    continue
        out[key] = None  # keeps the element's place; filled in below
        slow.append(tag)
    if slow:
        ds = _raw_dataset(lean)
        for tag in slow:
            out[keys[tag]] = _element_json(ds, tag, f"{bulk_prefix}/bulk")
    return out


def _raw_dataset(lean: Lean) -> Dataset:
    """The Dataset of raw elements `dcmread` builds for the top level (pydicom's
    `read_dataset`), for converting the elements the lean path leaves to pydicom."""
    buf = lean.buf
    n = len(buf)
    raw: dict[BaseTag, RawDataElement | DataElement] = {}
    charset: RawDataElement | None = None
    for tag, vr, start, length in lean.elements:
        if length == 0:
            value = _EMPTY_RAW[vr]
        elif length != _UNDEFINED and start + length <= n:
            value = buf[start : start + length]
        else:
            value = None  # bulk data past what was read: never converted
        btag = BaseTag(tag)
        sequence = lean.sequences.get(tag)
        if sequence is not None:
            # Read already (an undefined-length sequence), as dcmread's generator yields it.
            raw[btag] = DataElement(btag, "SQ", sequence, start, is_undefined_length=True)
            continue
        element = raw[btag] = RawDataElement(btag, vr, length, value, start, False, True)
        if tag == 0x00080005:
            charset = element
    ds = Dataset(raw)
    encoding: str | list[str] = default_encoding
    if charset is not None:
        encoding = convert_encodings(convert_raw_data_element(charset).value)
    ds.set_original_encoding(False, True, encoding)
    return ds


def _element_json(ds: Dataset, tag: int, bulk_path: str) -> dict[str, Any]:
    """One element through pydicom; bulk values (at any depth) as BulkDataURI under `bulk_path`,
    the WADO-RS bulk data URL of the dataset holding the element."""
    uri = f"{BULK_BASE}/{bulk_path}/{int(tag):08X}"
    try:
        elem = ds[tag]
        if elem.VR == "SQ":
            return _sequence_json(elem.value, f"{bulk_path}/{int(tag):08X}")
        if (
            elem.VR in BULK_VRS
            and elem.value is not None
            and (len(elem.value) > BULK_THRESHOLD or int(tag) in PIXEL_TAGS)
        ):
            return {"vr": elem.VR, "BulkDataURI": uri}
        return elem.to_json_dict(None, 1 << 30)
    except Exception:  # noqa: BLE001 - one unreadable value must not sink the instance
        # A value pydicom cannot decode is kept as bytes behind a BulkDataURI rather than dropped.
        return {"vr": "UN", "BulkDataURI": uri}


def _sequence_json(items: Any, path: str) -> dict[str, Any]:
    """A sequence, item by item, so that large binary values inside items (waveform samples, icon
    pixels) are referenced as `{path}/{item number}/{tag}` instead of inlined: PS3.18 F.2.6 allows
    a BulkDataURI at any depth, and a viewer never needs them inline. No items, no Value (F.2.2)."""
    values = []
    for number, item in enumerate(items or (), start=1):
        encoded: dict[str, Any] = {}
        for tag in item.keys():  # noqa: SIM118 - iterating a Dataset converts every element
            if Tag(tag).element == 0:
                continue
            encoded[f"{int(tag):08X}"] = _element_json(item, tag, f"{path}/{number}")
        values.append(encoded)
    return {"vr": "SQ", "Value": values} if values else {"vr": "SQ"}


def without_bulk(attrs: dict[str, Any]) -> dict[str, Any]:
    """The attributes with every BulkDataURI value left out, at any depth (query answers carry no
    bulk data; inside sequences it would also carry the stored URI placeholder)."""
    out = {}
    for key, item in attrs.items():
        if "BulkDataURI" in item:
            continue
        if item.get("vr") == "SQ" and item.get("Value"):
            item = {**item, "Value": [without_bulk(i) if i else i for i in item["Value"]]}
        out[key] = item
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


def int_value(attrs: dict[str, Any], tag: str) -> int | None:
    """The first value as an integer (IS/DS/US...), None when absent or not a number."""
    v = str_value(attrs, tag)
    try:
        return int(float(v)) if v else None
    except ValueError:
        return None


def all_values(attrs: dict[str, Any], tag: str) -> list[Any]:
    item = attrs.get(tag)
    return list(item.get("Value") or []) if item else []


PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def pn_groups(value: Any) -> tuple[str, str, str]:
    """A PN value's three component groups (Alphabetic, Ideographic, Phonetic), '' where absent:
    from a DICOM JSON PN object (PS3.18 F.2.2) or a `=`-separated PN string (PS3.5 6.2.1)."""
    if isinstance(value, dict):
        parts = [value.get(g) for g in PN_GROUPS]
        a, i, p = (str(v) if isinstance(v, str) else "" for v in parts)
        return a, i, p
    if not value:
        return "", "", ""
    groups = str(value).split("=")[:3] + ["", ""]
    return groups[0], groups[1], groups[2]


def pn_string(groups: tuple[str, str, str]) -> str:
    """The groups as one PN string, `Yamada^Tarou=山田^太郎=やまだ^たろう`, trailing empty groups
    left out (as pydicom writes it): what the index keeps in `patient_name`."""
    parts = list(groups)
    while parts and not parts[-1]:
        parts.pop()
    return "=".join(parts)


def pn_json(name: str) -> dict[str, str]:
    """A `pn_string` back as a DICOM JSON PN object; empty groups are left out (PS3.18 F.2.2)."""
    return {g: v for g, v in zip(PN_GROUPS, pn_groups(name), strict=True) if v}


def casefold_pn(name: str) -> str:
    """One PN component group for case-insensitive matching: trailing empty components dropped,
    casefolded."""
    return name.rstrip("^ ").casefold()


def _drops_marks(base: str) -> bool:
    """Whether the marks on a letter are accents to ignore: on Latin letters (Müller = Muller) and
    Greek ones (Greek capitals are written without tonos: ΔΙΟΝΥΣΙΟΣ is Διονύσιος). Elsewhere a
    mark is part of the letter: ダ (da) is not タ (ta), and Hangul must stay whole syllables."""
    if base < "\u0080" or unicodedata.combining(base):
        return True
    return unicodedata.name(base, "").startswith(("LATIN", "GREEK"))


def fuzzy_pn(name: str) -> str:
    """One PN component group for fuzzy matching: casefolded, compatibility forms folded (NFKC:
    half-width ﾔﾏﾀﾞ is full-width ヤマダ, full-width Ｍ is M) and Latin and Greek letters stripped
    of accents (Müller -> muller). For Latin text this is what it was before NFKC was used:
    NFKD, combining marks dropped."""
    folded = casefold_pn(name)
    if folded.isascii():
        return folded
    out = []
    for ch in unicodedata.normalize("NFKC", folded):
        decomposed = unicodedata.normalize("NFKD", ch)
        if _drops_marks(decomposed[0]):
            out.append("".join(c for c in decomposed if not unicodedata.combining(c)))
        else:
            out.append(ch)
    return "".join(out)
