"""Identity records, the ground every other identity module stands on: reading and writing one
record, its further identifiers, its blocking keys, persons, the append-only link history,
trusted issuers, and mirroring records' persons onto the index's patient rows (through
`index.service`, the only writer of the index's tables).

Functions flush, never commit (except `set_trusted_issuer`, a decision made by a caller).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete
from sqlmodel import Session, col, select

from broker.db import core_table
from broker.errors import BadRequest, NotFound
from broker.identity import matching
from broker.identity.matching import Demographics
from broker.identity.models import (
    BlockKey,
    IdentityIdentifier,
    IdentityName,
    IdentityRecord,
    LinkEvent,
    Person,
    TrustedIssuer,
)
from broker.identity.schemas import Identifier
from broker.index import service as index
from broker.security.schemas import Principal
from broker.security.service import authorize

log = logging.getLogger("scanonce.identity")

# What linking reads of a record (a Core select: no ORM objects on the hot path).
RECORD_COLUMNS: tuple[Any, ...] = (
    col(IdentityRecord.id),
    col(IdentityRecord.person_id),
    col(IdentityRecord.issuer),
    col(IdentityRecord.family),
    col(IdentityRecord.given),
    col(IdentityRecord.middle),
    col(IdentityRecord.birth_date),
    col(IdentityRecord.sex),
    col(IdentityRecord.address),
    col(IdentityRecord.phone),
)


def now() -> datetime:
    return datetime.now(UTC)


def demo_of(rec: Any) -> Demographics:
    """The demographics of a record (an `IdentityRecord` or a row of RECORD_COLUMNS)."""
    return Demographics(
        family=rec.family,
        given=rec.given,
        middle=rec.middle,
        birth_date=rec.birth_date,
        sex=rec.sex,
        address=rec.address,
        phone=rec.phone,
    )


def check_identifier(ident: Identifier) -> Identifier:
    issuer, value = (ident.issuer or "").strip(), (ident.value or "").strip()
    if not issuer:
        raise BadRequest("a patient identifier needs an issuer (assigning authority); bare IDs are refused")
    if not value:
        raise BadRequest("a patient identifier needs a value")
    if len(issuer) > 128 or len(value) > 128:
        raise BadRequest("identifier issuer and value are limited to 128 characters")
    return Identifier(issuer=issuer, value=value)


def get_record(*, session: Session, issuer: str, value: str) -> IdentityRecord | None:
    return session.exec(
        select(IdentityRecord).where(IdentityRecord.issuer == issuer, IdentityRecord.value == value)
    ).first()


def require_record(*, session: Session, record_id: int) -> IdentityRecord:
    rec = session.get(IdentityRecord, record_id)
    if rec is None:
        raise NotFound(f"no identity record {record_id}")
    return rec


def record_id_of(rec: IdentityRecord) -> int:
    """A stored record's id (every record read from the database has one)."""
    assert rec.id is not None
    return rec.id


def new_person(*, session: Session) -> int:
    person = Person()
    session.add(person)
    session.flush()
    assert person.id is not None
    return person.id


def add_event(
    *,
    session: Session,
    record_id: int,
    person_id: int,
    previous: int | None,
    method: str,
    weight: float | None = None,
    matched: int | None = None,
    contributions: dict[str, Any] | None = None,
    group: str = "",
    who: str = "system",
    why: str = "",
) -> None:
    session.add(
        LinkEvent(
            **event_values(
                record_id=record_id,
                person_id=person_id,
                previous=previous,
                method=method,
                weight=weight,
                matched=matched,
                contributions=contributions,
                group=group,
                who=who,
                why=why,
            )
        )
    )


def event_values(
    *,
    record_id: int,
    person_id: int,
    previous: int | None,
    method: str,
    weight: float | None = None,
    matched: int | None = None,
    contributions: dict[str, Any] | None = None,
    group: str = "",
    who: str = "system",
    why: str = "",
) -> dict[str, Any]:
    """The columns of one link history entry (`add_event`, and the batch linker's executemany)."""
    return {
        "record_id": record_id,
        "person_id": person_id,
        "previous_person_id": previous,
        "method": method,
        "weight": None if weight is None else round(weight, 3),
        "matched_record_id": matched,
        "contributions": json.dumps(contributions or {}),
        "group_id": group,
        "who": who[:128],
        "why": why[:512],
    }


def review_values(*, record_id: int, candidate: int, score: matching.Score) -> dict[str, Any]:
    """The columns of one review item a link decision opens (a record and its candidate)."""
    return {
        "record_id": record_id,
        "candidate_record_id": candidate,
        "weight": round(score.weight, 3),
        "contributions": json.dumps(score.contributions),
    }


def set_keys(*, session: Session, record_id: int, d: Demographics, new: bool = False) -> None:
    if not new:
        session.execute(delete(BlockKey).where(col(BlockKey.record_id) == record_id))
    keys = matching.block_keys(d)
    if keys:
        session.execute(
            core_table(BlockKey).insert(),
            [{"key": k, "record_id": record_id} for k in keys],
        )


def other_names_of(*, session: Session, record_id: int) -> set[matching.OtherName]:
    """The other names stored for a record (`IdentityName`)."""
    rows = session.execute(
        select(IdentityName.family, IdentityName.given, IdentityName.representation).where(
            IdentityName.record_id == record_id
        )
    ).all()
    return {matching.OtherName(*row) for row in rows}


def other_name_rows(*, record_id: int, names: Sequence[matching.OtherName]) -> list[dict[str, Any]]:
    """The `IdentityName` rows of a record's other names: one per (family, given), the first."""
    unique: list[matching.OtherName] = []
    for name in names:
        matching.add_other_name(unique, name)
    return [
        {"record_id": record_id, "family": n.family, "given": n.given, "representation": n.representation}
        for n in unique
    ]


def set_other_names(
    *, session: Session, record_id: int, names: Sequence[matching.OtherName], new: bool = False
) -> None:
    """Store these as the record's other names (`IdentityName`), in place of any it had."""
    if not new:
        session.execute(delete(IdentityName).where(col(IdentityName.record_id) == record_id))
    if names:
        session.execute(core_table(IdentityName).insert(), other_name_rows(record_id=record_id, names=names))


def set_identifiers(*, session: Session, record: IdentityRecord, identifiers: Sequence[Identifier]) -> None:
    if not identifiers:
        return
    record_id = record_id_of(record)
    existing = {
        (i.issuer, i.value)
        for i in session.exec(select(IdentityIdentifier).where(IdentityIdentifier.record_id == record_id))
    }
    for ident in identifiers:
        key = (ident.issuer, ident.value)
        if key == (record.issuer, record.value) or key in existing:
            continue
        existing.add(key)
        session.add(IdentityIdentifier(record_id=record_id, issuer=ident.issuer, value=ident.value))


def sync_patients(*, session: Session, record_ids: Sequence[int]) -> None:
    """Mirror records' persons onto the index's patient rows, so studies follow their person."""
    if not record_ids:
        return
    rows = session.exec(
        select(IdentityRecord.patient_pk, IdentityRecord.person_id).where(
            col(IdentityRecord.id).in_(record_ids),
            col(IdentityRecord.patient_pk).is_not(None),
        )
    ).all()
    by_person: dict[int, list[int]] = defaultdict(list)
    for patient_pk, person_id in rows:
        if patient_pk is not None:
            by_person[person_id].append(patient_pk)
    for person_id, patient_pks in by_person.items():
        index.assign_person(session=session, patient_pks=patient_pks, person_id=person_id)


# ---------------------------------------------------------------- trusted issuers


def set_trusted_issuer(*, session: Session, principal: Principal, issuer: str, note: str = "") -> None:
    """Declare `issuer` trusted: its identifiers are one person wherever they appear. Commits.
    The table has no author column: who did it goes to the log (an issuer is no patient data)."""
    authorize(principal, action="identity.write")
    if not issuer.strip():
        raise BadRequest("issuer must not be empty")
    if session.get(TrustedIssuer, issuer) is None:
        session.add(TrustedIssuer(issuer=issuer, note=note))
        session.commit()
        log.info("issuer %s trusted by %s", issuer, principal.who)


def trusted_issuers(*, session: Session) -> set[str]:
    return set(session.exec(select(TrustedIssuer.issuer)).all())
