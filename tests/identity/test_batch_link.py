"""A batch of new patients linked at once (ingest's `link_patients`) ends as the same patients
linked one by one (`link_patient`): the same persons, link history and review items."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlmodel import Session, select

from broker.identity import matching, service
from broker.identity.models import IdentityRecord, LinkEvent, ReviewItem
from broker.identity.schemas import Identifier
from broker.index.models import Patient

from .conftest import FACILITY_ISSUER, ingest_patient

# (facility, Patient ID, name, birth date, sex): new patient rows of one batch, in order.
BATCH = [
    ("fac-a", "A1", "GILLARD^JAKE", "19590828", "M"),  # the stored B0, a typo apart: linked
    ("fac-a", "A2", "NGUYEN^PIA", "19850505", "F"),  # new
    ("fac-c", "C2", "NGUYEN^PIA", "19850505", "F"),  # A2, decided before it in the batch
    ("fac-b", "B3", "NGUYEN^SONJA", "19850505", "F"),  # A2's twin: review, never linked
    ("fac-a", "A4", "REID^HOWIE", "19401231", "M"),  # registered by a feed before: its record
    ("fac-c", "C4", "REID^HOWIE", "19401231", "M"),  # A4's record, stored mid-batch
    ("fac-c", "C5", "WEBB^DIXON", "", "M"),  # no birth date: new
    ("fac-a", "A6", "KOWALSKI^ANNA", "19770707", "F"),  # new, unrelated
]


def _stored(engine: Any) -> None:
    """What is there before the batch: a linked patient and a feed-registered record."""
    with Session(engine, expire_on_commit=False) as s:
        ingest_patient(s, "fac-b", "B0", "GILLATD^JAKE", "19590828", "M")
        service.upsert_record(
            session=s,
            identifier=Identifier("ISSUER-A", "A4"),
            demographics=matching.demographics(patient_name="REID^HOWIE", birth_date="19401231", sex="M"),
            source="hl7",
        )
        s.commit()


def _link(engine: Any, *, together: bool) -> tuple[Any, ...]:
    """Add the batch's patient rows, link them, and return what linking wrote (by identifier,
    not id: ids differ between runs on PostgreSQL); rolled back."""
    with Session(engine, expire_on_commit=False) as s:
        if engine.dialect.name == "postgresql":
            # The largest record id is part of a weight: the second run starts where the first
            # did, not after the ids its rolled back records drew from the sequence.
            s.execute(text("SELECT setval('identity_record_id_seq', (SELECT max(id) FROM identity_record))"))
        rows = [
            Patient(
                facility_id=fac,
                issuer=FACILITY_ISSUER[fac],
                patient_id=pid,
                patient_name=name,
                birth_date=dob,
                sex=sex,
            )
            for fac, pid, name, dob, sex in BATCH
        ]
        s.add_all(rows)
        s.flush()
        if together:
            service.link_patients(session=s, patients=[(p, None) for p in rows])
        else:
            for p in rows:
                service.link_patient(session=s, patient=p)
        ident = {r.id: (r.issuer, r.value) for r in s.exec(select(IdentityRecord))}
        person = {r.id: r.person_id for r in s.exec(select(IdentityRecord))}
        persons: dict[int, set[Any]] = {}
        for rid, pid in person.items():
            persons.setdefault(pid, set()).add(ident[rid])
        by_ident = {ident[rid]: frozenset(persons[pid]) for rid, pid in person.items()}
        # Each patient row shows its record's person.
        seen = {(p.issuer, p.patient_id): p.person_id for p in s.exec(select(Patient))}
        assert all(seen[i] == person[rid] for rid, i in ident.items() if i in seen)
        events = [
            (ident[e.record_id], e.method, e.weight, e.matched_record_id and ident[e.matched_record_id])
            + (e.contributions, e.why, e.who, e.previous_person_id)
            for e in s.exec(select(LinkEvent).order_by(LinkEvent.id))  # type: ignore[arg-type]
        ]
        reviews = [
            (ident[r.record_id], ident[r.candidate_record_id], r.weight, r.contributions, r.status)
            for r in s.exec(select(ReviewItem).order_by(ReviewItem.id))  # type: ignore[arg-type]
        ]
        s.rollback()
    return by_ident, events, reviews


def test_a_batch_links_as_one_by_one(engine: Any) -> None:
    _stored(engine)
    alone = _link(engine, together=False)
    assert _link(engine, together=True) == alone
    by_ident, events, reviews = alone
    # The batch exercised what matters: links to stored and to earlier batch records, a
    # review, new persons, and a record that existed.
    assert by_ident[("ISSUER-A", "A1")] == {("ISSUER-A", "A1"), ("ISSUER-B", "B0")}
    assert by_ident[("1.2.826.0.1.99", "C2")] == {("ISSUER-A", "A2"), ("1.2.826.0.1.99", "C2")}
    assert by_ident[("1.2.826.0.1.99", "C4")] == {("ISSUER-A", "A4"), ("1.2.826.0.1.99", "C4")}
    assert len(by_ident[("ISSUER-B", "B3")]) == 1 and reviews
    assert {e[1] for e in events} >= {"new", "probabilistic"}
