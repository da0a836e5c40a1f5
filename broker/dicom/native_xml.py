"""The Native DICOM Model (PS3.19 A.1) from the DICOM JSON model (PS3.18 F.2).

WADO-RS serves metadata as `application/dicom+xml` from the same stored JSON it serves as
`application/dicom+json`; PS3.18 F.2 defines both encodings of one model, so the XML is a
translation of the JSON, attribute by attribute:

    JSON "Value": [...]           -> <Value number="n">           (numbered from 1)
    JSON PN {"Alphabetic": ...}   -> <PersonName number="n"><Alphabetic><FamilyName>...
    JSON SQ "Value": [{...}]      -> <Item number="n"><DicomAttribute .../></Item>
    JSON "BulkDataURI"            -> <BulkData uri="..."/>
    JSON "InlineBinary"           -> <InlineBinary>base64</InlineBinary>

pydicom has a JSON model but no XML one, hence this small encoder.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

from pydicom.datadict import keyword_for_tag

NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
_PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
# Characters XML 1.0 cannot carry, even escaped (a C0 control in a text value would make the
# whole document unreadable); they are replaced, the rest of the value is kept.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _text(value: Any) -> str:
    if isinstance(value, float):
        # DS values arrive as JSON numbers; 2.0 is written "2" as a DICOM decimal string would be.
        return str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
    return _NOT_XML.sub("\ufffd", str(value))


def _private_creator(attrs: dict[str, Any], tag: str) -> str | None:
    """The creator of a private data element (gggg,xxyy) is the value of (gggg,00xx)."""
    group, element = int(tag[:4], 16), int(tag[4:], 16)
    if element < 0x1000:
        return None
    creator = attrs.get(f"{group:04X}{element >> 8:04X}", {}).get("Value") or [None]
    return None if creator[0] is None else _text(creator[0])


def _person_name(parent: ET.Element, number: int, value: Any) -> None:
    pn = ET.SubElement(parent, "PersonName", number=str(number))
    if not isinstance(value, dict):
        return
    for group in _PN_GROUPS:
        text = value.get(group)
        if not text:
            continue
        node = ET.SubElement(pn, group)
        components = str(text).split("^")
        for name, part in zip(_PN_COMPONENTS, components, strict=False):
            if part:
                ET.SubElement(node, name).text = _text(part)


def _attribute(parent: ET.Element, tag: str, item: dict[str, Any], attrs: dict[str, Any]) -> None:
    vr = str(item.get("vr", "UN"))
    node = ET.SubElement(parent, "DicomAttribute", {"tag": tag, "vr": vr})
    group = int(tag[:4], 16)
    if group % 2:
        creator = _private_creator(attrs, tag)
        if creator is not None:
            node.set("privateCreator", creator)
    else:
        keyword = keyword_for_tag(int(tag, 16))
        if keyword:
            node.set("keyword", keyword)
    if "BulkDataURI" in item:
        ET.SubElement(node, "BulkData", uri=str(item["BulkDataURI"]))
        return
    if "InlineBinary" in item:
        ET.SubElement(node, "InlineBinary").text = str(item["InlineBinary"])
        return
    for number, value in enumerate(item.get("Value") or (), start=1):
        if vr == "SQ":
            _dataset(ET.SubElement(node, "Item", number=str(number)), value or {})
        elif vr == "PN":
            _person_name(node, number, value)
        else:
            # An empty value of a multi-valued attribute keeps its number (PS3.19 A.1.4).
            ET.SubElement(node, "Value", number=str(number)).text = None if value is None else _text(value)


def _dataset(parent: ET.Element, attrs: dict[str, Any]) -> None:
    for tag in sorted(attrs, key=lambda t: int(t, 16)):
        _attribute(parent, tag, attrs[tag], attrs)


def native_dicom_model(attrs: dict[str, Any]) -> bytes:
    """One instance's DICOM JSON object as a PS3.19 NativeDicomModel document (UTF-8)."""
    root = ET.Element("NativeDicomModel", xmlns=NAMESPACE)
    root.set("xml:space", "preserve")
    _dataset(root, attrs)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(
        root, encoding="utf-8", xml_declaration=False
    )
