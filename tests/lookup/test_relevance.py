"""The relevance engine, rule by rule, as a clinician ordering an exam would notice it."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from broker.errors import BadRequest
from broker.lookup import vocabulary
from broker.lookup.relevance import interpret_exam, interpret_prior, judge
from broker.lookup.schemas import PriorFacts, ProcedureCode, SeriesFacts, Setting, Windows

NOW = date(2026, 12, 1)


def prior(desc: str | None, mod: str = "CT", days: int = 3, **kw: object) -> PriorFacts:
    return PriorFacts(study_date=NOW - timedelta(days=days), modalities=(mod,), study_description=desc, **kw)  # type: ignore[arg-type]


# -- what the exam really is -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "modality", "regions", "contrast"),
    [
        ("CT ABD/PEL W CONTRAST", "CT", ("ABDOMEN", "PELVIS"), "with"),
        ("CTAP", "CT", ("ABDOMEN", "PELVIS"), None),
        ("CT C/A/P W/O", "CT", ("CHEST", "ABDOMEN", "PELVIS"), "without"),
        ("CT NCAP", "CT", ("NECK", "CHEST", "ABDOMEN", "PELVIS"), None),
        ("CXR PA/LAT", "XR", ("CHEST",), None),
        ("XR HAND PA LAT", "XR", ("HAND",), None),
        ("XR KUB", "XR", ("ABDOMEN",), None),
        ("CT KUB", "CT", ("ABDOMEN", "PELVIS"), None),
        ("NCHCT", "CT", ("HEAD",), "without"),
        ("CTA H/N", "CT", ("HEAD", "NECK"), "with"),
        ("CTPA", "CT", ("CHEST",), "with"),
        ("VQ", "NM", ("LUNG",), None),
        ("MRCP", "MR", ("LIVER_BILIARY", "PANCREAS"), None),
        ("MRI BRAIN W & W/O CONTRAST", "MR", ("BRAIN",), "with_and_without"),
        ("CCTA", "CT", ("HEART",), "with"),
        ("PET/CT SKULL BASE TO MID-THIGH", "PT", ("NECK", "CHEST", "ABDOMEN", "PELVIS"), None),
        ("CT SPINE LUMBAR WO CONTRAST", "CT", ("LSPINE",), "without"),
        ("DEXA", "DXA", ("LSPINE", "HIP"), None),
    ],
)
def test_exam_text_is_read_as_radiology_writes_it(
    text: str, modality: str, regions: tuple[str, ...], contrast: str | None
) -> None:
    exam = interpret_exam(text=text)
    assert (exam.modality, exam.regions, exam.contrast) == (modality, regions, contrast)


@pytest.mark.parametrize(
    ("text", "regions"),
    [
        ("XR LOWER EXTREMITY KNEE RT", ("KNEE",)),
        ("US ABD LTD RUQ", ("LIVER_BILIARY",)),
        ("MR SPINE C T L", ("CSPINE", "TSPINE", "LSPINE")),
        ("CT ABDOMEN PELVIS LIVER PROTOCOL", ("ABDOMEN", "PELVIS", "LIVER_BILIARY")),
    ],
)
def test_a_named_part_is_the_target_of_its_collapsible_whole(text: str, regions: tuple[str, ...]) -> None:
    """XR LOWER EXTREMITY KNEE is a knee film; a liver-protocol CT A/P still covers the abdomen."""
    assert interpret_exam(text=text).regions == regions


def test_a_known_code_decides_and_its_description_refines() -> None:
    by_code = interpret_exam(code="73700")
    assert by_code.regions == ("LOWER_EXTREMITY",) and by_code.decided_by == "code"
    refined = interpret_exam(code="73700", text="CT KNEE LEFT WO")
    assert (refined.regions, refined.laterality, refined.decided_by) == (("KNEE",), "L", "code+text")
    assert interpret_exam(code="RPID145").regions == ("ABDOMEN", "PELVIS")
    assert interpret_exam(code="24627-2", code_system="LN").regions == ("CHEST",)


def test_an_unknown_code_falls_back_to_the_description_and_says_so() -> None:
    exam = interpret_exam(code="73721", text="MRI KNEE LEFT")
    assert exam.regions == ("KNEE",) and exam.decided_by == "text"
    assert any("73721" in n and "description" in n for n in exam.notes)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"text": ""}, "empty"),
        ({"text": "   "}, "empty"),
        ({"text": "asdf qwerty ???"}, "names no modality or body region"),
        ({"text": "CT"}, "names no body region"),
        ({"text": "CT WITH CONTRAST"}, "names no body region"),
        ({"code": "00000"}, "Unknown CPT code"),
        ({"code": "not-a-code"}, "Unknown procedure code"),
        ({"text": "CT HEAD " * 100}, "longer than"),
        ({"modality": "SPECTROGRAM", "body_part": "CHEST"}, "Unknown modality"),
    ],
)
def test_bad_planned_exam_is_a_bad_request_with_a_reason(kwargs: dict[str, str], reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        interpret_exam(**kwargs)


def test_a_prior_code_unknown_to_the_data_is_said_and_the_description_used() -> None:
    exam = interpret_prior(prior("CT HEAD WO", procedure_codes=(ProcedureCode("LOCAL123", "99LOCAL"),)))
    assert exam.regions == ("HEAD",)
    assert any("LOCAL123" in n and "description" in n for n in exam.notes)


def test_a_guidance_code_keeps_the_region_of_its_description() -> None:
    exam = interpret_exam(code="RPID2194", text="US GUIDED LIVER BIOPSY")
    assert exam.regions == ("LIVER_BILIARY",) and exam.is_guidance and exam.notes == ()


def test_modality_and_body_part_alone_name_an_exam() -> None:
    exam = interpret_exam(modality="MR", body_part="LSPINE")
    assert (exam.modality, exam.regions, exam.decided_by) == ("MR", ("LSPINE",), "body_part")


def test_a_prior_that_cannot_be_read_is_not_relevant_and_says_why() -> None:
    v = judge(interpret_exam(text="CT CHEST"), prior("%%%", mod="OT"), setting="ed", now=NOW)
    assert not v.relevant and v.rule == "prior_region_unknown"


# -- BodyPartExamined only when the text names no region --------------------------------------


def test_description_overrules_a_wrong_body_part_and_the_verdict_says_so() -> None:
    exam = interpret_prior(prior("CT HEAD WO", body_part_examined="ABDOMEN"))
    assert exam.regions == ("HEAD",)
    assert any("BodyPartExamined ABDOMEN disagrees" in n for n in exam.notes)
    assert interpret_prior(prior("CT", body_part_examined="ABDOMEN")).regions == ("ABDOMEN",)


# -- overlap, direction, own purpose, laterality ----------------------------------------------


def test_a_trunk_ct_covers_its_spine_but_not_the_reverse() -> None:
    lspine = interpret_exam(text="MR L-SPINE")
    ap = interpret_exam(text="CT A/P")
    forward = judge(lspine, prior("CT ABD/PELVIS W"), setting="outpatient", now=NOW)
    backward = judge(ap, prior("MR LUMBAR SPINE", mod="MR"), setting="outpatient", now=NOW)
    assert forward.relevant and forward.rule == "implied_coverage"
    assert forward.overlaps[0].implied and "ABDOMEN" in forward.reasons[1]
    assert not backward.relevant and backward.rule == "coverage_direction"


def test_siblings_do_not_overlap_and_parents_do_either_way() -> None:
    renal = interpret_exam(text="US RENAL")
    assert not judge(renal, prior("US RUQ", mod="US"), setting="ed", now=NOW).relevant
    assert judge(renal, prior("US ABDOMEN", mod="US"), setting="ed", now=NOW).relevant
    assert judge(
        interpret_exam(text="US ABDOMEN"), prior("US RENAL", mod="US"), setting="ed", now=NOW
    ).relevant


def test_lung_bases_on_an_abdomen_ct_do_not_count_for_a_chest_exam() -> None:
    v = judge(interpret_exam(text="CXR"), prior("CT ABDOMEN W"), setting="ed", now=NOW)
    assert not v.relevant and v.rule == "edge_only" and "lung bases" in v.reasons[1]


def test_head_and_face_are_neighbours() -> None:
    v = judge(interpret_exam(text="CT HEAD"), prior("CT SINUS"), setting="ed", now=NOW)
    assert not v.relevant and v.rule == "neighbour"


def test_heart_and_breast_are_targeted_only_by_their_own_exams() -> None:
    echo = interpret_exam(text="TTE")
    assert not judge(echo, prior("CT CHEST W"), setting="ed", now=NOW).relevant
    assert judge(echo, prior("MR CARDIAC", mod="MR"), setting="ed", now=NOW).relevant
    mammo = interpret_exam(text="MAMMO SCREENING BILATERAL")
    v = judge(mammo, prior("CT CHEST W"), setting="outpatient", now=NOW)
    assert not v.relevant and v.rule == "own_purpose"
    assert interpret_exam(text="CT CHEST BREAST CA STAGING").regions == ("CHEST",)


@pytest.mark.parametrize(
    ("planned", "desc", "attr", "relevant"),
    [
        ("MR KNEE LT", "XR KNEE RT", None, False),
        ("MR KNEE LT", "XR KNEE LT", None, True),
        ("MR KNEE LT", "XR KNEES BILAT", None, True),
        ("MR KNEE LT", "XR KNEE", None, True),
        ("MR KNEE LT", "XR KNEE", "R", False),
        ("MR KNEE LT", "XR KNEE LEFT", "R", True),  # text and attribute disagree: unknown, matches
        ("MR KNEE BILATERAL", "XR KNEE RT", None, True),
        ("MR KNEE", "XR KNEE RT", None, True),
    ],
)
def test_laterality_of_paired_parts(planned: str, desc: str, attr: str | None, relevant: bool) -> None:
    v = judge(interpret_exam(text=planned), prior(desc, mod="CR", laterality=attr), setting="ed", now=NOW)
    assert v.relevant is relevant, v.reasons
    if not relevant:
        assert v.rule == "laterality_mismatch"


def test_cross_modality_counts_except_dxa_and_guidance() -> None:
    head = interpret_exam(text="CT HEAD")
    assert judge(head, prior("MR BRAIN", mod="MR"), setting="ed", now=NOW).relevant
    dxa = interpret_exam(text="DXA")
    assert not judge(dxa, prior("XR L-SPINE", mod="CR"), setting="outpatient", now=NOW).relevant
    assert judge(dxa, prior("BONE DENSITY", mod="DX"), setting="outpatient", now=NOW).relevant
    liver = interpret_exam(text="CT LIVER")
    v = judge(liver, prior("US GUIDED LIVER BIOPSY", mod="US"), setting="outpatient", now=NOW)
    assert not v.relevant and v.rule == "guidance_prior"
    code_guided = PriorFacts(study_date=NOW, modalities=("CT",), procedure_codes=(ProcedureCode("RPID88"),))
    assert not judge(liver, code_guided, setting="outpatient", now=NOW).relevant


def test_pet_field_limits_come_from_the_description() -> None:
    brain = interpret_exam(text="MR BRAIN")
    torso = prior("PET/CT SKULL BASE TO MID-THIGH", mod="PT")
    whole = prior("PET/CT VERTEX TO TOES", mod="PT")
    assert not judge(brain, torso, setting="outpatient", now=NOW).relevant
    assert judge(brain, whole, setting="outpatient", now=NOW).relevant


# -- time: relevance does not depend on age; in_window does -----------------------------------


def test_relevance_does_not_depend_on_age_and_in_window_follows_the_setting() -> None:
    planned = interpret_exam(text="CT HEAD")
    verdicts = {
        (setting, days): judge(planned, prior("CT HEAD", days=days), setting=setting, now=NOW)
        for setting in Setting
        for days in (0, 1, 2, 30, 31, 90, 91, 4000)
    }
    assert all(v.relevant for v in verdicts.values())
    inside = {k for k, v in verdicts.items() if v.in_window}
    assert (Setting.TRAUMA, 1) in inside and (Setting.TRAUMA, 2) not in inside
    assert (Setting.ED, 30) in inside and (Setting.ED, 31) not in inside
    assert (Setting.INPATIENT, 30) in inside and (Setting.INPATIENT, 31) not in inside
    assert (Setting.OUTPATIENT, 90) in inside and (Setting.OUTPATIENT, 91) not in inside


def test_windows_are_configurable() -> None:
    planned = interpret_exam(text="CT HEAD")
    old = prior("CT HEAD", days=60)
    assert not judge(planned, old, setting="ed", now=NOW).in_window
    wide = Windows(trauma=1, ed=90, inpatient=30, outpatient=365)
    v = judge(planned, old, setting="ed", now=NOW, windows=wide)
    assert v.in_window and v.window_days == 90 and "ed window of 90 days" in v.reasons[-1]


@pytest.mark.parametrize("days", [-1, 1.5, True])
def test_a_bad_window_is_a_bad_request(days: object) -> None:
    with pytest.raises(BadRequest):
        Windows(trauma=days, ed=30, inpatient=30, outpatient=90)  # type: ignore[arg-type]


def test_an_unknown_setting_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="setting"):
        judge(interpret_exam(text="CT HEAD"), prior("CT HEAD"), setting="icu", now=NOW)


def test_a_prior_without_date_is_never_in_window() -> None:
    undated = PriorFacts(study_date=None, modalities=("CT",), study_description="CT HEAD")
    v = judge(interpret_exam(text="CT HEAD"), undated, setting="trauma", now=NOW)
    assert v.relevant and not v.in_window and "date unknown" in v.reasons[-1]


# -- usable for the purpose -------------------------------------------------------------------


def test_usability_flags_thin_slices_contrast_phase_and_completeness() -> None:
    planned = interpret_exam(text="CT CHEST ABDOMEN PELVIS W")
    thick = prior(
        "CT CAP W", series=(SeriesFacts(modality="CT", description="AXIAL 5MM", slice_thickness_mm=5.0),)
    )
    thin = prior(
        "CT CAP",
        series=(
            SeriesFacts(modality="CT", description="ARTERIAL", slice_thickness_mm=5.0),
            SeriesFacts(
                modality="CT",
                description="PORTAL VENOUS 0.625MM",
                slice_thickness_mm=0.625,
                number_of_instances=700,
                expected_instances=800,
                contrast_agent="IOHEXOL",
            ),
        ),
    )
    described = prior("CT CAP", series=(SeriesFacts(modality="CT", description="AX THIN 1.25MM"),))
    u_thick = judge(planned, thick, setting="trauma", now=NOW).usability
    u_thin = judge(planned, thin, setting="trauma", now=NOW).usability
    assert u_thick.thin_slices is False and any("5 mm" in n for n in u_thick.notes)
    assert u_thick.contrast_matches_planned is True and u_thick.series_complete is None
    assert u_thin.thin_slices is True and u_thin.series_complete is False
    assert u_thin.phases == ("arterial", "portal_venous") and u_thin.contrast == "with"
    assert judge(planned, described, setting="trauma", now=NOW).usability.thin_slices is True
    assert judge(planned, prior("XR CHEST", mod="CR"), setting="ed", now=NOW).usability.thin_slices is None


def test_every_verdict_says_why_and_which_data_decided() -> None:
    v = judge(
        interpret_exam(text="CT ABD/PEL W CONTRAST"), prior("US RENAL", mod="US"), setting="ed", now=NOW
    )
    assert v.relevant and v.rule == "region_overlap"
    assert v.overlaps[0].planned == "ABDOMEN" and v.overlaps[0].prior == "KIDNEY"
    assert "KIDNEY (prior) lies within ABDOMEN (planned)" in v.reasons
    assert v.versions == vocabulary.load().versions


@pytest.mark.parametrize(
    "desc",
    [None, "", "   ", "ÄÖÜ ß ✓ 漢字", "X" * 5000, "W/O W/ C+ C- / / //", "L R B", "0.625MM 5MM", "\x00\n\t"],
)
def test_any_prior_text_is_read_without_raising(desc: str | None) -> None:
    """Priors come from other facilities' archives: whatever they hold, the list still renders."""
    odd = PriorFacts(
        study_date=NOW,
        modalities=("ZZ", "SR"),
        study_description=desc,
        procedure_codes=(ProcedureCode("??", "99"), ProcedureCode("1234-5", "LN", desc)),
        body_part_examined=desc,
        laterality=desc,
        series=(SeriesFacts(description=desc, slice_thickness_mm=-1.0, number_of_instances=0),),
    )
    v = judge(interpret_exam(text="CT CHEST"), odd, setting="ed", now=NOW)
    assert v.reasons and isinstance(v.relevant, bool)
