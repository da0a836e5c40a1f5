"""Radiation dose as modalities record it, read from one instance (DICOM know-how every domain
may need: the index reads it once at ingest, the lookup sums it per study).

`extract_dose` / `read_dose` read one instance (a pydicom Dataset or the DICOM JSON model the index
keeps per instance) into a `DoseRecord`: the CT Radiation Dose SR (TID 10011) or the projection
X-ray one (TID 10001), else the image header (per-image CTDIvol, or the DAP of CR/DX/RF/XA/MG).

SR content items are matched on concept codes (value + scheme), never on code meanings, which
vendors localise and misspell. Nothing here raises on bad input: a value that cannot be read is
left out and the reason kept in `problems` (no patient data goes into them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from datetime import date
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

# -- Concept codes (PS3.16, scheme DCM unless stated) -------------------------------------------

XRAY_DOSE_REPORT = "113701"  # root of TID 10001 and TID 10011
CT_ACCUMULATED = "113811"
CT_EVENT_COUNT = "113812"
CT_DLP_TOTAL = "113813"
CT_ACQUISITION = "113819"
CT_DOSE = "113829"
MEAN_CTDIVOL = "113830"
PHANTOM_TYPE = "113835"
DLP = "113838"
SSDE = "113930"
DERIVED_EFFECTIVE_DIAMETER = "113933"
WATER_EQUIVALENT_DIAMETER = "113980"
AAPM_220 = "113987"  # the method of a water-equivalent diameter (AAPM Report 220)
IRRADIATION_EVENT_UID = "113769"
TARGET_REGION = "123014"
ACCUMULATED_XRAY = "113702"
DAP_TOTAL = "113722"
XRAY_EVENT = "113706"
DAP = "122130"

HEAD_PHANTOM = "113690"  # IEC Head Dosimetry Phantom: 16 cm PMMA
BODY_PHANTOM = "113691"  # IEC Body Dosimetry Phantom: 32 cm PMMA

PROJECTION_MODALITIES = frozenset({"CR", "DX", "RF", "XA", "MG", "PX", "IO"})


class Phantom(StrEnum):
    HEAD_16 = "16cm"
    BODY_32 = "32cm"


class DoseSource(StrEnum):
    RDSR = "rdsr"  # a Radiation Dose SR (CT or projection)
    IMAGE_CTDIVOL = "image-ctdivol"  # CTDIvol (0018,9345) in CT image headers
    IMAGE_DAP = "image-dap"  # Image and Fluoroscopy Area Dose Product (0018,115E)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class CTEvent(_Model):
    """One CT irradiation event (TID 10013) as the SR states it, in canonical units."""

    event_uid: str | None = None
    ctdivol_mgy: float | None = None
    dlp_mgy_cm: float | None = None
    phantom: Phantom | None = None
    target_region: str | None = None  # a k-factor region key, when the SR's code maps to one
    target_region_code: str | None = None  # "SCT:51185008" as the SR wrote it (SRT codes kept)
    water_equivalent_diameter_cm: float | None = None
    effective_diameter_cm: float | None = None
    reported_ssde_mgy: float | None = None


class ProjectionEvent(_Model):
    event_uid: str | None = None
    dap_gy_cm2: float | None = None


class ImageDose(_Model):
    """Dose attributes of one image header (the fallback when a study has no RDSR)."""

    ctdivol_mgy: float | None = None
    phantom: Phantom | None = None
    z_mm: float | None = None
    z_end_mm: float | None = None  # last frame's z, for a multi-frame image
    slice_thickness_mm: float | None = None
    water_equivalent_diameter_cm: float | None = None
    event_uid: str | None = None
    localizer: bool = False
    dap_gy_cm2: float | None = None


class DoseRecord(_Model):
    """What one instance says about dose; stored at ingest (`model_dump(mode="json")`)."""

    sop_instance_uid: str = ""
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    modality: str = ""
    study_date: date | None = None
    source: DoseSource
    ct_events: tuple[CTEvent, ...] = ()
    dlp_total_mgy_cm: float | None = None  # 113813 as reported
    event_count_reported: int | None = None  # 113812 as reported
    dap_total_gy_cm2: float | None = None  # 113722, summed over acquisition planes
    projection_events: tuple[ProjectionEvent, ...] = ()
    image: ImageDose | None = None
    problems: tuple[str, ...] = ()


class Extraction(_Model):
    record: DoseRecord | None = None
    reason: str | None = None  # why there is no record


# -- Reading the DICOM JSON model ----------------------------------------------------------------

# Top-level attributes dose extraction reads; a Dataset is converted only for these.
_TAGS = {
    "SOPClassUID": "00080016",
    "SOPInstanceUID": "00080018",
    "StudyDate": "00080020",
    "ContentDate": "00080023",
    "Modality": "00080060",
    "ImageType": "00080008",
    "IrradiationEventUID": "00083010",
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "ImagePositionPatient": "00200032",
    "SliceThickness": "00180050",
    "CTDIvol": "00189345",
    "CTDIPhantomTypeCodeSequence": "00189346",
    "WaterEquivalentDiameter": "00181271",
    "ImageAndFluoroscopyAreaDoseProduct": "0018115E",
    "ConceptNameCodeSequence": "0040A043",
    "ContentSequence": "0040A730",
    "SharedFunctionalGroupsSequence": "52009229",
    "PerFrameFunctionalGroupsSequence": "52009230",
}

JSON = dict[str, Any]


def _tolerant_json(ds: Dataset) -> JSON:
    """The JSON model of the attributes dose needs, keeping an unreadable value as its raw text
    (so one garbage number costs that number, not the whole SR)."""
    out: JSON = {}
    for key in _TAGS.values():
        tag = int(key, 16)
        if tag not in ds:
            continue
        out[key] = _element_json(ds, tag)
    return out


def _element_json(ds: Dataset, tag: int) -> JSON:
    try:
        elem = ds[tag]
    except Exception:  # noqa: BLE001 - pydicom raises what it likes on a malformed value
        raw = ds.get_item(tag)
        value = raw.value if isinstance(raw, RawDataElement) else None
        text = value.decode("latin-1", "replace") if isinstance(value, bytes) else str(value or "")
        return {"vr": "UN", "Value": text.split("\\")}
    if elem.VR == "SQ":
        items = []
        for item in elem.value or []:
            items.append({f"{int(t):08X}": _element_json(item, int(t)) for t in item.keys()})  # noqa: SIM118
        return {"vr": "SQ", "Value": items}
    try:
        return dict(elem.to_json_dict(None, 1 << 30))
    except Exception:  # noqa: BLE001 - same: keep the raw text and let the number parser judge it
        return {"vr": elem.VR, "Value": [str(elem.value)]}


def _values(attrs: Mapping[str, Any], key: str) -> list[Any]:
    item = attrs.get(key)
    if not isinstance(item, Mapping):
        return []
    values = item.get("Value")
    return list(values) if isinstance(values, list) else []


def _text(attrs: Mapping[str, Any], key: str) -> str:
    values = _values(attrs, key)
    return str(values[0]).strip() if values and values[0] is not None else ""


def _items(attrs: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    return [v for v in _values(attrs, key) if isinstance(v, Mapping)]


def _number(raw: Any) -> float | None:
    """A finite number from a DS/FD value (number or text), else None."""
    if isinstance(raw, bool) or raw is None:
        return None
    try:
        value = float(raw.strip()) if isinstance(raw, str) else float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _code(item: Mapping[str, Any]) -> tuple[str, str]:
    value = _text(item, "00080100") or _text(item, "00080119") or _text(item, "00080120")
    return value, _text(item, "00080102").upper()


def _concept(item: Mapping[str, Any]) -> tuple[str, str]:
    names = _items(item, "0040A043")
    return _code(names[0]) if names else ("", "")


def _is(item: Mapping[str, Any], value: str, scheme: str = "DCM") -> bool:
    return _concept(item) == (value, scheme)


def _children(item: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return _items(item, "0040A730")


def _walk(item: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for child in _children(item):
        yield child
        yield from _walk(child)


def _find(item: Mapping[str, Any], value: str) -> list[Mapping[str, Any]]:
    return [node for node in _walk(item) if _is(node, value)]


# UCUM unit codes to canonical units (mGy, cm, cm2); "u" is UCUM's micro, "µ" is a common mistake.
_DOSE_TO_MGY = {"Gy": 1000.0, "dGy": 100.0, "cGy": 10.0, "mGy": 1.0, "uGy": 1e-3, "µGy": 1e-3}
_LENGTH_TO_CM = {"m": 100.0, "dm": 10.0, "cm": 1.0, "mm": 0.1}


def _unit_factor(unit: str, kind: str) -> float | None:
    """Factor from a UCUM unit to mGy ("dose"), mGy.cm ("dlp"), Gy.cm2 ("dap") or cm ("length")."""
    if kind == "length":
        return _LENGTH_TO_CM.get(unit)
    if kind == "dose":
        return _DOSE_TO_MGY.get(unit)
    dose_unit, _, length_unit = unit.partition(".")
    dose = _DOSE_TO_MGY.get(dose_unit)
    if dose is None:
        return None
    if kind == "dlp":
        length = _LENGTH_TO_CM.get(length_unit)
        return dose * length if length is not None else None
    if kind == "dap" and length_unit.endswith("2"):
        length = _LENGTH_TO_CM.get(length_unit[:-1])
        return dose / 1000.0 * length * length if length is not None else None
    return None


def _measured(item: Mapping[str, Any], kind: str, problems: list[str]) -> float | None:
    """The value of a NUM content item in canonical units; None (with a problem) if unusable."""
    name = _concept(item)[0]
    measured = _items(item, "0040A300")
    if not measured:
        problems.append(f"{name}: no measured value")
        return None
    raw = _values(measured[0], "0040A30A")
    value = _number(raw[0]) if raw else None
    if value is None:
        problems.append(f"{name}: value is not a number")
        return None
    if value < 0:
        problems.append(f"{name}: negative value ignored")
        return None
    units = _items(measured[0], "004008EA")
    unit, scheme = _code(units[0]) if units else ("", "")
    factor = _unit_factor(unit, kind) if scheme == "UCUM" else None
    if factor is None:
        problems.append(f"{name}: unit {unit or '(none)'} ({scheme or 'no scheme'}) not understood")
        return None
    converted = value * factor
    if not math.isfinite(converted):
        problems.append(f"{name}: value out of range")
        return None
    return converted


def _first_num(item: Mapping[str, Any], value: str, kind: str, problems: list[str]) -> float | None:
    for node in _find(item, value):
        if _text(node, "0040A040").upper() == "NUM":
            return _measured(node, kind, problems)
    return None


def _phantom_of(code: tuple[str, str]) -> Phantom | None:
    if code == (HEAD_PHANTOM, "DCM"):
        return Phantom.HEAD_16
    if code == (BODY_PHANTOM, "DCM"):
        return Phantom.BODY_32
    return None


# SNOMED CT body structures (CID 4030) for the k-factor regions, by their SCT code and by the
# legacy SRT designator of the same concept (the pairs pydicom's `Code` equates). Written out
# rather than compared through `pydicom.sr.coding.Code`: importing `pydicom.sr` loads its concept
# dictionaries, ~15 MB of heap in every process that reads dose (the server and each parse worker).
_REGIONS: dict[tuple[str, str], str] = {
    ("SCT", "69536005"): "head",
    ("SRT", "T-D1100"): "head",
    ("SCT", "45048000"): "neck",
    ("SRT", "T-D1600"): "neck",
    ("SCT", "774007"): "head_neck",
    ("SRT", "T-D1000"): "head_neck",
    ("SCT", "51185008"): "chest",
    ("SRT", "T-D3000"): "chest",
    ("SCT", "113345001"): "abdomen_pelvis",
    ("SRT", "T-D4000"): "abdomen_pelvis",
    ("SCT", "12921003"): "abdomen_pelvis",
    ("SRT", "T-D6000"): "abdomen_pelvis",
    ("SCT", "818981001"): "abdomen_pelvis",
    ("SCT", "818982008"): "abdomen_pelvis",
    ("SCT", "416949008"): "abdomen_pelvis",
    ("SRT", "R-FAB57"): "abdomen_pelvis",
    ("SCT", "416775004"): "trunk",
    ("SRT", "R-FAB56"): "trunk",
    ("SCT", "416550000"): "trunk",
    ("SRT", "R-FAB55"): "trunk",
}


def _region_of(value: str, scheme: str) -> str | None:
    return _REGIONS.get((scheme, value))


def _ct_event(node: Mapping[str, Any], problems: list[str]) -> CTEvent:
    event_uid = None
    region = region_code = None
    for child in _children(node):
        concept = _concept(child)
        if concept == (IRRADIATION_EVENT_UID, "DCM"):
            event_uid = _text(child, "0040A124") or None
        elif concept == (TARGET_REGION, "DCM"):
            codes = _items(child, "0040A168")
            if codes:
                value, scheme = _code(codes[0])
                region, region_code = _region_of(value, scheme), f"{scheme}:{value}"
    phantom = None
    for item in _find(node, PHANTOM_TYPE):
        codes = _items(item, "0040A168")
        phantom = _phantom_of(_code(codes[0])) if codes else None
        if phantom is None:
            problems.append("CTDIw phantom type not understood")
    return CTEvent(
        event_uid=event_uid,
        ctdivol_mgy=_first_num(node, MEAN_CTDIVOL, "dose", problems),
        dlp_mgy_cm=_first_num(node, DLP, "dlp", problems),
        phantom=phantom,
        target_region=region,
        target_region_code=region_code,
        water_equivalent_diameter_cm=_first_num(node, WATER_EQUIVALENT_DIAMETER, "length", problems)
        # Some writers name the value by its method, 113987 "AAPM 220"; only a length passes.
        or _first_num(node, AAPM_220, "length", problems),
        effective_diameter_cm=_first_num(node, DERIVED_EFFECTIVE_DIAMETER, "length", problems),
        reported_ssde_mgy=_first_num(node, SSDE, "dose", problems),
    )


def _read_rdsr(attrs: Mapping[str, Any], base: dict[str, Any]) -> DoseRecord:
    problems: list[str] = []
    root: Mapping[str, Any] = attrs
    ct_events = tuple(_ct_event(node, problems) for node in _find(root, CT_ACQUISITION))
    dlp_total = count = None
    for acc in _find(root, CT_ACCUMULATED):
        dlp_total = _first_num(acc, CT_DLP_TOTAL, "dlp", problems)
        for node in _find(acc, CT_EVENT_COUNT):
            measured = _items(node, "0040A300")
            raw = _values(measured[0], "0040A30A") if measured else []
            number = _number(raw[0]) if raw else None
            count = int(number) if number is not None and number >= 0 else None
    dap_totals = [
        value
        for acc in _find(root, ACCUMULATED_XRAY)
        if (value := _first_num(acc, DAP_TOTAL, "dap", problems)) is not None
    ]
    projection_events = tuple(
        ProjectionEvent(
            event_uid=next(
                (_text(c, "0040A124") or None for c in _children(ev) if _is(c, IRRADIATION_EVENT_UID)),
                None,
            ),
            dap_gy_cm2=_first_num(ev, DAP, "dap", problems),
        )
        for ev in _find(root, XRAY_EVENT)
    )
    return DoseRecord(
        **base,
        source=DoseSource.RDSR,
        ct_events=ct_events,
        dlp_total_mgy_cm=dlp_total,
        event_count_reported=count,
        dap_total_gy_cm2=sum(dap_totals) if dap_totals else None,
        projection_events=projection_events,
        problems=tuple(problems),
    )


def _frames(attrs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per frame of an enhanced (multi-frame) CT image, the attributes of its CT Exposure, Plane
    Position and Pixel Measures functional groups, shared ones first and per-frame ones over them."""
    shared_items = _items(attrs, _TAGS["SharedFunctionalGroupsSequence"])
    shared = shared_items[0] if shared_items else {}
    out = []
    for frame in _items(attrs, _TAGS["PerFrameFunctionalGroupsSequence"]) or [{}]:
        merged: dict[str, Any] = {}
        for group in (shared, frame):
            for macro in ("00189321", "00209113", "00289110"):
                items = _items(group, macro)
                if items:
                    merged.update(items[0])
        out.append(merged)
    return out


def _read_ct_image(attrs: Mapping[str, Any], base: dict[str, Any]) -> Extraction | None:
    frames = [attrs] if _TAGS["CTDIvol"] in attrs else [f for f in _frames(attrs) if _TAGS["CTDIvol"] in f]
    if not frames:
        return None
    ctdivols = [_number(v[0]) if (v := _values(f, _TAGS["CTDIvol"])) else None for f in frames]
    usable = [c for c in ctdivols if c is not None and c >= 0]
    if not usable:
        return Extraction(reason="CTDIvol (0018,9345) is present but not a usable number")
    zs = []
    for frame in frames:
        position = [_number(v) for v in _values(frame, _TAGS["ImagePositionPatient"])]
        if len(position) == 3 and position[2] is not None:
            zs.append(position[2])
    thickness = _values(frames[0], _TAGS["SliceThickness"])
    phantoms = _items(frames[0], _TAGS["CTDIPhantomTypeCodeSequence"])
    dw = _values(attrs, _TAGS["WaterEquivalentDiameter"])
    dw_mm = _number(dw[0]) if dw else None
    image = ImageDose(
        ctdivol_mgy=sum(usable) / len(usable),
        phantom=_phantom_of(_code(phantoms[0])) if phantoms else None,
        z_mm=min(zs) if zs else None,
        z_end_mm=max(zs) if len(zs) > 1 else None,
        slice_thickness_mm=_number(thickness[0]) if thickness else None,
        water_equivalent_diameter_cm=dw_mm / 10 if dw_mm and dw_mm > 0 else None,
        event_uid=_text(attrs, _TAGS["IrradiationEventUID"]) or None,
        localizer="LOCALIZER" in {str(v).upper() for v in _values(attrs, _TAGS["ImageType"])},
    )
    return Extraction(record=DoseRecord(**base, source=DoseSource.IMAGE_CTDIVOL, image=image))


def _read_image(attrs: Mapping[str, Any], base: dict[str, Any]) -> Extraction:
    problems: list[str] = []
    modality = base["modality"]
    ct = _read_ct_image(attrs, base)
    if ct is not None:
        return ct
    if _TAGS["ImageAndFluoroscopyAreaDoseProduct"] in attrs:
        values = _values(attrs, _TAGS["ImageAndFluoroscopyAreaDoseProduct"])
        dap = _number(values[0]) if values else None
        if dap is None or dap < 0:
            return Extraction(reason="Area Dose Product (0018,115E) is present but not a usable number")
        # (0018,115E) is defined in dGy.cm2; 1 dGy.cm2 = 0.1 Gy.cm2.
        image = ImageDose(dap_gy_cm2=dap * 0.1, event_uid=_text(attrs, _TAGS["IrradiationEventUID"]) or None)
        return Extraction(
            record=DoseRecord(**base, source=DoseSource.IMAGE_DAP, image=image, problems=tuple(problems))
        )
    what = "CT image without CTDIvol" if modality == "CT" else f"no dose attributes ({modality or '?'})"
    return Extraction(reason=what)


def _date(attrs: Mapping[str, Any]) -> date | None:
    for key in (_TAGS["StudyDate"], _TAGS["ContentDate"]):
        text = _text(attrs, key)
        if len(text) == 8 and text.isdigit():
            try:
                return date(int(text[:4]), int(text[4:6]), int(text[6:]))
            except ValueError:
                continue
    return None


def read_dose(obj: Dataset | Mapping[str, Any]) -> Extraction:
    """Dose of one instance, or why it has none. Never raises on the instance's content."""
    if isinstance(obj, Dataset):
        attrs: Mapping[str, Any] = _tolerant_json(obj)
    elif isinstance(obj, Mapping):
        attrs = obj
    else:
        return Extraction(reason=f"not a DICOM dataset or JSON model ({type(obj).__name__})")
    base: dict[str, Any] = {
        "sop_instance_uid": _text(attrs, _TAGS["SOPInstanceUID"]),
        "series_instance_uid": _text(attrs, _TAGS["SeriesInstanceUID"]),
        "study_instance_uid": _text(attrs, _TAGS["StudyInstanceUID"]),
        "modality": _text(attrs, _TAGS["Modality"]).upper(),
        "study_date": _date(attrs),
    }
    if _TAGS["ContentSequence"] in attrs or base["modality"] == "SR":
        names = _items(attrs, _TAGS["ConceptNameCodeSequence"])
        if not names or _code(names[0]) != (XRAY_DOSE_REPORT, "DCM"):
            return Extraction(reason="structured report that is not an X-Ray Radiation Dose Report (113701)")
        content = attrs.get(_TAGS["ContentSequence"])
        if isinstance(content, Mapping) and "BulkDataURI" in content:
            # json_model keeps a sequence pydicom could not convert as bytes behind a URI.
            return Extraction(reason="dose report content unreadable in the JSON model: read the stored file")
        record = _read_rdsr(attrs, base)
        has_ct = any(e.ctdivol_mgy is not None or e.dlp_mgy_cm is not None for e in record.ct_events)
        has_projection = any(e.dap_gy_cm2 is not None for e in record.projection_events)
        if not (has_ct or has_projection) and (
            record.dap_total_gy_cm2 is None and record.dlp_total_mgy_cm is None
        ):
            reason = "dose report without readable CT or projection dose"
            if record.problems:
                reason += ": " + "; ".join(dict.fromkeys(record.problems))
            return Extraction(reason=reason)
        return Extraction(record=record)
    return _read_image(attrs, base)


def extract_dose(obj: Dataset | Mapping[str, Any]) -> DoseRecord | None:
    """The dose one instance carries, or None; `read_dose` says why not."""
    return read_dose(obj).record
