"""What identity (a layer above) does to the index's patient rows, written here because the index
is the only writer of its tables: assign patients to a person, and lock patient rows before a
change that will rewrite them.

Locks are PostgreSQL row locks, FOR NO KEY UPDATE (what the `UPDATE ... SET person_id` takes), in
ascending key order, the order every writer of patient rows takes them (ingest writes its rows,
then links). SQLite has a single writer and needs none. Functions flush nothing and never commit:
they run inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, col

from broker.db import Prepared, core_table
from broker.index.models import Patient

_PATIENT = core_table(Patient)
_ASSIGN = Prepared(
    update(_PATIENT).where(_PATIENT.c.pk == bindparam("b_pk")).values(person_id=bindparam("b_person"))
)


def assign_person(*, session: Session, patient_pks: Collection[int], person_id: int) -> None:
    """Set the person of these patient rows (their studies follow it). Objects of those rows
    already loaded in `session` see the new value too (the ORM evaluates the criteria in memory)."""
    if not patient_pks:
        return
    stmt = update(Patient).values(person_id=person_id)
    if len(patient_pks) == 1:
        [pk] = patient_pks
        stmt = stmt.where(col(Patient.pk) == pk)
    else:
        stmt = stmt.where(col(Patient.pk).in_(sorted(patient_pks)))
    session.execute(stmt)


def assign_persons(*, session: Session, persons: Mapping[int, int]) -> None:
    """Set the person of each patient row (key -> person id) with one executemany, in key order
    (a batch of new patients linked at once). Objects of those rows loaded in `session` see
    the new value too, as they do after `assign_person`."""
    if not persons:
        return
    _ASSIGN.run(session, [{"b_pk": pk, "b_person": person} for pk, person in sorted(persons.items())])
    for pk, person in persons.items():
        loaded = session.identity_map.get(Session.identity_key(Patient, pk))
        if loaded is not None:
            set_committed_value(loaded, "person_id", person)


def lock_patients(*, session: Session, patient_pks: Collection[int]) -> None:
    """Lock these patient rows, in key order, until the transaction ends (PostgreSQL)."""
    if not patient_pks or session.get_bind().dialect.name != "postgresql":
        return
    session.execute(
        select(col(Patient.pk))
        .where(col(Patient.pk).in_(sorted(patient_pks)))
        .order_by(col(Patient.pk))
        .with_for_update(key_share=True)  # FOR NO KEY UPDATE: what the UPDATE of person_id takes
    )


def lock_patient_by_identifier(*, session: Session, issuer: str, patient_id: str) -> int | None:
    """The key of the patient row of (issuer, Patient ID), locked until the transaction ends
    (PostgreSQL; on SQLite the row is only read); None if the index has no such patient."""
    return session.execute(
        select(col(Patient.pk))
        .where(col(Patient.issuer) == issuer, col(Patient.patient_id) == patient_id)
        .with_for_update(key_share=True)
    ).scalar()
