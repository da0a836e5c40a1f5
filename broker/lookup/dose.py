"""Radiation dose of a study: read once per instance at ingest, summed per study at lookup.

`extract_dose` reads one instance (a pydicom Dataset or the DICOM JSON model the index keeps per
instance) into a `DoseRecord`: the CT Radiation Dose SR (TID 10011) or the projection X-ray one
(TID 10001), else the image header (per-image CTDIvol, or the DAP of CR/DX/RF/XA/MG images).
`study_dose` sums a study's records into DLP by phantom, CTDIvol per event, DAP, effective dose
E = k x DLP (k by region and age band, DLP referred to the phantom the k table assumes) and SSDE.
`typical_dose`, `repeat_cost` and `cumulative` answer "what would a repeat cost" and "how much
has this person had in the last 12 months". Tables live in dose_data/ with their citations;
docs/dose.md explains every number.

SR content items are matched on concept codes (value + scheme), never on code meanings, which
vendors localise and misspell. Nothing here raises on bad input: a value that cannot be read is
left out and the reason kept in `problems`/`notes` (no patient data goes into them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import date
from enum import StrEnum
from functools import cache
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

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


# SNOMED CT body structures (CID 4030) for the k-factor regions; pydicom's Code compares the
# legacy SRT designators (T-D3000...) equal to their SCT values.
_REGION_CODES: tuple[tuple[Code, str], ...] = (
    (Code("69536005", "SCT", "Head"), "head"),
    (Code("45048000", "SCT", "Neck"), "neck"),
    (Code("774007", "SCT", "Head and Neck"), "head_neck"),
    (Code("51185008", "SCT", "Chest"), "chest"),
    (Code("113345001", "SCT", "Abdomen"), "abdomen_pelvis"),
    (Code("12921003", "SCT", "Pelvis"), "abdomen_pelvis"),
    (Code("818981001", "SCT", "Abdomen"), "abdomen_pelvis"),
    (Code("818982008", "SCT", "Abdomen and Pelvis"), "abdomen_pelvis"),
    (Code("416949008", "SCT", "Abdomen and/or Pelvis"), "abdomen_pelvis"),
    (Code("416775004", "SCT", "Chest, Abdomen and Pelvis"), "trunk"),
    (Code("416550000", "SCT", "Chest and/or Abdomen"), "trunk"),
)


def _region_of(value: str, scheme: str) -> str | None:
    if not value or not scheme:
        return None
    try:
        code = Code(value, scheme, "")
    except Exception:  # noqa: BLE001 - a malformed code is just not a region
        return None
    return next((region for known, region in _REGION_CODES if code == known), None)


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


# -- Tables ---------------------------------------------------------------------------------------


@cache
def _table(name: str) -> dict[str, Any]:
    data = resources.files("broker.lookup").joinpath("dose_data", name).read_text(encoding="utf-8")
    return dict(json.loads(data))


def k_table_version() -> str:
    return str(_table("k_factors.json")["version"])


def age_band(age_years: float) -> str:
    """The k-table column for an age at the exam: newborn, 1y, 5y, 10y or adult."""
    for band in _table("k_factors.json")["age_bands"]:
        below = band["below_years"]
        if below is None or age_years < below:
            return str(band["band"])
    return "adult"


def normalize_region(region: str | None) -> str | None:
    """A k-table region key for a region name (aliases such as "abdomen" -> "abdomen_pelvis")."""
    if not region:
        return None
    key = region.strip().lower().replace(" ", "_")
    table = _table("k_factors.json")
    if key in table["regions"]:
        return key
    alias = table["region_aliases"].get(key)
    return str(alias) if alias else None


class KFactor(_Model):
    region: str
    age_band: str
    k: float  # mSv per mGy.cm
    phantom: Phantom  # the phantom the DLP must be referred to for this k
    source: str


def k_factor(*, region: str, age_years: float) -> KFactor | None:
    key = normalize_region(region)
    if key is None or age_years < 0:
        return None
    table = _table("k_factors.json")
    row = table["regions"][key]
    band = age_band(age_years)
    phantom = Phantom.HEAD_16 if row["phantom_cm"][band] == 16 else Phantom.BODY_32
    return KFactor(
        region=key,
        age_band=band,
        k=float(row["k"][band]),
        phantom=phantom,
        source=table["sources"][row["source"]],
    )


def phantom_ratio(diameter_cm: float | None = None) -> float:
    """CTDI in the 16 cm phantom per CTDI in the 32 cm phantom for the same exposure."""
    conv = _table("k_factors.json")["phantom_conversion"]
    if diameter_cm is None:
        return float(conv["ctdi16_per_ctdi32_default"])
    f32, f16 = conv["aapm204_fit_32cm"], conv["aapm204_fit_16cm"]
    return float(
        (f32["a"] * math.exp(-f32["b"] * diameter_cm)) / (f16["a"] * math.exp(-f16["b"] * diameter_cm))
    )


def refer_to_phantom(
    value: float, *, measured_in: Phantom, wanted: Phantom, diameter_cm: float | None
) -> float:
    if measured_in == wanted:
        return value
    ratio = phantom_ratio(diameter_cm)
    return value * ratio if wanted == Phantom.HEAD_16 else value / ratio


# AAPM Report 204 covers effective diameters from 8 to 45 cm (its Tables 1 and 2).
SSDE_DIAMETER_RANGE_CM = (8.0, 45.0)


def ssde(*, ctdivol_mgy: float, phantom: Phantom, diameter_cm: float) -> float | None:
    """Size-specific dose estimate (AAPM 204, with AAPM 220's water-equivalent diameter)."""
    low, high = SSDE_DIAMETER_RANGE_CM
    if not low <= diameter_cm <= high:
        return None
    conv = _table("k_factors.json")["phantom_conversion"]
    fit = conv["aapm204_fit_32cm"] if phantom == Phantom.BODY_32 else conv["aapm204_fit_16cm"]
    return float(ctdivol_mgy * fit["a"] * math.exp(-fit["b"] * diameter_cm))


# -- Per study ----------------------------------------------------------------------------------


class EventDose(_Model):
    event_uid: str | None = None
    region: str | None = None
    ctdivol_mgy: float | None = None
    dlp_mgy_cm: float | None = None
    phantom: Phantom | None = None
    phantom_assumed: bool = False
    k: KFactor | None = None
    dlp_for_k_mgy_cm: float | None = None  # DLP referred to the phantom k assumes
    effective_dose_msv: float | None = None
    ssde_mgy: float | None = None
    ssde_basis: str | None = None
    estimated: bool = False  # DLP estimated from image headers


class StudyDose(_Model):
    study_instance_uid: str = ""
    study_date: date | None = None
    modality: str = ""
    age_at_exam_years: float | None = None
    age_band: str | None = None
    region: str | None = None
    source: DoseSource | None = None
    method: str = ""
    events: tuple[EventDose, ...] = ()
    ctdivol_per_event_mgy: tuple[float, ...] = ()
    dlp_by_phantom_mgy_cm: dict[Phantom, float] = {}
    dlp_total_reported_mgy_cm: float | None = None
    dap_total_gy_cm2: float | None = None
    effective_dose_msv: float | None = None
    k_table_version: str = ""
    notes: tuple[str, ...] = ()


def _assumed_phantom(region: str | None) -> Phantom:
    # Scanners report the head phantom for heads and, for adults, the body phantom for the rest;
    # for children's bodies vendors differ, so the assumption is stated in the notes.
    return Phantom.HEAD_16 if region in ("head", "head_neck") else Phantom.BODY_32


def _event_dose(
    ev: CTEvent, *, region: str | None, age_years: float | None, estimated: bool, notes: list[str]
) -> EventDose:
    region = normalize_region(ev.target_region or region)
    phantom, assumed = ev.phantom, False
    if phantom is None and (ev.dlp_mgy_cm is not None or ev.ctdivol_mgy is not None):
        phantom, assumed = _assumed_phantom(region), True
    diameter = ev.water_equivalent_diameter_cm or ev.effective_diameter_cm
    k = k_factor(region=region, age_years=age_years) if region and age_years is not None else None
    dlp_for_k = effective = None
    if ev.dlp_mgy_cm is not None and k is not None and phantom is not None:
        dlp_for_k = refer_to_phantom(
            ev.dlp_mgy_cm, measured_in=phantom, wanted=k.phantom, diameter_cm=diameter
        )
        effective = k.k * dlp_for_k
    size_specific = basis = None
    if ev.ctdivol_mgy is not None and phantom is not None and diameter is not None:
        if region in ("head", "head_neck"):
            notes.append("SSDE not computed for the head (AAPM 204 covers the body only)")
        else:
            size_specific = ssde(ctdivol_mgy=ev.ctdivol_mgy, phantom=phantom, diameter_cm=diameter)
            which = "water-equivalent" if ev.water_equivalent_diameter_cm else "effective"
            basis = f"AAPM 204/220 from the {which} diameter {diameter:.1f} cm"
            if size_specific is None:
                notes.append(f"SSDE not computed: diameter {diameter:.1f} cm is outside AAPM 204's range")
                basis = None
    if size_specific is None and ev.reported_ssde_mgy is not None:
        size_specific, basis = ev.reported_ssde_mgy, "as reported in the dose SR"
    return EventDose(
        event_uid=ev.event_uid,
        region=region,
        ctdivol_mgy=ev.ctdivol_mgy,
        dlp_mgy_cm=ev.dlp_mgy_cm,
        phantom=phantom,
        phantom_assumed=assumed,
        k=k,
        dlp_for_k_mgy_cm=dlp_for_k,
        effective_dose_msv=effective,
        ssde_mgy=size_specific,
        ssde_basis=basis,
        estimated=estimated,
    )


def _rdsr_events(records: Sequence[DoseRecord]) -> tuple[list[CTEvent], float | None]:
    """CT events of all dose SRs of a study, each once (a study often holds the scanner's RDSR
    and a dose monitor's copy): deduplicated by Irradiation Event UID, and a report whose events
    without UID all repeat another report's is skipped."""
    events: list[CTEvent] = []
    seen_uids: set[str] = set()
    seen_values: set[tuple[Any, ...]] = set()
    totals: list[float] = []
    for record in records:
        new: list[CTEvent] = []
        for ev in record.ct_events:
            key = (ev.ctdivol_mgy, ev.dlp_mgy_cm, ev.phantom, ev.target_region_code)
            if (ev.event_uid and ev.event_uid in seen_uids) or (not ev.event_uid and key in seen_values):
                continue
            new.append(ev)
        if not new and record.ct_events:
            continue
        for ev in new:
            if ev.event_uid:
                seen_uids.add(ev.event_uid)
            seen_values.add((ev.ctdivol_mgy, ev.dlp_mgy_cm, ev.phantom, ev.target_region_code))
        events.extend(new)
        if record.dlp_total_mgy_cm is not None:
            totals.append(record.dlp_total_mgy_cm)
    return events, (sum(totals) if totals else None)


def _image_events(records: Sequence[DoseRecord], notes: list[str]) -> list[CTEvent]:
    """CT events estimated from per-image CTDIvol: images grouped by Irradiation Event UID when
    the headers carry it, else by series; DLP = mean CTDIvol x imaged length."""
    groups: dict[str, list[ImageDose]] = {}
    skipped_localizers = 0
    for record in records:
        image = record.image
        if image is None or image.ctdivol_mgy is None:
            continue
        if image.localizer:
            skipped_localizers += 1
            continue
        key = f"event:{image.event_uid}" if image.event_uid else f"series:{record.series_instance_uid}"
        groups.setdefault(key, []).append(image)
    candidates: list[tuple[CTEvent, float, float, bool]] = []
    for key, images in groups.items():
        ctdivol = sum(i.ctdivol_mgy or 0.0 for i in images) / len(images)
        zs = [z for i in images for z in (i.z_mm, i.z_end_mm) if z is not None]
        thick = [i.slice_thickness_mm for i in images if i.slice_thickness_mm]
        dws = [i.water_equivalent_diameter_cm for i in images if i.water_equivalent_diameter_cm]
        phantoms = {i.phantom for i in images if i.phantom is not None}
        dlp = None
        if zs:
            length_cm = (max(zs) - min(zs) + (sum(thick) / len(thick) if thick else 0.0)) / 10
            dlp = ctdivol * length_cm if length_cm > 0 else None
        event = CTEvent(
            event_uid=images[0].event_uid,
            ctdivol_mgy=ctdivol,
            dlp_mgy_cm=dlp,
            phantom=phantoms.pop() if len(phantoms) == 1 else None,
            water_equivalent_diameter_cm=sum(dws) / len(dws) if dws else None,
        )
        candidates.append((event, min(zs) if zs else 0.0, max(zs) if zs else 0.0, key.startswith("event:")))
    # Without event UIDs, several series are often reconstructions of one acquisition (thin and
    # thick slices, two kernels): same mean CTDIvol and overlapping z-ranges count once.
    kept: list[tuple[CTEvent, float, float, bool]] = []
    for cand in sorted(candidates, key=lambda c: -(c[0].dlp_mgy_cm or 0.0)):
        ev, lo, hi, by_uid = cand
        duplicate = not by_uid and any(
            not other_uid
            and abs((other.ctdivol_mgy or 0) - (ev.ctdivol_mgy or 0))
            <= 0.02 * max(other.ctdivol_mgy or 0, 1e-9)
            and min(hi, ohi) - max(lo, olo) >= 0.5 * max(hi - lo, 1e-9)
            for other, olo, ohi, other_uid in kept
        )
        if not duplicate:
            kept.append(cand)
    if skipped_localizers:
        notes.append(f"{skipped_localizers} localizer image(s) left out")
    if len(kept) < len(candidates):
        notes.append(f"{len(candidates) - len(kept)} series taken as reconstructions of another acquisition")
    return [ev for ev, *_ in kept]


def study_dose(
    records: Iterable[DoseRecord],
    *,
    age_at_exam_years: float | None,
    region: str | None,
    study_instance_uid: str = "",
    study_date: date | None = None,
) -> StudyDose:
    """One study's dose from its instances' records. The dose SR wins over image headers; the
    effective dose needs the region (from the SR's Target Region per event, else `region`) and
    the patient's age at the exam."""
    records = list(records)
    notes: list[str] = []
    if age_at_exam_years is not None and not (0 <= age_at_exam_years < 150):
        notes.append("age at the exam out of range: treated as unknown")
        age_at_exam_years = None
    rdsrs = [r for r in records if r.source == DoseSource.RDSR]
    ct_images = [r for r in records if r.source == DoseSource.IMAGE_CTDIVOL]
    dap_images = [r for r in records if r.source == DoseSource.IMAGE_DAP]
    uid = study_instance_uid or next((r.study_instance_uid for r in records if r.study_instance_uid), "")
    when = study_date or next((r.study_date for r in records if r.study_date), None)
    modality = next((r.modality for r in records if r.modality and r.modality != "SR"), "")
    band = age_band(age_at_exam_years) if age_at_exam_years is not None and age_at_exam_years >= 0 else None
    for record in records:
        notes.extend(record.problems)

    source: DoseSource | None = None
    method = ""
    events: list[CTEvent] = []
    dlp_reported = None
    estimated = False
    if any(r.ct_events or r.dlp_total_mgy_cm is not None for r in rdsrs):
        source, method = DoseSource.RDSR, "CT Radiation Dose SR (TID 10011)"
        events, dlp_reported = _rdsr_events([r for r in rdsrs if r.ct_events or r.dlp_total_mgy_cm])
        modality = modality or "CT"
        if events and not any(ev.dlp_mgy_cm is not None for ev in events) and dlp_reported is not None:
            # No event states its DLP: the reported total stands for one event of the study's region.
            phantoms = {ev.phantom for ev in events if ev.phantom}
            regions = {ev.target_region for ev in events}
            events = [
                CTEvent(
                    dlp_mgy_cm=dlp_reported,
                    phantom=phantoms.pop() if len(phantoms) == 1 else None,
                    target_region=regions.pop() if len(regions) == 1 else None,
                )
            ]
            notes.append("events carry no DLP: the reported DLP total (113813) is used")
        elif not events and dlp_reported is not None:
            events = [CTEvent(dlp_mgy_cm=dlp_reported)]
            notes.append("no irradiation events: the reported DLP total (113813) is used")
    elif ct_images:
        source, method = DoseSource.IMAGE_CTDIVOL, "per-image CTDIvol (0018,9345); DLP estimated"
        events = _image_events(ct_images, notes)
        estimated = True
        modality = modality or "CT"
        notes.append("DLP estimated as mean CTDIvol x imaged length: overranging is not counted")

    event_doses = [
        _event_dose(ev, region=region, age_years=age_at_exam_years, estimated=estimated, notes=notes)
        for ev in events
    ]
    dlp_by_phantom: dict[Phantom, float] = {}
    for ed in event_doses:
        if ed.dlp_mgy_cm is not None and ed.phantom is not None:
            dlp_by_phantom[ed.phantom] = dlp_by_phantom.get(ed.phantom, 0.0) + ed.dlp_mgy_cm
    if any(ed.phantom_assumed for ed in event_doses):
        notes.append("phantom not stated: 16 cm assumed for the head, 32 cm for the rest")

    effective: float | None = None
    with_dlp = [ed for ed in event_doses if ed.dlp_mgy_cm is not None]
    if with_dlp:
        if age_at_exam_years is None:
            notes.append("effective dose not computed: age at the exam unknown")
        elif any(ed.k is None for ed in with_dlp):
            notes.append("effective dose not computed: body region unknown or without a k-factor")
        else:
            effective = sum(ed.effective_dose_msv or 0.0 for ed in with_dlp)

    # Projection X-ray: DAP from the dose SR (its total, else its events), else image headers.
    dap: float | None = None
    proj_rdsrs = [r for r in rdsrs if r.dap_total_gy_cm2 is not None or r.projection_events]
    if proj_rdsrs:
        seen: set[str] = set()
        total = 0.0
        for r in proj_rdsrs:
            if r.dap_total_gy_cm2 is not None:
                total += r.dap_total_gy_cm2
                continue
            for pe in r.projection_events:
                if pe.dap_gy_cm2 is None or (pe.event_uid and pe.event_uid in seen):
                    continue
                seen.add(pe.event_uid or "")
                total += pe.dap_gy_cm2
        dap = total
        if source is None:
            source, method = DoseSource.RDSR, "Projection X-Ray Radiation Dose SR (TID 10001)"
    elif dap_images:
        by_event: dict[str, float] = {}
        for r in dap_images:
            if r.image and r.image.dap_gy_cm2 is not None:
                by_event[r.image.event_uid or r.sop_instance_uid] = r.image.dap_gy_cm2
        dap = sum(by_event.values())
        if source is None:
            source, method = DoseSource.IMAGE_DAP, "Area Dose Product (0018,115E) of the image headers"
    if dap is not None and effective is None and not events:
        notes.append("no effective dose for projection radiography: DAP is shown as measured")
    if source is None:
        notes.append("no dose information in this study")

    return StudyDose(
        study_instance_uid=uid,
        study_date=when,
        modality=modality,
        age_at_exam_years=age_at_exam_years,
        age_band=band,
        region=normalize_region(region) if region else None,
        source=source,
        method=method,
        events=tuple(event_doses),
        ctdivol_per_event_mgy=tuple(ed.ctdivol_mgy for ed in event_doses if ed.ctdivol_mgy is not None),
        dlp_by_phantom_mgy_cm=dlp_by_phantom,
        dlp_total_reported_mgy_cm=dlp_reported,
        dap_total_gy_cm2=dap,
        effective_dose_msv=effective,
        k_table_version=k_table_version(),
        notes=tuple(dict.fromkeys(notes)),
    )


# -- Typical doses, repeats, 12 months ----------------------------------------------------------


class TypicalDose(_Model):
    modality: str
    region: str
    age_band: str
    effective_dose_msv: float
    source: str
    note: str | None = None


def typical_dose(*, modality: str, region: str, age_years: float) -> TypicalDose | None:
    """A documented typical effective dose for an examination and age, or None if none is known."""
    table = _table("typical_doses.json")
    mod = modality.strip().upper()
    mod = table["modality_aliases"].get(mod, mod)
    band = age_band(age_years)
    wanted = region.strip().lower().replace(" ", "_")
    for key in dict.fromkeys([wanted, normalize_region(region) or wanted]):
        for entry in table["entries"]:
            if entry["modality"] == mod and entry["region"] == key and entry["band"] == band:
                return TypicalDose(
                    modality=mod,
                    region=key,
                    age_band=band,
                    effective_dose_msv=float(entry["msv"]),
                    source=table["sources"][entry["source"]],
                    note=entry.get("note"),
                )
    return None


class RepeatCost(_Model):
    effective_dose_msv: float | None
    basis: str  # "prior" | "typical" | "unknown"
    detail: str


def repeat_cost(
    *, prior: StudyDose | None, modality: str, region: str, age_years: float | None
) -> RepeatCost:
    """What repeating the prior would cost: its own effective dose, else a typical one."""
    if prior is not None and prior.effective_dose_msv is not None:
        return RepeatCost(
            effective_dose_msv=prior.effective_dose_msv,
            basis="prior",
            detail=f"the prior's own dose ({prior.method})",
        )
    if age_years is None:
        return RepeatCost(
            effective_dose_msv=None, basis="unknown", detail="age unknown: no typical dose chosen"
        )
    typical = typical_dose(modality=modality, region=region, age_years=age_years)
    if typical is None:
        return RepeatCost(
            effective_dose_msv=None,
            basis="unknown",
            detail="no documented typical dose for this exam and age",
        )
    return RepeatCost(
        effective_dose_msv=typical.effective_dose_msv,
        basis="typical",
        detail=f"typical dose, {typical.source}" + (f" ({typical.note})" if typical.note else ""),
    )


class CumulativeDose(_Model):
    since: date
    until: date | None
    effective_dose_msv: float  # sum over the studies with an estimate
    studies_counted: int
    studies_without_estimate: tuple[str, ...]  # Study Instance UIDs
    complete: bool  # every study in the window had an estimate


def cumulative(doses: Iterable[StudyDose], *, since: date, until: date | None = None) -> CumulativeDose:
    """A person's effective dose over a window (the lookup passes 12 months), across facilities.

    A study known at several facilities (copies of one Study Instance UID) counts once; studies
    without a date are left out, since they cannot be placed in the window."""
    by_uid: dict[str, StudyDose] = {}
    anonymous: list[StudyDose] = []
    for dose in doses:
        if (
            dose.study_date is None
            or dose.study_date < since
            or (until is not None and dose.study_date > until)
        ):
            continue
        if not dose.study_instance_uid:
            anonymous.append(dose)
            continue
        known = by_uid.get(dose.study_instance_uid)
        if known is None or (known.effective_dose_msv is None and dose.effective_dose_msv is not None):
            by_uid[dose.study_instance_uid] = dose
    studies = [*by_uid.values(), *anonymous]
    counted = [d for d in studies if d.effective_dose_msv is not None]
    missing = tuple(d.study_instance_uid for d in studies if d.effective_dose_msv is None)
    return CumulativeDose(
        since=since,
        until=until,
        effective_dose_msv=sum(d.effective_dose_msv or 0.0 for d in counted),
        studies_counted=len(counted),
        studies_without_estimate=missing,
        complete=not missing,
    )


def age_at(*, birth_date: date, exam_date: date) -> float:
    """Age in years (fractional) at the exam."""
    return (exam_date - birth_date).days / 365.25


def parse_patient_age(value: str) -> float | None:
    """Patient's Age (0010,1010), an AS string like 005Y, 018M, 003W, 010D, in years."""
    text = (value or "").strip().upper()
    if len(text) != 4 or not text[:3].isdigit() or text[3] not in "DWMY":
        return None
    per_year = {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[text[3]]
    return int(text[:3]) / per_year
