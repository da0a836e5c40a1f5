"""Concurrent linking on PostgreSQL: racing transactions must not split one human into two persons.

Each thread has its own connection and transaction, as concurrent HTTP requests, DIMSE
associations and MLLP connections do. Without serialization every transaction sees no
candidate (the others have not committed yet) and creates its own person.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from broker.db import make_engine
from broker.facilities.models import Facility
from broker.identity import locks, matching, service
from broker.identity.models import IdentityRecord, LinkEvent, Person
from broker.identity.schemas import Identifier
from broker.index.models import Patient, Study
from broker.index.service import ingest_files
from broker.security.schemas import Principal, Role
from storage import open_store

from .conftest import acting, write_part10

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

    results = _run_together([functools.partial(send, f, p) for f, p in sends])
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


# ---------------------------------------------------------------- merges and manual links racing links

SURVIVOR = matching.demographics(
    family="OKONKWO", given="ADAEZE", birth_date="19720309", sex="F", address="44 Willow Lane Leeds 10234"
)
MERGED = matching.demographics(
    family="HARTMANN", given="LUKAS", birth_date="19800202", sex="M", address="5 Oak Street Bonn 53111"
)
LINKERS = 3


def _register(engine: Engine, ident: Identifier, d: matching.Demographics, **kw: Any) -> tuple[int, int]:
    with Session(engine, expire_on_commit=False) as s:
        decision = service.upsert_record(session=s, identifier=ident, demographics=d, source="hl7", **kw)
        s.commit()
        return decision.record_id, decision.person_id


def _slow_commit(session: Session, started: threading.Event, until: threading.Event | None = None) -> None:
    """Hold the session's transaction open just before its commit, its writes done: the window
    in which an unserialized link reads the committed (pre-move) state. Held half a second, or
    until `until` is set: a fixed window can close before loaded-machine links have run."""

    def before_commit(_s: Session) -> None:
        started.set()
        if until is None:
            time.sleep(0.5)
        else:
            until.wait(60)

    event.listen(session, "before_commit", before_commit)


def _move_racing_links(engine: Engine, op: str, *, hold_for_links: bool = False) -> tuple[int, int]:
    """`op` moves MERGED's person onto SURVIVOR's while LINKERS feeds register new records of
    MERGED's human. Returns (survivor person, merged person). With `hold_for_links` the move
    commits only after every link has (links that wait for the move must not use it)."""
    surv_rec, surv_person = _register(engine, Identifier("ISSUER-A", "S1"), SURVIVOR)
    merged_rec, merged_person = _register(engine, Identifier("ISSUER-B", "M1"), MERGED)
    assert surv_person != merged_person
    moving = threading.Event()
    links_done = threading.Event()
    pending = [LINKERS]
    count_lock = threading.Lock()

    def move() -> int:
        with Session(engine, expire_on_commit=False) as s:
            _slow_commit(s, moving, links_done if hold_for_links else None)
            if op == "merge":
                d = service.merge(
                    session=s,
                    survivor=Identifier("ISSUER-A", "S1"),
                    merged=Identifier("ISSUER-B", "M1"),
                    principal=acting("t"),
                )
            else:
                d = service.manual_link(
                    session=s, record_id=merged_rec, to_record_id=surv_rec, principal=acting("t"), why="same"
                )
            return d.person_id

    def link(i: int) -> Callable[[], int]:
        def work() -> int:
            assert moving.wait(30), "the move never reached its commit"
            try:
                return _register(engine, Identifier("ISSUER-C", f"N{i}"), MERGED)[1]
            finally:
                with count_lock:
                    pending[0] -= 1
                    if not pending[0]:
                        links_done.set()

        return work

    results = _run_together([move, *[link(i) for i in range(LINKERS)]])
    assert not [r for r in results if isinstance(r, Exception)], results
    return surv_person, merged_person


@pytest.mark.parametrize("op", ["merge", "manual_link"])
def test_a_move_racing_links_leaves_every_record_on_the_surviving_person(pg_engine: Engine, op: str) -> None:
    surv_person, _ = _move_racing_links(pg_engine, op)
    linked, created = _persons(pg_engine)
    assert linked == {surv_person}, f"records left on {len(linked) - 1} other person(s)"
    assert created == 2, "a link created a person of its own"
    with Session(pg_engine) as s:
        assert len(s.exec(select(IdentityRecord)).all()) == 2 + LINKERS


def test_the_race_harness_splits_the_person_without_the_move_lock(
    pg_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test above can fail: without `locks.lock_for_move` the links read the person being
    emptied as their candidate's and stay on it."""
    monkeypatch.setattr(locks, "lock_for_move", lambda **_kw: None)
    surv_person, merged_person = _move_racing_links(pg_engine, "merge", hold_for_links=True)
    linked, _ = _persons(pg_engine)
    assert linked == {surv_person, merged_person}


def test_a_merge_racing_an_ingest_of_the_merged_patient_does_not_deadlock(pg_engine: Engine) -> None:
    """Ingest writes its patient row, then links (the linking lock); the merge updates that
    row too. Taken in opposite orders, PostgreSQL would abort one of them as a deadlock."""
    _register(pg_engine, Identifier("ISSUER-A", "S1"), SURVIVOR)
    with Session(pg_engine, expire_on_commit=False) as s:
        patient = Patient(
            facility_id="fac-b", issuer="ISSUER-B", patient_id="M1", patient_name="HARTMANN^LUKAS"
        )
        patient.birth_date = "19800202"
        s.add(patient)
        s.flush()
        service.link_patient(session=s, patient=patient)
        s.commit()
        pk = patient.pk
    wrote_row = threading.Event()

    def ingest() -> int:
        with Session(pg_engine, expire_on_commit=False) as s:
            p = s.get(Patient, pk)
            assert p is not None
            p.sex = "M"  # newer demographics: ingest rewrites the row, then relinks
            s.add(p)
            s.flush()
            wrote_row.set()
            time.sleep(0.5)
            service.link_patient(session=s, patient=p)
            s.commit()
            return p.person_id or 0

    def merge() -> int:
        assert wrote_row.wait(30)
        time.sleep(0.1)
        with Session(pg_engine, expire_on_commit=False) as s:
            return service.merge(
                session=s,
                survivor=Identifier("ISSUER-A", "S1"),
                merged=Identifier("ISSUER-B", "M1"),
                principal=acting("t"),
            ).person_id

    results = _run_together([ingest, merge])
    assert not [r for r in results if isinstance(r, Exception)], results
    with Session(pg_engine) as s:
        p = s.get(Patient, pk)
        assert p is not None and p.person_id == results[1] and p.sex == "M"
    linked, _ = _persons(pg_engine)
    assert linked == {results[1]}
