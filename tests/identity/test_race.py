"""Concurrent linking on PostgreSQL: racing transactions must not split one human into two persons.

Each thread has its own connection and transaction, as concurrent HTTP requests, DIMSE
associations and MLLP connections do. Without serialization every transaction sees no
candidate (the others have not committed yet) and creates its own person.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from broker.db import make_engine
from broker.federation.models import Facility
from broker.identity import matching, service
from broker.identity.models import IdentityRecord, LinkEvent, Person
from broker.identity.schemas import Identifier
from broker.index.models import Patient, Study
from broker.index.service import ingest_files
from broker.security.schemas import Principal, Role
from storage import open_store

from .conftest import write_part10

pytestmark = pytest.mark.postgres

THREADS = 6


@pytest.fixture
def pg_engine(pg_admin: Any, _pg_template: str) -> Iterator[Engine]:
    """A fresh migrated PostgreSQL database with the three identity test facilities."""
    name = pg_admin.new_name("race")
    eng = make_engine(pg_admin.create(name, template=_pg_template))
    with Session(eng) as s:
        s.add(Facility(id="fac-a", name="A", issuer="ISSUER-A"))
        s.add(Facility(id="fac-b", name="B", issuer="ISSUER-B"))
        s.add(Facility(id="fac-c", name="C", issuer="1.2.826.0.1.99"))
        s.commit()
    try:
        yield eng
    finally:
        eng.dispose()
        pg_admin.drop(name)


def _run_together(work: list[Callable[[], Any]]) -> list[Any]:
    """Run each callable in its own thread, released at once; return results or exceptions."""
    barrier = threading.Barrier(len(work))
    results: list[Any] = [None] * len(work)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work[i]()
        except Exception as exc:  # noqa: BLE001 - reported by the test's assertion
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a linking thread hung"
    return results


def _feed(engine: Engine, identifier: Identifier) -> Callable[[], int]:
    """What a FHIR or HL7 feed does for one message, with the transaction held open a moment
    after linking, as a request that does more work before it commits would."""
    d = matching.demographics(
        family="NEUMANN",
        given="MICHAELA",
        birth_date="19151111",
        sex="F",
        address="1 Main Street Town 12345",
    )

    def work() -> int:
        with Session(engine, expire_on_commit=False) as s:
            decision = service.upsert_record(session=s, identifier=identifier, demographics=d, source="hl7")
            time.sleep(0.1)
            s.commit()
            return decision.person_id

    return work


def _persons(engine: Engine) -> tuple[set[int], int]:
    with Session(engine) as s:
        linked = set(s.exec(select(IdentityRecord.person_id)).all())
        created = len(s.exec(select(Person.id)).all())
    return linked, created


def test_one_new_record_sent_concurrently_is_one_record_and_one_person(pg_engine: Engine) -> None:
    ident = Identifier("ISSUER-A", "A1")
    results = _run_together([_feed(pg_engine, ident) for _ in range(THREADS)])
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len(set(results)) == 1
    linked, created = _persons(pg_engine)
    assert linked == set(results) and created == 1
    with Session(pg_engine) as s:
        assert len(s.exec(select(IdentityRecord)).all()) == 1
        # One decision recorded, not one per racing sender.
        assert len(s.exec(select(LinkEvent)).all()) == 1


def test_records_of_one_person_under_different_issuers_link_to_one_person(pg_engine: Engine) -> None:
    results = _run_together([_feed(pg_engine, Identifier(f"ISSUER-{i}", f"V{i}")) for i in range(THREADS)])
    assert not [r for r in results if isinstance(r, Exception)], results
    linked, created = _persons(pg_engine)
    assert len(linked) == 1, f"{len(linked)} persons for one human"
    assert created == 1, f"{created - 1} orphan persons created"
    with Session(pg_engine) as s:
        assert len(s.exec(select(IdentityRecord)).all()) == THREADS


def test_concurrent_ingest_of_one_patient_at_three_facilities(pg_engine: Engine, tmp_path: Path) -> None:
    """Through the broker's own ingest: two studies per facility, all sent at once."""
    store = open_store((tmp_path / "objects").as_uri())
    patient = {
        "PatientName": "NEUMANN^MICHAELA",
        "PatientBirthDate": "19151111",
        "PatientSex": "F",
        "PatientAddress": "1 Main Street Town 12345",
    }
    sends: list[tuple[str, str]] = []
    for n, facility in enumerate(["fac-a", "fac-b", "fac-c"] * 2):
        path = write_part10(tmp_path / f"{n}.dcm", PatientID=f"MRN-{facility}", **patient)
        sends.append((facility, path))

    def send(facility: str, path: str) -> list[str]:
        principal = Principal(who="test", role=Role.admin, facility=facility)
        outcomes = ingest_files(
            engine=pg_engine, store=store, principal=principal, facility_id=facility, paths=[path]
        )
        return [o.status for o in outcomes]

    results = _run_together([lambda f=f, p=p: send(f, p) for f, p in sends])
    assert results == [["stored"]] * len(sends), results
    with Session(pg_engine) as s:
        patients = s.exec(select(Patient)).all()
        assert len(patients) == 3
        assert len({p.person_id for p in patients}) == 1, "one human split into several persons"
        assert None not in {p.person_id for p in patients}
        studies = s.exec(select(Study)).all()
        assert len(studies) == len(sends)
    linked, created = _persons(pg_engine)
    assert len(linked) == 1 and created == 1
