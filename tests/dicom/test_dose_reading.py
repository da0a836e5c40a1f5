"""Dose read from the objects modalities send: CT and projection Radiation Dose SRs (checked with
dcmtk's dsrdump), CT images with CTDIvol, CR/DX images with DAP; from a pydicom Dataset and from
the DICOM JSON model the index keeps per instance."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from broker.dicom.dose import DoseRecord, DoseSource, Phantom, extract_dose, read_dose
from broker.dicom.json_model import instance_json
from broker.lookup.dose import study_dose
from tests.dicom.dose_builders import (
    ABDOMEN_PELVIS,
    BODY_PHANTOM,
    CHEST,
    CHEST_SRT,
    HEAD,
    HEAD_PHANTOM,
    SR,
    CTEventSpec,
    ct_rdsr,
    ct_series,
    dx_image,
    enhanced_ct,
    localizer,
    projection_rdsr,
    write,
)


def _json(ds: Dataset, tmp_path: Path) -> dict:
    """The instance as ingest stores it: written, read back, converted to the JSON model."""
    path = write(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm")
    return instance_json(dcmread(path), bulk_prefix="studies/x/series/y/instances/z")


def _head_and_chest() -> list[CTEventSpec]:
    return [
        CTEventSpec(ctdivol=0.2, dlp=4.0, region=CHEST, protocol="Scout"),
        CTEventSpec(ctdivol=45.0, dlp=720.0, phantom=HEAD_PHANTOM, region=HEAD, protocol="Head"),
        CTEventSpec(ctdivol=8.5, dlp=310.0, phantom=BODY_PHANTOM, region=CHEST, protocol="Chest"),
    ]


def test_ct_rdsr_is_read_event_by_event(tmp_path: Path) -> None:
    specs = _head_and_chest()
    ds = ct_rdsr(specs)
    record = extract_dose(dcmread(write(ds, tmp_path / "rdsr.dcm")))
    assert record is not None and record.source == DoseSource.RDSR
    assert [(e.ctdivol_mgy, e.dlp_mgy_cm, e.phantom, e.target_region) for e in record.ct_events] == [
        (0.2, 4.0, Phantom.BODY_32, "chest"),
        (45.0, 720.0, Phantom.HEAD_16, "head"),
        (8.5, 310.0, Phantom.BODY_32, "chest"),
    ]
    assert [e.event_uid for e in record.ct_events] == [s.uid for s in specs]
    assert record.dlp_total_mgy_cm == pytest.approx(1034.0)
    assert record.event_count_reported == 3
    assert record.study_instance_uid == ds.StudyInstanceUID
    assert record.problems == ()


def test_the_json_model_gives_the_same_record_as_the_dataset(tmp_path: Path) -> None:
    ds = ct_rdsr(_head_and_chest())
    assert extract_dose(_json(ds, tmp_path)) == extract_dose(ds)


def test_a_stored_record_round_trips_through_json() -> None:
    record = extract_dose(ct_rdsr(_head_and_chest()))
    assert record is not None
    assert DoseRecord.model_validate(record.model_dump(mode="json")) == record


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk's dsrdump is not installed")
def test_dsrdump_reads_the_built_rdsr_and_agrees_with_us(tmp_path: Path) -> None:
    """dcmtk parses our RDSR as an X-Ray Radiation Dose SR without an error, and the coded
    values it prints are the ones we extract."""
    ds = ct_rdsr(_head_and_chest())
    path = write(ds, tmp_path / "rdsr.dcm")
    done = subprocess.run(
        ["dsrdump", "+Pc", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "E:" not in done.stderr and "F:" not in done.stderr, done.stderr
    assert done.stdout.startswith("X-Ray Radiation Dose SR Document")
    dumped = {
        code: [float(v) for v in re.findall(rf'NUM:\({code},DCM,"[^"]*"\)="([^"]+)"', done.stdout)]
        for code in ("113830", "113838", "113813")
    }
    record = extract_dose(ds)
    assert record is not None
    assert dumped["113830"] == [e.ctdivol_mgy for e in record.ct_events]
    assert dumped["113838"] == [e.dlp_mgy_cm for e in record.ct_events]
    assert dumped["113813"] == [record.dlp_total_mgy_cm]
    assert re.findall(r'CODE:\(113835,DCM,"[^"]*"\)=\((\d+),DCM', done.stdout) == [
        "113691",
        "113690",
        "113691",
    ]


def _scrambled(value: str, scheme: str, meaning: str) -> str:
    """Code meanings as some vendors write them: swapped (CTDIvol and DLP), localised, or junk."""
    wrong = {"113830": "DLP", "113838": "Mean CTDIvol", "113813": "PDL total", "113835": "Fantôme"}
    return wrong.get(value, f"Libellé {value}")


def test_codes_not_meanings_decide(tmp_path: Path) -> None:
    plain = extract_dose(ct_rdsr(_head_and_chest()))
    specs = _head_and_chest()
    scrambled = ct_rdsr(specs, meaning=_scrambled)
    record = extract_dose(_json(scrambled, tmp_path))
    assert record is not None and plain is not None
    assert [(e.ctdivol_mgy, e.dlp_mgy_cm, e.phantom) for e in record.ct_events] == [
        (e.ctdivol_mgy, e.dlp_mgy_cm, e.phantom) for e in plain.ct_events
    ]
    assert record.dlp_total_mgy_cm == plain.dlp_total_mgy_cm
    assert [e.dlp_mgy_cm for e in record.ct_events] == [4.0, 720.0, 310.0]


def test_a_decoy_with_the_right_meaning_but_another_code_is_ignored() -> None:
    """A private item named "DLP" under a private code must not be read as the DLP."""
    sr = SR()
    decoy = sr.num(("99001", "99ACME", "DLP"), 99999.0, "mGy.cm")
    ds = ct_rdsr([CTEventSpec(dlp=300.0)])
    ds.ContentSequence[-2].ContentSequence[-1].ContentSequence.insert(0, decoy)  # inside CT Dose
    record = extract_dose(ds)
    assert record is not None
    assert [e.dlp_mgy_cm for e in record.ct_events] == [300.0]


def test_legacy_srt_target_region_maps_like_snomed() -> None:
    record = extract_dose(ct_rdsr([CTEventSpec(region=CHEST_SRT), CTEventSpec(region=ABDOMEN_PELVIS)]))
    assert record is not None
    assert [e.target_region for e in record.ct_events] == ["chest", "abdomen_pelvis"]
    assert record.ct_events[0].target_region_code == "SRT:T-D3000"


def test_region_table_agrees_with_pydicom_and_reading_dose_leaves_pydicom_sr_unloaded() -> None:
    """The SCT/SRT pairs are pydicom's own mapping, written out: importing `pydicom.sr` costs
    every process that reads dose (the server, each parse worker) ~15 MB of heap."""
    import sys

    from pydicom.sr.coding import Code

    from broker.dicom.dose import _REGIONS

    for (scheme, value), region in _REGIONS.items():
        same = [r for (sch, v), r in _REGIONS.items() if Code(v, sch, "") == Code(value, scheme, "")]
        assert set(same) == {region}
    probe = "import sys, broker.index.parse, broker.dicom.dose; print('pydicom.sr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sr_without_dlp_total_sums_the_events() -> None:
    record = extract_dose(ct_rdsr(_head_and_chest(), dlp_total=None))
    assert record is not None and record.dlp_total_mgy_cm is None
    dose = study_dose([record], age_at_exam_years=40, region=None)
    assert dose.dlp_by_phantom_mgy_cm == {Phantom.HEAD_16: 720.0, Phantom.BODY_32: 314.0}
    assert dose.effective_dose_msv == pytest.approx(0.0021 * 720 + 0.0140 * 314)
    assert dose.ctdivol_per_event_mgy == (0.2, 45.0, 8.5)


def test_events_without_dlp_fall_back_to_the_reported_total() -> None:
    record = extract_dose(
        ct_rdsr([CTEventSpec(dlp=None, region=HEAD, phantom=HEAD_PHANTOM)], dlp_total=650.0)
    )
    assert record is not None
    dose = study_dose([record], age_at_exam_years=1, region=None)
    assert dose.effective_dose_msv == pytest.approx(0.0067 * 650.0)
    assert any("113813" in n for n in dose.notes)


def test_a_child_body_rdsr_in_the_32cm_phantom(tmp_path: Path) -> None:
    """A 5-year-old's abdomen on a scanner reporting the 32 cm phantom: E uses twice the DLP."""
    record = extract_dose(
        _json(ct_rdsr([CTEventSpec(ctdivol=3.0, dlp=90.0, region=ABDOMEN_PELVIS)]), tmp_path)
    )
    assert record is not None
    dose = study_dose([record], age_at_exam_years=5.2, region="abdomen")
    assert dose.effective_dose_msv == pytest.approx(0.0200 * 90.0 * 2.0)
    assert dose.dlp_by_phantom_mgy_cm == {Phantom.BODY_32: 90.0}


def test_water_equivalent_diameter_from_the_sr_gives_ssde() -> None:
    record = extract_dose(ct_rdsr([CTEventSpec(ctdivol=10.0, water_equivalent_diameter_cm=24.0)]))
    assert record is not None
    assert record.ct_events[0].water_equivalent_diameter_cm == pytest.approx(24.0)  # written in mm
    dose = study_dose([record], age_at_exam_years=40, region="chest")
    assert dose.events[0].ssde_mgy == pytest.approx(15.35, abs=0.01)


def test_a_diameter_named_by_its_method_code_is_read_too() -> None:
    aapm220 = ("113987", "DCM", "AAPM 220")
    spec = CTEventSpec(ctdivol=10.0, water_equivalent_diameter_cm=24.0, diameter_concept=aapm220)
    record = extract_dose(ct_rdsr([spec]))
    assert record is not None
    assert record.ct_events[0].water_equivalent_diameter_cm == pytest.approx(24.0)


def test_the_scanners_rdsr_and_a_dose_monitors_copy_count_once() -> None:
    specs = _head_and_chest()
    study = generate_uid()
    first, copy = ct_rdsr(specs, study_uid=study), ct_rdsr(specs, study_uid=study)
    records = [extract_dose(first), extract_dose(copy)]
    dose = study_dose([r for r in records if r], age_at_exam_years=40, region=None)
    assert len(dose.events) == 3
    assert dose.dlp_total_reported_mgy_cm == pytest.approx(1034.0)


@pytest.mark.parametrize(
    ("value", "unit"),
    [
        (2.5e-4, "Gy.m2"),
        (250.0, "uGy.m2"),
        (25.0, "dGy.cm2"),
        (2500.0, "mGy.cm2"),
        (2.5, "Gy.cm2"),
        (250.0, "cGy.cm2"),
    ],
)
def test_dap_units_are_converted_by_ucum_code(value: float, unit: str, tmp_path: Path) -> None:
    record = extract_dose(_json(projection_rdsr(dap_total=(value, unit)), tmp_path))
    assert record is not None
    assert record.dap_total_gy_cm2 == pytest.approx(2.5)
    assert study_dose([record], age_at_exam_years=30, region="chest").dap_total_gy_cm2 == pytest.approx(2.5)


def test_projection_rdsr_without_total_sums_its_events() -> None:
    record = extract_dose(projection_rdsr(dap_total=None, events=[(1e-4, "Gy.m2"), (50.0, "uGy.m2")]))
    assert record is not None and record.dap_total_gy_cm2 is None
    assert study_dose([record], age_at_exam_years=30, region=None).dap_total_gy_cm2 == pytest.approx(1.5)


def test_garbage_values_are_left_out_with_a_reason(tmp_path: Path) -> None:
    specs = [
        CTEventSpec(ctdivol="abc", dlp=300.0),
        CTEventSpec(ctdivol=10.0, dlp="-5"),
        CTEventSpec(ctdivol=10.0, dlp=200.0, dlp_unit="[ft_i]"),
        CTEventSpec(ctdivol=12.0, dlp=400.0),
    ]
    ds = ct_rdsr(specs, dlp_total=None)
    for source in (ds, dcmread(write(ds, tmp_path / "garbage.dcm"))):
        record = extract_dose(source)
        assert record is not None
        assert [e.dlp_mgy_cm for e in record.ct_events] == [300.0, None, None, 400.0]
        assert record.ct_events[0].ctdivol_mgy is None
        assert any("not a number" in p for p in record.problems)
        assert any("negative" in p for p in record.problems)
        assert any("[ft_i]" in p for p in record.problems)
        dose = study_dose([record], age_at_exam_years=30, region="chest")
        assert dose.dlp_by_phantom_mgy_cm == {Phantom.BODY_32: 700.0}


def test_bad_units_and_negative_values_in_the_json_model(tmp_path: Path) -> None:
    specs = [CTEventSpec(dlp="-5"), CTEventSpec(dlp=200.0, dlp_unit="[ft_i]"), CTEventSpec(dlp=400.0)]
    record = extract_dose(_json(ct_rdsr(specs, dlp_total=None), tmp_path))
    assert record is not None
    assert [e.dlp_mgy_cm for e in record.ct_events] == [None, None, 400.0]


def test_an_unconvertible_number_in_the_json_model_is_a_clear_reason(tmp_path: Path) -> None:
    """The JSON model keeps a content tree item by item, so one NumericValue that is not a number
    costs only that value: the rest of the event is read, and the problem names the concept."""
    extraction = read_dose(_json(ct_rdsr([CTEventSpec(ctdivol="abc")]), tmp_path))
    assert extraction.record is not None
    assert "113830: value is not a number" in extraction.record.problems


def test_garbage_in_the_file_itself_does_not_crash(tmp_path: Path) -> None:
    """A NumericValue that is not a decimal string in the stored bytes."""
    ds = ct_rdsr([CTEventSpec(ctdivol="1O.5", dlp="3OO")], dlp_total=None)
    record = extract_dose(dcmread(write(ds, tmp_path / "bad.dcm")))
    extraction = read_dose(dcmread(tmp_path / "bad.dcm"))
    assert record is None
    assert extraction.reason is not None and "not a number" in extraction.reason


def test_objects_without_dose_say_why() -> None:
    other_sr = Dataset()
    other_sr.Modality = "SR"
    other_sr.ConceptNameCodeSequence = [SR().code(("126000", "DCM", "Imaging Measurement Report"))]
    other_sr.ContentSequence = []
    assert "not an X-Ray Radiation Dose Report" in (read_dose(other_sr).reason or "")
    mr = Dataset()
    mr.Modality = "MR"
    assert read_dose(mr).record is None and read_dose(mr).reason
    assert read_dose("not a dataset").reason  # type: ignore[arg-type]
    assert read_dose({"00080060": {"vr": "CS", "Value": ["CT"]}}).reason == "CT image without CTDIvol"


def test_per_image_ctdivol_fallback(tmp_path: Path) -> None:
    """No RDSR: 20 images 5 mm apart with CTDIvol 10 mGy give about 10 x 10 cm = 100 mGy.cm;
    a thin-slice reconstruction of the same acquisition and the localizer do not add to it."""
    study = generate_uid()
    thick = ct_series(
        count=20, ctdivol=10.0, spacing_mm=5.0, study_uid=study, water_equivalent_diameter_mm=250.0
    )
    thin = ct_series(count=96, ctdivol=10.0, spacing_mm=1.0, start_mm=-2.0, study_uid=study)
    objects = [*thick, *thin, localizer(study_uid=study)]
    records = [extract_dose(_json(ds, tmp_path)) for ds in objects]
    assert all(r is not None and r.source == DoseSource.IMAGE_CTDIVOL for r in records)
    dose = study_dose([r for r in records if r], age_at_exam_years=40, region="abdomen")
    assert dose.source == DoseSource.IMAGE_CTDIVOL
    assert len(dose.events) == 1
    assert dose.dlp_by_phantom_mgy_cm[Phantom.BODY_32] == pytest.approx(100.0)
    assert dose.effective_dose_msv == pytest.approx(0.015 * 100.0)
    assert dose.events[0].estimated
    assert dose.events[0].ssde_mgy == pytest.approx(10.0 * 3.704369 * 2.718281828 ** (-0.03671937 * 25.0))
    assert any("localizer" in n for n in dose.notes)
    assert any("reconstructions" in n for n in dose.notes)


@pytest.mark.parametrize("per_frame", [True, False], ids=["per-frame", "shared"])
def test_enhanced_ct_reads_ctdivol_from_functional_groups(per_frame: bool, tmp_path: Path) -> None:
    """50 frames 2 mm apart, CTDIvol 12 mGy on average: about 12 x 10 cm = 120 mGy.cm."""
    ds = enhanced_ct(
        frames=50, ctdivol=12.0, spacing_mm=2.0, study_uid=generate_uid(), per_frame_ctdivol=per_frame
    )
    for source in (ds, _json(ds, tmp_path)):
        record = extract_dose(source)
        assert record is not None and record.image is not None
        assert record.image.ctdivol_mgy == pytest.approx(12.0)
        dose = study_dose([record], age_at_exam_years=40, region="chest")
        (phantom,) = dose.dlp_by_phantom_mgy_cm
        assert dose.dlp_by_phantom_mgy_cm[phantom] == pytest.approx(120.0)
        assert (phantom == Phantom.BODY_32) and (dose.events[0].phantom_assumed is not per_frame)


def test_per_image_fallback_groups_by_irradiation_event_uid() -> None:
    study = generate_uid()
    arterial, venous = generate_uid(), generate_uid()
    images = [
        *ct_series(count=10, ctdivol=10.0, study_uid=study, event_uid=arterial),
        *ct_series(count=10, ctdivol=10.0, study_uid=study, event_uid=venous),
        *ct_series(count=50, ctdivol=10.0, spacing_mm=1.0, study_uid=study, event_uid=venous),
    ]
    dose = study_dose([r for ds in images if (r := extract_dose(ds))], age_at_exam_years=40, region="abdomen")
    assert len(dose.events) == 2  # two phases, the second reconstructed twice


def test_the_rdsr_wins_over_image_headers() -> None:
    study = generate_uid()
    records = [extract_dose(ds) for ds in ct_series(count=5, ctdivol=99.0, study_uid=study)]
    records.append(extract_dose(ct_rdsr([CTEventSpec(ctdivol=10.0, dlp=300.0)], study_uid=study)))
    dose = study_dose([r for r in records if r], age_at_exam_years=40, region="chest")
    assert dose.source == DoseSource.RDSR
    assert dose.ctdivol_per_event_mgy == (10.0,)


def test_dap_from_dx_headers_in_dgy_cm2(tmp_path: Path) -> None:
    study = generate_uid()
    pa, lateral = generate_uid(), generate_uid()
    images = [
        dx_image(dap_dgy_cm2=1.2, study_uid=study, event_uid=pa),
        dx_image(dap_dgy_cm2=2.3, study_uid=study, event_uid=lateral),
        dx_image(dap_dgy_cm2=2.3, study_uid=study, event_uid=lateral),  # for-processing copy
    ]
    records = [extract_dose(_json(ds, tmp_path)) for ds in images]
    assert records[0] is not None and records[0].image is not None
    assert records[0].image.dap_gy_cm2 == pytest.approx(0.12)
    dose = study_dose([r for r in records if r], age_at_exam_years=30, region="chest")
    assert dose.source == DoseSource.IMAGE_DAP
    assert dose.dap_total_gy_cm2 == pytest.approx(0.35)
    assert dose.effective_dose_msv is None
    assert any("projection radiography" in n for n in dose.notes)
    bad = read_dose(dx_image(dap_dgy_cm2="n/a", study_uid=study))
    assert bad.record is None and "0018,115E" in (bad.reason or "")


def _mutations(node: object, rng: random.Random) -> object:
    """A copy of a JSON model with some values deleted or replaced by values of the wrong type."""
    junk = [None, "", "x", -1, 1e308, float("nan"), [], {}, [None], {"vr": "SQ"}, {"Value": "notalist"}]
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            roll = rng.random()
            if roll < 0.03:
                continue
            out[key] = rng.choice(junk) if roll < 0.06 else _mutations(value, rng)
        return out
    if isinstance(node, list):
        return [rng.choice(junk) if rng.random() < 0.03 else _mutations(v, rng) for v in node]
    return node


def test_mangled_json_models_never_raise(tmp_path: Path) -> None:
    """Whatever a peer's index hands us, reading dose answers a record or a reason."""
    models = [
        _json(ct_rdsr(_head_and_chest()), tmp_path),
        _json(projection_rdsr(dap_total=(2.5e-4, "Gy.m2"), events=[(1e-4, "Gy.m2")]), tmp_path),
        _json(ct_series(count=1, ctdivol=10.0, study_uid=generate_uid())[0], tmp_path),
        _json(dx_image(dap_dgy_cm2=1.0, study_uid=generate_uid()), tmp_path),
    ]
    rng = random.Random(20261205)
    outcomes = {"record": 0, "reason": 0}
    for _ in range(300):
        extraction = read_dose(_mutations(rng.choice(models), rng))  # type: ignore[arg-type]
        assert (extraction.record is None) != (extraction.reason is None)
        outcomes["record" if extraction.record else "reason"] += 1
        if extraction.record is not None:
            study_dose(
                [extraction.record], age_at_exam_years=rng.choice([None, 0.2, 7.0, 40.0]), region="chest"
            )
    assert outcomes["record"] and outcomes["reason"]
