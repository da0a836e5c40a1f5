"""Dose arithmetic against the published tables: k-factors and effective dose per age band
(Shrimpton, as reprinted in Med Phys 2012;39:2129 Table XII), the phantom the table assumes,
SSDE (AAPM 204/220), typical doses, what a repeat costs and the 12-month cumulative dose."""

from __future__ import annotations

import math
from datetime import date

import pytest

from broker.dicom.dose import CTEvent, DoseRecord, DoseSource, Phantom
from broker.lookup.dose import (
    StudyDose,
    age_at,
    age_band,
    cumulative,
    k_factor,
    parse_patient_age,
    phantom_ratio,
    repeat_cost,
    ssde,
    study_dose,
    typical_dose,
)

# Med Phys 2012;39(4):2129, Table XII, rows "Shrimpton et al." (mSv per mGy.cm), columns
# 0, 1, 5, 10 years and adult; typed here from the table, independently of dose_data/.
TABLE_XII = {
    "head": (0.0110, 0.0067, 0.0040, 0.0032, 0.0021),
    "chest": (0.0390, 0.0260, 0.0180, 0.0130, 0.0140),
    "abdomen_pelvis": (0.0490, 0.0300, 0.0200, 0.0150, 0.0150),
    "trunk": (0.0440, 0.0280, 0.0190, 0.0140, 0.0150),
}
AGES = (0.1, 1.0, 5.0, 10.0, 40.0)  # one age inside each column's band
BANDS = ("newborn", "1y", "5y", "10y", "adult")


def _ct_study(
    dlp: float, phantom: Phantom | None, *, region: str | None = None, **event: float | str | None
) -> DoseRecord:
    return DoseRecord(
        study_instance_uid="1.2.3",
        source=DoseSource.RDSR,
        ct_events=(CTEvent(event_uid="1.2.3.4", ctdivol_mgy=10.0, dlp_mgy_cm=dlp, phantom=phantom, **event),),  # type: ignore[arg-type]
        dlp_total_mgy_cm=dlp,
    )


@pytest.mark.parametrize("region", sorted(TABLE_XII))
@pytest.mark.parametrize("column", range(5), ids=BANDS)
def test_k_factor_is_the_table_value(region: str, column: int) -> None:
    k = k_factor(region=region, age_years=AGES[column])
    assert k is not None
    assert k.age_band == BANDS[column]
    assert k.k == TABLE_XII[region][column]
    assert "Med Phys 2012" in k.source and "Table XII" in k.source


@pytest.mark.parametrize("column", range(5), ids=BANDS)
def test_head_effective_dose_is_k_times_dlp_in_the_16cm_phantom(column: int) -> None:
    dose = study_dose([_ct_study(500.0, Phantom.HEAD_16)], age_at_exam_years=AGES[column], region="head")
    assert dose.effective_dose_msv == pytest.approx(TABLE_XII["head"][column] * 500.0)
    assert dose.age_band == BANDS[column]
    assert dose.dlp_by_phantom_mgy_cm == {Phantom.HEAD_16: 500.0}


@pytest.mark.parametrize("region", ["chest", "abdomen_pelvis", "trunk"])
def test_adult_body_uses_the_32cm_dlp_as_reported(region: str) -> None:
    dose = study_dose([_ct_study(400.0, Phantom.BODY_32)], age_at_exam_years=40, region=region)
    assert dose.effective_dose_msv == pytest.approx(TABLE_XII[region][4] * 400.0)


@pytest.mark.parametrize("column", range(4), ids=BANDS[:4])
def test_child_body_scan_reported_in_the_32cm_phantom_is_referred_to_16cm(column: int) -> None:
    """The paediatric body coefficients assume DLP in the 16 cm phantom (Shrimpton & Wall
    2000); a scanner that reports the 32 cm phantom gives about half that DLP."""
    dose = study_dose([_ct_study(100.0, Phantom.BODY_32)], age_at_exam_years=AGES[column], region="chest")
    assert dose.effective_dose_msv == pytest.approx(TABLE_XII["chest"][column] * 100.0 * 2.0)
    (event,) = dose.events
    assert event.dlp_for_k_mgy_cm == pytest.approx(200.0)
    assert dose.dlp_by_phantom_mgy_cm == {Phantom.BODY_32: 100.0}  # shown as reported


def test_child_body_scan_already_in_16cm_is_not_converted() -> None:
    dose = study_dose([_ct_study(100.0, Phantom.HEAD_16)], age_at_exam_years=5, region="abdomen")
    assert dose.effective_dose_msv == pytest.approx(0.0200 * 100.0)


def test_adult_body_scan_reported_in_16cm_is_halved() -> None:
    dose = study_dose([_ct_study(600.0, Phantom.HEAD_16)], age_at_exam_years=30, region="chest")
    assert dose.effective_dose_msv == pytest.approx(0.0140 * 300.0)


def test_phantom_conversion_follows_the_patient_size_when_known() -> None:
    """f32(D)/f16(D) from the AAPM 204 fits: 3.704369 e^-0.03671937D / 1.874799 e^-0.03871313D."""
    expected = (3.704369 * math.exp(-0.03671937 * 14)) / (1.874799 * math.exp(-0.03871313 * 14))
    assert phantom_ratio(14.0) == pytest.approx(expected)
    assert 2.0 < phantom_ratio(14.0) < 2.05
    dose = study_dose(
        [_ct_study(100.0, Phantom.BODY_32, water_equivalent_diameter_cm=14.0)],
        age_at_exam_years=5,
        region="chest",
    )
    assert dose.effective_dose_msv == pytest.approx(0.018 * 100.0 * expected)


def test_unstated_phantom_is_assumed_and_said() -> None:
    dose = study_dose([_ct_study(100.0, None)], age_at_exam_years=5, region="chest")
    assert dose.effective_dose_msv == pytest.approx(0.018 * 200.0)
    assert dose.events[0].phantom_assumed
    assert any("phantom not stated" in n for n in dose.notes)


@pytest.mark.parametrize(
    ("age", "band"),
    [(0.0, "newborn"), (0.49, "newborn"), (0.5, "1y"), (2.9, "1y"), (3.0, "5y"), (7.4, "5y"), (7.5, "10y"),
     (14.9, "10y"), (15.0, "adult"), (80.0, "adult")],
)  # fmt: skip
def test_age_bands(age: float, band: str) -> None:
    assert age_band(age) == band


def test_event_target_region_wins_over_the_study_region() -> None:
    """A head-and-chest study: each event gets the k of its own Target Region."""
    record = DoseRecord(
        source=DoseSource.RDSR,
        ct_events=(
            CTEvent(event_uid="1", dlp_mgy_cm=800.0, phantom=Phantom.HEAD_16, target_region="head"),
            CTEvent(event_uid="2", dlp_mgy_cm=300.0, phantom=Phantom.BODY_32, target_region="chest"),
        ),
    )
    dose = study_dose([record], age_at_exam_years=40, region="chest")
    assert dose.effective_dose_msv == pytest.approx(0.0021 * 800 + 0.0140 * 300)
    assert dose.dlp_by_phantom_mgy_cm == {Phantom.HEAD_16: 800.0, Phantom.BODY_32: 300.0}


def test_no_effective_dose_without_age_or_region_and_the_reason_is_given() -> None:
    no_age = study_dose([_ct_study(100.0, Phantom.BODY_32)], age_at_exam_years=None, region="chest")
    assert no_age.effective_dose_msv is None
    assert any("age" in n for n in no_age.notes)
    no_region = study_dose([_ct_study(100.0, Phantom.BODY_32)], age_at_exam_years=30, region=None)
    assert no_region.effective_dose_msv is None
    assert any("region" in n for n in no_region.notes)
    unknown = study_dose([_ct_study(100.0, Phantom.BODY_32)], age_at_exam_years=30, region="knee")
    assert unknown.effective_dose_msv is None
    born_later = study_dose([_ct_study(100.0, Phantom.BODY_32)], age_at_exam_years=-1, region="chest")
    assert born_later.effective_dose_msv is None
    assert any("out of range" in n for n in born_later.notes)


def test_ssde_uses_the_aapm204_fit_of_the_reported_phantom() -> None:
    assert ssde(ctdivol_mgy=10.0, phantom=Phantom.BODY_32, diameter_cm=24.0) == pytest.approx(
        10.0 * 3.704369 * math.exp(-0.03671937 * 24.0)
    )
    assert ssde(ctdivol_mgy=10.0, phantom=Phantom.HEAD_16, diameter_cm=12.0) == pytest.approx(
        10.0 * 1.874799 * math.exp(-0.03871313 * 12.0)
    )
    assert ssde(ctdivol_mgy=10.0, phantom=Phantom.BODY_32, diameter_cm=60.0) is None  # outside AAPM 204
    dose = study_dose(
        [_ct_study(300.0, Phantom.BODY_32, water_equivalent_diameter_cm=24.0)],
        age_at_exam_years=40,
        region="chest",
    )
    assert dose.events[0].ssde_mgy == pytest.approx(10.0 * 3.704369 * math.exp(-0.03671937 * 24.0))
    assert "water-equivalent" in (dose.events[0].ssde_basis or "")
    head = study_dose(
        [_ct_study(300.0, Phantom.HEAD_16, water_equivalent_diameter_cm=16.0)],
        age_at_exam_years=40,
        region="head",
    )
    assert head.events[0].ssde_mgy is None


def test_typical_doses_are_documented_per_exam_and_age() -> None:
    child_head = typical_dose(modality="CT", region="head", age_years=5)
    assert child_head is not None and child_head.effective_dose_msv == 2.4
    assert "Pediatr Radiol 2008" in child_head.source
    adult_chest = typical_dose(modality="CT", region="chest", age_years=50)
    assert adult_chest is not None and adult_chest.effective_dose_msv == 7
    assert "Radiology 2008" in adult_chest.source
    radiograph = typical_dose(modality="CR", region="chest", age_years=50)
    assert radiograph is not None and radiograph.effective_dose_msv == 0.1
    assert typical_dose(modality="CT", region="chest", age_years=5) is None  # no documented value


def test_repeat_costs_the_priors_own_dose_else_the_typical_one() -> None:
    prior = study_dose([_ct_study(500.0, Phantom.HEAD_16)], age_at_exam_years=5, region="head")
    own = repeat_cost(prior=prior, modality="CT", region="head", age_years=5)
    assert own.basis == "prior" and own.effective_dose_msv == pytest.approx(0.004 * 500)
    unknown_prior = StudyDose(study_instance_uid="9")
    typical = repeat_cost(prior=unknown_prior, modality="CT", region="head", age_years=1)
    assert typical.basis == "typical" and typical.effective_dose_msv == 3.6
    none = repeat_cost(prior=None, modality="CT", region="chest", age_years=5)
    assert none.basis == "unknown" and none.effective_dose_msv is None


def test_cumulative_dose_over_12_months_across_facilities() -> None:
    def study(uid: str, when: date, msv: float | None) -> StudyDose:
        return StudyDose(study_instance_uid=uid, study_date=when, effective_dose_msv=msv)

    doses = [
        study("1", date(2026, 3, 1), 4.0),
        study("1", date(2026, 3, 1), 4.0),  # the same study, also held at a second facility
        study("2", date(2026, 9, 1), 2.5),
        study("3", date(2025, 6, 1), 9.0),  # older than 12 months
        study("4", date(2026, 10, 1), None),  # no estimate: reported, not silently zero
    ]
    total = cumulative(doses, since=date(2025, 12, 5))
    assert total.effective_dose_msv == pytest.approx(6.5)
    assert total.studies_counted == 2
    assert total.studies_without_estimate == ("4",)
    assert not total.complete


def test_age_helpers() -> None:
    assert parse_patient_age("005Y") == 5
    assert parse_patient_age("018M") == 1.5
    assert parse_patient_age("5 years") is None
    assert age_at(birth_date=date(2021, 3, 1), exam_date=date(2026, 3, 1)) == pytest.approx(5.0, abs=0.01)
