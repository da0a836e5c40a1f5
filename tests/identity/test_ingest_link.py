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


def test_ingest_hands_identity_the_address_phone_and_other_ids(engine: Any, tmp_path: Path) -> None:
    """The patient row holds neither address nor phone: identity must get them from the header."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset

    from broker.identity.models import IdentityRecord

    path = write_part10(
        tmp_path / "a.dcm",
        PatientID="MRN-7",
        PatientName="NEUMANN^MICHAELA",
        PatientBirthDate="19151111",
        PatientSex="F",
        PatientAddress="12 Main Street, Springfield",
        PatientTelephoneNumbers="555-1234",
    )
    ds = dcmread(path)
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = "X9", "ISSUER-B"  # a registered issuer: a real identifier
    bare = Dataset()
    bare.PatientID = "NOISSUER"  # no issuer: a bare ID, never an identifier
    ds.OtherPatientIDsSequence = [other, bare]
    ds.save_as(path)
    _ingest(engine, open_store((tmp_path / "objects").as_uri()), "fac-a", path)
    with Session(engine) as s:
        rec = s.exec(select(IdentityRecord).where(IdentityRecord.value == "MRN-7")).one()
        assert "12 MAIN STREET" in rec.address and "SPRINGFIELD" in rec.address
        assert rec.phone == "5551234"
        assert service.cross_reference(session=s, identifier=Identifier("ISSUER-A", "MRN-7")) == [
            Identifier("ISSUER-B", "X9")
        ]
        assert service.cross_reference(session=s, identifier=Identifier("ISSUER-B", "X9")) == [
            Identifier("ISSUER-A", "MRN-7")
        ]
