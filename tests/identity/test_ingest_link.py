"""Through the broker's own ingest: every stored study's patient is linked to a person."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from broker.identity import service
from broker.identity.schemas import Identifier
from broker.index.models import Patient, Study
from broker.index.service import ingest_files
from broker.security.schemas import Principal, Role
from storage import open_store

from .conftest import write_part10

P = Principal(who="test", role=Role.admin, facility="fac-a")


def _ingest(engine: Any, store: Any, facility: str, path: str) -> None:
    outcomes = ingest_files(engine=engine, store=store, principal=P, facility_id=facility, paths=[path])
    assert [o.status for o in outcomes] == ["stored"], outcomes


def test_ingested_studies_follow_their_person(engine: Any, tmp_path: Path) -> None:
    store = open_store((tmp_path / "objects").as_uri())
    _ingest(
        engine,
        store,
        "fac-a",
        write_part10(
            tmp_path / "a.dcm",
            PatientID="MRN-1",
            PatientName="NEUMANN^MICHAELA",
            PatientBirthDate="19151111",
            PatientSex="F",
        ),
    )
    _ingest(
        engine,
        store,
        "fac-b",
        write_part10(
            tmp_path / "b.dcm",
            PatientID="77",
            PatientName="NEUMAN^MICHEALA",
            PatientBirthDate="19151111",
            PatientSex="F",
        ),
    )
    # Same bare Patient ID at the other facility, different person: never linked.
    _ingest(
        engine,
        store,
        "fac-b",
        write_part10(
            tmp_path / "c.dcm",
            PatientID="MRN-1",
            PatientName="PAINTER^COURTNEY",
            PatientBirthDate="19161214",
            PatientSex="F",
        ),
    )
    with Session(engine) as s:
        people = {(p.issuer, p.patient_id): p.person_id for p in s.exec(select(Patient)).all()}
        assert None not in people.values()
        assert people[("ISSUER-A", "MRN-1")] == people[("ISSUER-B", "77")]
        assert people[("ISSUER-B", "MRN-1")] != people[("ISSUER-A", "MRN-1")]
        studies = s.exec(select(Study)).all()
        assert len(studies) == 3
        assert service.cross_reference(session=s, identifier=Identifier("ISSUER-A", "MRN-1")) == [
            Identifier("ISSUER-B", "77")
        ]
