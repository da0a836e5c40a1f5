"""Radiation dose of a study for the lookup: per-instance `DoseRecord`s (read at ingest by
`broker.dicom.dose`) summed per study into DLP by phantom, CTDIvol per event, DAP, effective dose
E = k x DLP (k by region and age band, DLP referred to the phantom the k table assumes) and SSDE.
`typical_dose`, `repeat_cost` and `cumulative` answer "what would a repeat cost" and "how much
has this person had in the last 12 months". Tables live in dose_data/ with their citations;
docs/dose.md explains every number.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from datetime import date
from functools import cache
from importlib import resources
from typing import Any

from broker.dicom.dose import (
    CTEvent,
    DoseRecord,
    DoseSource,
    ImageDose,
    Phantom,
    _Model,
)

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
