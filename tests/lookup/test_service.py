"""The prior lookup on the demo data, SQLite and PostgreSQL: the clinician's question answered
through the API and the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select
from typer.testing import CliRunner

from broker.app import create_app
from broker.cli import app
from broker.identity.models import IdentityRecord, ReviewItem
from broker.index.models import StudyLocation
from broker.lookup import service
from tests.live_demo import the_child_and_a_stranger
from tests.support import ADMIN, auth_headers

# Seed 42 (the demo default): a ten-year-old with a CT abdomen/pelvis at the children's hospital
# and one at St Mary's on 2026-06-16; an adult with CT A/P at North General and St Mary's.
CHILD = ("kids", "K346295")
CHILD_RECENT_CT_DATE = date(2026, 6, 16)
ADULT = ("northgen", "183882874")


@pytest.fixture
def client(demo_backend: Any, tmp_path: Path, make_settings: Any) -> Iterator[TestClient]:
    settings = make_settings(demo_backend, tmp_path)
    with TestClient(create_app(settings=settings), headers=auth_headers()) as c:
        yield c


def _engine(client: TestClient) -> Any:
    return client.app.state.scanonce.engine  # type: ignore[attr-defined]


def test_child_relevant_ct_nine_days_ago_elsewhere_comes_first_with_dose(client: TestClient) -> None:
    now = CHILD_RECENT_CT_DATE + timedelta(days=9)
    with Session(_engine(client)) as session:
        answer = service.find_priors(
            session=session,
            principal=ADMIN,
            facility=CHILD[0],
            mrn=CHILD[1],
            exam="CT ABDOMEN PELVIS",
            setting="ed",
            now=now,
        )
    first = answer.priors[0]
    assert (first.facility, first.age_days, first.relevant, first.in_window) == ("stmarys", 9, True, True)
    assert first.link == "confirmed" and first.availability == "ONLINE"
    assert first.dose is not None and first.dose.source == "rdsr"
    assert first.dose.dlp_mgy_cm and first.dose.effective_dose_msv and first.dose.age_at_exam_years
    assert any("ABDOMEN" in r for r in first.reasons)
    assert answer.warning and "9 days" in answer.warning
    # Relevant before the rest; nothing hidden (the chest film is listed, not relevant).
    flags = [p.relevant for p in answer.priors]
    assert flags == sorted(flags, reverse=True) and not all(flags)
    assert answer.repeat_cost is not None and answer.repeat_cost.basis == "prior"
    assert answer.repeat_cost.effective_dose_msv == first.dose.effective_dose_msv
    assert answer.cumulative_12_months is not None
    assert answer.cumulative_12_months.effective_dose_msv >= first.dose.effective_dose_msv


def test_adult_relevant_priors_with_dose_through_the_api(client: TestClient) -> None:
    r = client.get(
        "/api/priors",
        params={"facility": ADULT[0], "mrn": ADULT[1], "exam": "CT ABD/PEL W", "setting": "outpatient"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    relevant = [p for p in body["priors"] if p["relevant"]]
    assert {p["facility"] for p in relevant} >= {"northgen", "stmarys"}
    assert all(p["dose"]["effective_dose_msv"] > 0 for p in relevant if p["modality"] == "CT")
    assert "/api/priors" in client.get("/openapi.json").json()["paths"]


def test_bad_and_unknown_input(client: TestClient) -> None:
    r = client.get("/api/priors", params={"facility": CHILD[0], "mrn": CHILD[1], "exam": "!!! ???"})
    assert r.status_code == 400 and r.json()
    r = client.get("/api/priors", params={"facility": CHILD[0], "mrn": "NO-SUCH", "exam": "CT HEAD"})
    assert r.status_code == 200 and r.json()["patient_found"] is False and r.json()["priors"] == []
    # An unknown procedure code: read from the description, and said.
    params = {
        "facility": CHILD[0],
        "mrn": CHILD[1],
        "exam": "CT ABDOMEN PELVIS",
        "code": "99999",
        "system": "CPT",
    }
    r = client.get("/api/priors", params=params)
    assert r.status_code == 200 and r.json()["planned"]["decided_by"] == "text"
    assert any("99999" in n for n in r.json()["planned"]["notes"])
    r = client.get("/api/priors", params={**params, "exam": ""})
    assert r.status_code == 400 and "99999" in r.text
    r = client.get("/api/priors", params={"mrn": CHILD[1], "exam": "CT HEAD"})  # a bare Patient ID
    assert r.status_code == 400
    r = client.get("/api/priors", params={"identifier": f"NOT-AN-ISSUER|{CHILD[1]}", "exam": "CT HEAD"})
    assert r.status_code == 400


@pytest.mark.parametrize("now", ["0001-01-01", "9999-12-31"])
def test_now_at_the_ends_of_the_calendar(client: TestClient, now: str) -> None:
    # Judged as of that date like any other: the 12-month dose window starts at year 1 at the
    # earliest, and the page shows the answer rather than an error.
    params = {"facility": CHILD[0], "mrn": CHILD[1], "exam": "CT ABDOMEN PELVIS", "now": now}
    r = client.get("/api/priors", params=params)
    assert r.status_code == 200, r.text
    assert r.json()["patient_found"] is True
    assert client.get("/", params=params).status_code == 200


@pytest.mark.parametrize(
    "params",
    [
        {"facility": CHILD[0], "mrn": f"{CHILD[1]}\x00", "exam": "CT ABDOMEN"},
        {"identifier": f"CHILDRENS|{CHILD[1]}\x00", "exam": "CT ABDOMEN"},
    ],
)
def test_a_nul_character_in_the_identifier_is_no_fault(client: TestClient, params: dict[str, str]) -> None:
    # PostgreSQL cannot hold a NUL in text: found nowhere (SQLite) or the client's 400, never a 500.
    for path in ("/api/priors", "/"):
        r = client.get(path, params=params)
        assert r.status_code in (200, 400), r.text
        if r.status_code == 200 and path == "/api/priors":
            assert r.json()["patient_found"] is False
        if r.status_code == 400:
            assert "NUL" in r.text


def test_bare_id_unconfirmed_link_and_nearline(client: TestClient) -> None:
    engine = _engine(client)
    now = CHILD_RECENT_CT_DATE + timedelta(days=9)
    with Session(engine) as session:
        # A patient at another facility under the very same Patient ID, but another person.
        child, stranger, stranger_study = the_child_and_a_stranger(session)
        stranger.patient_id = CHILD[1]
        session.add(stranger)
        session.commit()
        ids_before = {p.study_instance_uid for p in _answer(session, now).priors}
        assert stranger_study.study_uid not in ids_before
        # An open review item between the child and the stranger: shown, unconfirmed, not counted.
        rec = session.exec(select(IdentityRecord).where(IdentityRecord.patient_pk == child.pk)).one()
        other = session.exec(select(IdentityRecord).where(IdentityRecord.patient_pk == stranger.pk)).one()
        assert other.id is not None and rec.id is not None
        session.add(ReviewItem(record_id=other.id, candidate_record_id=rec.id, weight=9.0))
        # The child's recent CT known only from St Mary's listing: NEARLINE.
        recent = _answer(session, now).priors[0]
        session.add(
            StudyLocation(study_uid=recent.study_instance_uid, facility_id="stmarys", has_pixels=False)
        )
        session.commit()
        answer = _answer(session, now)
    by_uid = {p.study_instance_uid: p for p in answer.priors}
    assert by_uid[stranger_study.study_uid].link == "unconfirmed"
    assert {p.link for p in answer.priors if p.study_instance_uid in ids_before} == {"confirmed"}
    assert by_uid[recent.study_instance_uid].availability == "NEARLINE"


def _answer(session: Session, now: date) -> Any:
    return service.find_priors(
        session=session,
        principal=ADMIN,
        facility=CHILD[0],
        mrn=CHILD[1],
        exam="CT ABDOMEN PELVIS",
        setting="ed",
        now=now,
    )


def test_avoided_repeats_recorded_and_summed_per_month(client: TestClient) -> None:
    engine = _engine(client)
    with Session(engine) as session:
        uid = _answer(session, CHILD_RECENT_CT_DATE + timedelta(days=9)).priors[0].study_instance_uid
        for when in (
            datetime(2026, 6, 25, tzinfo=UTC),
            datetime(2026, 6, 26, tzinfo=UTC),
            datetime(2026, 7, 2, tzinfo=UTC),
        ):
            out = service.record_avoided(
                session=session,
                principal=ADMIN,
                study_uid=uid,
                planned_exam="CT ABDOMEN PELVIS",
                facility="kids",
                now=when,
            )
            assert out.basis == "prior" and out.estimated_dose_msv is not None and out.who == ADMIN.who
    r = client.post(
        "/api/priors/avoided",
        json={"study_instance_uid": uid, "planned_exam": "CT ABD PEL", "facility": "kids"},
    )
    assert r.status_code == 201, r.text
    months = {(m["facility"], m["month"]): m for m in client.get("/api/metrics/avoided").json()}
    assert months[("kids", "2026-06")]["repeats_avoided"] == 2
    assert out.estimated_dose_msv is not None
    assert months[("kids", "2026-06")]["dose_spared_msv"] == pytest.approx(
        2 * out.estimated_dose_msv, abs=0.01
    )
    assert months[("kids", "2026-07")]["repeats_avoided"] == 1
    r = client.post(
        "/api/priors/avoided", json={"study_instance_uid": "1.2.3", "planned_exam": "CT", "facility": "kids"}
    )
    assert r.status_code == 404


def test_cli_on_the_demo(tmp_path: Path) -> None:
    """`scanonce demo` then `scanonce lookup`: the warning, the in-window prior with its dose."""
    run = CliRunner().invoke
    assert run(app, ["demo", "--data-dir", str(tmp_path)]).exit_code == 0
    now = (CHILD_RECENT_CT_DATE + timedelta(days=9)).isoformat()
    args = ["lookup", "--data-dir", str(tmp_path), "--facility", CHILD[0], "--mrn", CHILD[1]]
    r = run(
        app, [*args, "--exam", "CT ABDOMEN PELVIS", "--setting", "ed", "--now", now], env={"COLUMNS": "250"}
    )
    assert r.exit_code == 0, r.output
    assert "WARNING" in r.output and "9 days ago at stmarys" in r.output
    assert "IN WINDOW" in r.output and "mSv" in r.output and "Cumulative" in r.output
    r = run(app, [*args, "--exam", "???"])
    assert r.exit_code == 1 and r.output


def test_exam_suggestions_are_read_by_the_engine_and_now_judges_as_of_a_date(client: TestClient) -> None:
    r = client.get("/api/priors/exams")
    assert r.status_code == 200
    labels = [s["label"] for s in r.json()]
    assert len(labels) > 50 and len(set(labels)) == len(labels)
    assert any(label.lower().startswith("ct abdomen") for label in labels)
    for label in labels:  # each suggestion is text the lookup reads, not a 400
        service.planned_exam(exam=label)
    params = {"facility": CHILD[0], "mrn": CHILD[1], "exam": "CT ABDOMEN PELVIS", "setting": "ed"}
    as_of = (CHILD_RECENT_CT_DATE + timedelta(days=9)).isoformat()
    first = client.get("/api/priors", params={**params, "now": as_of}).json()["priors"][0]
    assert (first["age_days"], first["in_window"]) == (9, True)
    assert client.get("/api/priors", params={**params, "now": "not-a-date"}).status_code == 400


@pytest.mark.parametrize("identifier", [5, 1.5, True, {"system": "urn:oid:1.2.3", "value": "X"}, "MRN-1"])
def test_a_patient_whose_identifier_is_not_an_array_is_no_one_known(
    client: TestClient, identifier: Any
) -> None:
    """An EHR's Patient of the wrong shape (SMART launch, CDS Hooks prefetch) names no patient
    the broker knows, rather than failing the launch with a 500."""
    state = client.app.state.scanonce  # type: ignore[attr-defined]
    with Session(state.engine) as session:
        patient = {"resourceType": "Patient", "identifier": identifier}
        assert service.known_fhir_patient(session=session, patient=patient) is None
