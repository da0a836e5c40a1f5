"""IssuerOfPatientID: the broker qualifies a Patient ID with the sending facility's issuer unless the
data names a registered one (so an unregistered issuer never links patients across facilities),
yet the object's own IssuerOfPatientID stays findable and is what queries answer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from broker.app import build_state
from broker.db import make_engine, migrate
from broker.deps import AppState
from broker.facilities import service as facilities
from broker.index import service
from broker.index.models import Patient
from broker.index.schemas import Level, Query
from broker.security.schemas import Principal, Role
from broker.settings import Settings
from tests.conftest import Backend
from tests.support import ADMIN, insert_row, make_ds, migrated_back_to, write

P = Principal(who="test", role=Role.admin, facility="local")
ISSUER = "00100021"
STUDY = "0020000D"

# study uid, facility, Patient ID, IssuerOfPatientID in the data
OBJECTS = [
    ("1.8.1", "local", "X", "HOSP-A"),  # unregistered issuer, sent by local (issuer LOCAL)
    ("1.8.2", "north", "X", "HOSP-A"),  # the same claim from another facility: not the same patient
    ("1.8.3", "local", "X", None),  # no issuer: LOCAL's patient X
    ("1.8.4", "local", "Y", "NORTH"),  # a registered issuer: NORTH's patient Y
]


@pytest.fixture
def state(settings: Settings, tmp_path: Path) -> Iterator[AppState]:
    st = build_state(settings)
    with Session(st.engine) as s:
        facilities.add_facility(session=s, principal=ADMIN, facility_id="north", issuer="NORTH")
    for uid, facility, pid, issuer in OBJECTS:
        path = write(
            tmp_path,
            f"{uid}.dcm",
            make_ds(sop=f"{uid}.1.1", study=uid, series=f"{uid}.1", pid=pid, issuer=issuer),
        )
        (outcome,) = service.ingest_files(
            engine=st.engine, store=st.store, principal=P, facility_id=facility, paths=[path]
        )
        assert outcome.status == "stored", outcome
    yield st
    st.engine.dispose()


def _search(state: AppState, level: Level, **filters: str) -> list[dict]:
    with Session(state.engine) as s:
        return service.search(session=s, query=Query(level=level, filters=dict(filters))).matches


def _answers(state: AppState, level: Level, **filters: str) -> dict[str, str]:
    return {m[STUDY]["Value"][0]: m[ISSUER]["Value"][0] for m in _search(state, level, **filters)}


@pytest.mark.parametrize("level", ["study", "series", "instance"])
def test_queries_answer_the_objects_own_issuer_and_the_facilitys_when_it_has_none(
    state: AppState, level: Level
) -> None:
    assert _answers(state, level, IssuerOfPatientID="") == {
        "1.8.1": "HOSP-A",
        "1.8.2": "HOSP-A",
        "1.8.3": "LOCAL",
        "1.8.4": "NORTH",
    }


@pytest.mark.parametrize("level", ["study", "series", "instance"])
def test_the_objects_own_issuer_finds_it(state: AppState, level: Level) -> None:
    assert set(_answers(state, level, PatientID="X", IssuerOfPatientID="HOSP-A")) == {"1.8.1", "1.8.2"}
    assert set(_answers(state, level, IssuerOfPatientID="HOSP-*")) == {"1.8.1", "1.8.2"}
    # The broker's qualification still finds what it qualifies.
    assert set(_answers(state, level, PatientID="X", IssuerOfPatientID="LOCAL")) == {"1.8.1", "1.8.3"}
    assert set(_answers(state, level, IssuerOfPatientID="NORTH")) == {"1.8.2", "1.8.4"}
    assert _answers(state, level, IssuerOfPatientID="HOSP-B") == {}


def test_an_unregistered_issuer_still_never_links_patients(state: AppState) -> None:
    with Session(state.engine) as s:
        keys = sorted((p.issuer, p.patient_id) for p in s.exec(select(Patient)).all())
    # HOSP-A from local and from north are two patients (LOCAL/X and NORTH/X), never one "HOSP-A/X".
    assert keys == [("LOCAL", "X"), ("NORTH", "X"), ("NORTH", "Y")]


def test_patient_level_answers_the_brokers_patient_and_matches_either(state: AppState) -> None:
    found = _search(state, "patient", PatientID="X", IssuerOfPatientID="HOSP-A")
    assert sorted(m[ISSUER]["Value"][0] for m in found) == ["LOCAL", "NORTH"]
    found = _search(state, "patient", IssuerOfPatientID="LOCAL")
    assert [m[ISSUER]["Value"][0] for m in found] == ["LOCAL"]


def test_the_migration_fills_the_new_column_from_the_stored_study_json(backend: Backend) -> None:

    engine = make_engine(backend.database_url)
    try:
        migrated_back_to(engine, "0004_pg_pattern_indexes")
        t = "2026-01-01T00:00:00+00:00"
        with engine.begin() as conn:
            insert_row(conn, "facility", id="local", name="L", issuer="LOCAL", created_at=t)
            insert_row(
                conn, "patient", pk=1, facility_id="local", issuer="LOCAL", patient_id="X", patient_name="",
                name_norm="", name_fuzzy="", birth_date="", sex="", updated_at=t,
            )  # fmt: skip
            for pk, study_json in (
                (1, '{"00100021": {"vr": "LO", "Value": ["HOSP-A"]}}'),
                (2, '{"00100020": {"vr": "LO", "Value": ["X"]}}'),
                (3, '{"00100021": {"vr": "LO"}}'),
            ):
                insert_row(
                    conn, "study", pk=pk, study_uid=f"1.7.{pk}", facility_id="local", patient_pk=1,
                    patient_id="X", issuer="LOCAL", patient_name="", name_norm="", name_fuzzy="",
                    birth_date="", sex="", study_date="", study_time="", accession_number="", study_id="",
                    study_description="", referring_physician="", modalities="\\", num_series=0,
                    num_instances=0, study_json=study_json, updated_at=t,
                )  # fmt: skip
        migrate(engine)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT study_uid, issuer_in_data FROM study ORDER BY pk")).all()
        assert [tuple(r) for r in rows] == [("1.7.1", "HOSP-A"), ("1.7.2", ""), ("1.7.3", "")]
    finally:
        engine.dispose()
