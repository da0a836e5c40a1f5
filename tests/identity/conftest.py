"""Identity fixtures: a migrated database (SQLite and PostgreSQL) with two facilities, and a helper
that does for a patient what ingest does (upsert the index row, then call link_patient)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from sqlalchemy.engine import Engine
from sqlmodel import Session

from broker.db import make_engine, migrate
from broker.facilities.models import Facility
from broker.identity import service
from broker.identity.adt import feed_principal
from broker.identity.mllp import MllpHandle, start_mllp, stop_mllp
from broker.index.models import Patient
from broker.index.service import set_patient_linker
from broker.security.schemas import Principal, Role
from tests.support import minimal_part10


@pytest.fixture(autouse=True)
def identity_wired() -> None:
    """What the app factory wires in: ingest links patients to persons, and a worker runs
    identity's jobs."""
    set_patient_linker(service.link_patients)
    service.register_jobs()


@pytest.fixture
def engine(backend: Any) -> Iterator[Engine]:
    eng = make_engine(backend.database_url)
    migrate(eng)
    with Session(eng) as s:
        s.add(Facility(id="fac-a", name="A", issuer="ISSUER-A"))
        s.add(Facility(id="fac-b", name="B", issuer="ISSUER-B"))
        s.add(Facility(id="fac-c", name="C", issuer="1.2.826.0.1.99"))
        s.commit()
    yield eng
    eng.dispose()


def cli_index(data_dir: Path) -> Engine:
    """The index `scanonce identity ... --data-dir DATA_DIR` opens (the embedded default),
    migrated, with facilities fac-a and fac-b."""
    eng = make_engine(f"sqlite:///{data_dir / 'index.sqlite3'}")
    migrate(eng)
    with Session(eng) as s:
        s.add(Facility(id="fac-a", name="A", issuer="ISSUER-A"))
        s.add(Facility(id="fac-b", name="B", issuer="ISSUER-B"))
        s.commit()
    return eng


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as s:
        yield s


@pytest.fixture
def listener(engine: Engine) -> Iterator[MllpHandle]:
    """An MLLP (HL7 v2) listener on a free loopback port, feeding facility fac-a."""
    handle = start_mllp(engine=engine, principal=feed_principal(facility="fac-a"), host="127.0.0.1", port=0)
    try:
        yield handle
    finally:
        stop_mllp(handle)


def acting(who: str) -> Principal:
    """A caller named `who`, as routes, the CLI and the feeds hand one to the service."""
    return Principal(who=who, role=Role.admin, facility="fac-a")


FACILITY_ISSUER = {"fac-a": "ISSUER-A", "fac-b": "ISSUER-B", "fac-c": "1.2.826.0.1.99"}


def ingest_patient(
    session: Session,
    facility: str,
    patient_id: str,
    name: str,
    birth_date: str = "",
    sex: str = "",
    address: str = "",
    phone: str = "",
    other_ids: list[tuple[str, str]] | None = None,
) -> Patient:
    """What ingest does for one study's patient: upsert the index row, then link it."""
    from sqlmodel import select

    issuer = FACILITY_ISSUER[facility]
    patient = session.exec(
        select(Patient).where(Patient.issuer == issuer, Patient.patient_id == patient_id)
    ).first() or Patient(facility_id=facility, issuer=issuer, patient_id=patient_id)
    patient.patient_name, patient.name_norm = name, name.upper()
    patient.birth_date, patient.sex = birth_date, sex
    session.add(patient)
    session.flush()
    ds = Dataset()
    if address:
        ds.PatientAddress = address
    if phone:
        ds.PatientTelephoneNumbers = phone
    if other_ids:
        items = []
        for iss, val in other_ids:
            item = Dataset()
            item.PatientID, item.IssuerOfPatientID = val, iss
            items.append(item)
        ds.OtherPatientIDsSequence = items
    service.link_patient(session=session, patient=patient, dataset=ds)
    session.commit()
    return patient


def write_part10(path: Any, **patient: str) -> str:
    """A minimal valid Part 10 object (Secondary Capture, no pixels) with the given patient module."""
    return minimal_part10(path, **patient)
