"""Radiation dose in the demo data, recorded the way real modalities record it.

CT studies carry a CT Radiation Dose SR (TID 10011) that dcmtk reads; the values a dose lookup
needs are found by concept code alone; every CT image's CTDIvol matches the acquisition it came
from; children get less dose than adults; radiographs carry their dose-area product; and the
reports load through ingest like any other instance.
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlmodel import Session

from broker.app import build_state
from broker.demo import synth
from broker.demo.service import load_demo
from broker.deps import AppState
from broker.index import service as index
from broker.settings import Settings
from tests.peers import PeerError, dcmtk

RDSR_CLASS = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR Storage
# dcmtk 3.6.7 cannot check string values in UTF-8; it says so once per UTF-8 file.
DCMTK_UTF8_NOTICE = "W: The VR checker does not support this Specific Character Set: ISO_IR 192"

Concept = tuple[str, str]  # (CodingSchemeDesignator, CodeValue): what a reader may match on
REPORT: Concept = ("DCM", "113701")
ACCUMULATED: Concept = ("DCM", "113811")
EVENT_COUNT: Concept = ("DCM", "113812")
DLP_TOTAL: Concept = ("DCM", "113813")
ACQUISITION: Concept = ("DCM", "113819")
ACQUISITION_TYPE: Concept = ("DCM", "113820")
EVENT_UID: Concept = ("DCM", "113769")
TARGET_REGION: Concept = ("DCM", "123014")
CT_DOSE: Concept = ("DCM", "113829")
CTDIVOL: Concept = ("DCM", "113830")
DLP: Concept = ("DCM", "113838")
PHANTOM: Concept = ("DCM", "113835")
LOCALIZER: Concept = ("DCM", "113805")  # Constant Angle Acquisition
HEAD_PHANTOM: Concept = ("DCM", "113690")
BODY_PHANTOM: Concept = ("DCM", "113691")
HEAD: Concept = ("SCT", "69536005")


# --- reading an SR by concept code (independent of the generator's own code) ----------------------


def _concept(item: Dataset) -> Concept:
    code = item.ConceptNameCodeSequence[0]
    return code.CodingSchemeDesignator, code.CodeValue


def _value_code(item: Dataset) -> Concept:
    code = item.ConceptCodeSequence[0]
    return code.CodingSchemeDesignator, code.CodeValue


def _children(parent: Dataset, concept: Concept) -> list[Dataset]:
    return [item for item in parent.get("ContentSequence", []) if _concept(item) == concept]


def _one(parent: Dataset, concept: Concept) -> Dataset:
    (found,) = _children(parent, concept)
    return found


def _walk(parent: Dataset) -> Iterator[Dataset]:
    for item in parent.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def _num(item: Dataset) -> tuple[float, Concept]:
    """(value, unit) of a NUM content item."""
    assert item.ValueType == "NUM"
    measured = item.MeasuredValueSequence[0]
    unit = measured.MeasurementUnitsCodeSequence[0]
    return float(measured.NumericValue), (unit.CodingSchemeDesignator, unit.CodeValue)


def _dlp_total(sr: Dataset) -> float:
    value, unit = _num(_one(_one(sr, ACCUMULATED), DLP_TOTAL))
    assert unit == ("UCUM", "mGy.cm")
    return value


def _age_years(patient_age: str) -> float:
    n, unit = int(patient_age[:3]), patient_age[3]
    return n / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[unit]


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reports(demo: list[tuple[str, Dataset, bytes]]) -> list[tuple[Dataset, bytes]]:
    return [(ds, data) for _, ds, data in demo if ds.Modality == "SR"]


@pytest.fixture(scope="module")
def ct_images(demo: list[tuple[str, Dataset, bytes]]) -> dict[str, list[Dataset]]:
    by_study: dict[str, list[Dataset]] = defaultdict(list)
    for _, ds, _ in demo:
        if ds.Modality == "CT":
            by_study[ds.StudyInstanceUID].append(ds)
    return by_study


# --- tests ------------------------------------------------------------------------------------------


def test_every_ct_study_has_one_dose_report_in_a_series_of_its_own(
    reports: list[tuple[Dataset, bytes]], ct_images: dict[str, list[Dataset]]
) -> None:
    assert len(reports) >= 20
    by_study = defaultdict(list)
    for _, data in reports:
        read = pydicom.dcmread(io.BytesIO(data))
        assert (read.SOPClassUID, read.file_meta.MediaStorageSOPClassUID) == (RDSR_CLASS, RDSR_CLASS)
        assert read.Modality == "SR" and read.ValueType == "CONTAINER"
        assert _concept(read) == REPORT
        template = read.ContentTemplateSequence[0]
        assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "10011")
        by_study[read.StudyInstanceUID].append(read)
    assert set(by_study) == set(ct_images)
    for study_uid, (sr,) in by_study.items():
        images = ct_images[study_uid]
        assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in images}
        assert (sr.PatientID, sr.AccessionNumber) == (images[0].PatientID, images[0].AccessionNumber)


def test_dsrdump_reads_each_report_and_shows_its_dlp_total(
    tmp_path: Path, reports: list[tuple[Dataset, bytes]]
) -> None:
    for n, (sr, data) in enumerate(reports):
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(data)
        done = dcmtk("dsrdump", "+U8", "+Pc", path)  # raises on a parse error, with its reason
        complaints = [line for line in done.stderr.splitlines() if line and line != DCMTK_UTF8_NOTICE]
        assert complaints == [], complaints
        total = _one(_one(sr, ACCUMULATED), DLP_TOTAL).MeasuredValueSequence[0].NumericValue
        shown = re.search(r'\(113813,DCM,"[^"]*"\)="([^"]+)" \(mGy\.cm,UCUM,', done.stdout)
        assert shown is not None, done.stdout[:2000]
        assert float(shown.group(1)) == pytest.approx(float(total)) and float(total) > 0
    # The check bites: a DLP total without its unit is refused.
    broken = pydicom.dcmread(io.BytesIO(reports[0][1]))
    del _one(_one(broken, ACCUMULATED), DLP_TOTAL).MeasuredValueSequence[0].MeasurementUnitsCodeSequence
    broken.save_as(tmp_path / "broken.dcm")
    with pytest.raises(PeerError, match="MeasurementUnitsCodeSequence"):
        dcmtk("dsrdump", tmp_path / "broken.dcm")


def test_dose_values_are_found_by_concept_code_with_ucum_units(reports: list[tuple[Dataset, bytes]]) -> None:
    phantoms = set()
    for _, data in reports:
        sr = pydicom.dcmread(io.BytesIO(data))
        for item in _walk(sr):
            if item.ValueType == "NUM":
                assert _num(item)[1][0] == "UCUM"
        events, unit = _num(_one(_one(sr, ACCUMULATED), EVENT_COUNT))
        acquisitions = _children(sr, ACQUISITION)
        assert unit == ("UCUM", "{events}") and events == len(acquisitions) >= 2
        dlps = []
        for acq in acquisitions:
            assert _one(acq, EVENT_UID).UID
            assert _value_code(_one(acq, TARGET_REGION))[0] == "SCT"
            doses = _children(acq, CT_DOSE)
            if _value_code(_one(acq, ACQUISITION_TYPE)) == LOCALIZER:
                assert doses == []  # a localizer reports no CTDIvol (TID 10013)
                continue
            (dose,) = doses
            ctdivol, ctdi_unit = _num(_one(dose, CTDIVOL))
            dlp, dlp_unit = _num(_one(dose, DLP))
            assert (ctdi_unit, dlp_unit) == (("UCUM", "mGy"), ("UCUM", "mGy.cm"))
            assert 0 < ctdivol < 100 and 0 < dlp < 2000
            phantom = _value_code(_one(dose, PHANTOM))
            assert phantom in (HEAD_PHANTOM, BODY_PHANTOM)
            assert (phantom == HEAD_PHANTOM) == (_value_code(_one(acq, TARGET_REGION)) == HEAD)
            phantoms.add(phantom)
            dlps.append(dlp)
        assert sum(dlps) == pytest.approx(_dlp_total(sr), abs=0.05)
    assert phantoms == {HEAD_PHANTOM, BODY_PHANTOM}


def test_each_ct_image_carries_the_ctdivol_of_its_acquisition(
    reports: list[tuple[Dataset, bytes]], ct_images: dict[str, list[Dataset]]
) -> None:
    checked = 0
    for sr, _ in reports:
        by_event = {}
        for acq in _children(sr, ACQUISITION):
            for dose in _children(acq, CT_DOSE):
                by_event[_one(acq, EVENT_UID).UID] = _num(_one(dose, CTDIVOL))[0]
        for image in ct_images[sr.StudyInstanceUID]:
            assert image["CTDIvol"].VR == "FD"
            assert image.CTDIvol == pytest.approx(by_event[image.IrradiationEventUID])
            checked += 1
    assert checked == sum(len(images) for images in ct_images.values())


def test_no_invented_dose_encoding_is_left(demo: list[tuple[str, Dataset, bytes]]) -> None:
    for _, ds, data in demo:
        assert "CommentsOnRadiationDose" not in ds
        assert b"DLP=" not in data


def test_children_of_every_age_band_have_a_ct_with_less_dose_than_adults(
    reports: list[tuple[Dataset, bytes]],
) -> None:
    ages = [_age_years(sr.PatientAge) for sr, _ in reports]
    bands = {"infant": (0, 1), "1 year": (1, 2), "5 years": (5, 6), "10 years": (10, 11), "teen": (13, 18)}
    for band, (low, high) in bands.items():
        assert any(low <= age < high for age in ages), f"no CT dose report for a child aged {band}"
    assert any(age >= 18 for age in ages)
    # In the demo itself: every child's head CT totals less DLP than any adult's.
    head = defaultdict(list)
    for sr, _ in reports:
        regions = {_value_code(_one(acq, TARGET_REGION)) for acq in _children(sr, ACQUISITION)}
        if regions == {HEAD}:
            head[_age_years(sr.PatientAge) >= 18].append(_dlp_total(sr))
    assert head[True] and head[False]
    assert max(head[False]) < min(head[True])


@pytest.mark.parametrize("body_part", ["HEAD", "CHEST", "ABDOMEN", "CSPINE"])
def test_same_region_same_day_a_child_gets_less_than_an_adult(body_part: str) -> None:
    base = synth.generate_patients(seed=3, count=1)[0]
    when = synth.REFERENCE_DATE

    def dose(age_days: int, height_cm: int, weight_kg: int) -> tuple[float, float]:
        born = when - timedelta(days=age_days)
        patient = dataclasses.replace(
            base, birth_date=f"{born:%Y%m%d}", height_cm=height_cm, weight_kg=weight_kg
        )
        *images, sr = synth.generate_study(rng_seed=9, patient=patient, modality="CT", n_series=1,
                                           n_instances_per_series=1, body_part=body_part, study_date=when,
                                           dose_report=True)  # fmt: skip
        assert sr.Modality == "SR" and images[0].BodyPartExamined == body_part
        return images[0].CTDIvol, _dlp_total(sr)

    infant, five = dose(150, 62, 6), dose(5 * 365 + 30, 110, 19)
    ten, adult = dose(10 * 365 + 30, 140, 33), dose(40 * 365, 176, 80)
    assert infant[0] < five[0] < adult[0] and ten[0] < adult[0]
    assert infant[1] < five[1] < adult[1] and ten[1] < adult[1]
    if body_part == "HEAD":  # plausible against published levels (see synth's dose model)
        assert 45 <= adult[0] <= 62 and 850 <= adult[1] <= 1100
        assert infant[1] < 385 and five[1] < 505 and ten[1] < 650
    if body_part == "ABDOMEN":
        assert 13 <= adult[0] <= 17 and 580 <= adult[1] <= 780


def test_projection_radiographs_carry_a_plausible_dose_area_product(
    demo: list[tuple[str, Dataset, bytes]], patients: list[synth.SynthPatient]
) -> None:
    radiographs = [ds for _, ds, _ in demo if ds.Modality in ("CR", "DX")]
    assert {ds.Modality for ds in radiographs} == {"CR", "DX"}
    for ds in radiographs:
        assert ds["ImageAndFluoroscopyAreaDoseProduct"].VR == "DS"
        assert 0 < float(ds.ImageAndFluoroscopyAreaDoseProduct) < 50  # dGy.cm2
    adult = next(p for p in patients if not p.is_child)
    child = next(p for p in patients if p.is_child)

    def dap(patient: synth.SynthPatient, body_part: str) -> float:
        ds = next(synth.generate_study(rng_seed=4, patient=patient, modality="DX", n_series=1,
                                       n_instances_per_series=1, body_part=body_part))  # fmt: skip
        return float(ds.ImageAndFluoroscopyAreaDoseProduct)

    # An adult chest is about 0.1 Gy.cm2 (1 dGy.cm2), a pelvis about 2 Gy.cm2 (UK NDRLs).
    assert 0.5 <= dap(adult, "CHEST") <= 2.0
    assert 10 <= dap(adult, "PELVIS") <= 30
    assert dap(child, "CHEST") < dap(adult, "CHEST")


@pytest.fixture
def state(settings: Settings) -> Iterator[AppState]:
    st = build_state(settings)
    yield st
    st.engine.dispose()


def test_load_demo_stores_the_dose_reports_like_any_other_instance(state: AppState) -> None:
    expected = {ds.SOPInstanceUID: (ds, synth.write_part10(ds)) for _, ds in synth.generate_demo(patients=12)}
    srs = {uid: item for uid, item in expected.items() if item[0].Modality == "SR"}
    assert srs

    counts = load_demo(engine=state.engine, store=state.store, patients=12)
    assert counts == {"stored": len(expected)}

    with Session(state.engine) as session:
        for uid, (ds, data) in srs.items():
            (ref,) = index.find_instances(session=session, study_uid=ds.StudyInstanceUID, sop_uid=uid)
            assert ref.sop_class_uid == RDSR_CLASS
            stored = b"".join(state.store.get(ref.object_key))
            assert stored == data
            assert _dlp_total(pydicom.dcmread(io.BytesIO(stored))) == _dlp_total(ds) > 0
    # Loading again stores nothing new.
    assert load_demo(engine=state.engine, store=state.store, patients=12) == {"duplicate": len(expected)}
