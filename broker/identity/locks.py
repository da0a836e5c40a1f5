"""The locks identity writers take, in the one order all of them take them (PostgreSQL; SQLite
has a single writer and needs none):

1. the index's patient rows a change will rewrite, in key order (ingest writes its patient
   rows, then links; a feed locks its identifier's row; a move locks the rows of the records
   it moves);
2. the linking lock, a transaction-scoped advisory lock that serializes linking.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import text
from sqlmodel import Session, col, select

from broker.errors import Conflict
from broker.identity.models import IdentityRecord
from broker.index import service as index

# PostgreSQL advisory lock key that serializes linking (see serialize_linking): any constant
# no other part of the broker uses ("SCANONCE" in ASCII).
_LINK_LOCK_KEY = 0x5343414E4F4E4345

# A lock taken for a move can find the person grown by then (a record linked in between):
# start over this many times, then tell the caller to try again.
_MOVE_ATTEMPTS = 5


def serialize_linking(*, session: Session) -> None:
    """Hold the linking lock until this transaction ends (PostgreSQL; SQLite has one writer).

    Deciding a record's person reads what is committed, then writes: two transactions linking
    records of one human at once would each see no candidate and each create a person (or
    both insert the same (issuer, value), and one fail on the unique constraint). Waiting
    here until the other commits lets the second see the first's record. Under READ
    COMMITTED each statement after the wait sees that commit.

    One lock for all linking, not one per blocking key: ingest links several patients in one
    transaction, and per-key locks taken patient by patient would deadlock two batches that
    share keys in crossing order. Only transactions that create or change a patient take it,
    and it is held from the first link to the commit (milliseconds of index writes).
    """
    if session.get_bind().dialect.name == "postgresql":
        # Re-entrant: the second link of a batch only bumps a count in the same transaction.
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LINK_LOCK_KEY})


def lock_for_move(*, session: Session, persons: Callable[[], set[int]]) -> None:
    """Before a merge, manual link or unlink moves the records of `persons()`: lock what the
    move writes, in the one order every identity writer takes (PostgreSQL; SQLite has a
    single writer). Starts the caller's transaction: call before anything else is written.

    1. The index's patient rows of those records (the move sets their person_id), in key
       order, as ingest writes its patient rows and a feed locks its identifier's row before
       they link;
    2. the linking lock (`serialize_linking`), so no record is linked to a person while it is
       being emptied, nor read as a candidate on the person it is leaving.

    Which records move is only known for sure under the linking lock; if a record with a
    patient row not yet locked joined them meanwhile, locking that row now would invert the
    order (and deadlock with an ingest holding it while it waits for the linking lock), so
    the transaction rolls back and starts over.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    for _ in range(_MOVE_ATTEMPTS):
        wanted = patient_pks(session=session, persons=persons())
        index.lock_patients(session=session, patient_pks=wanted)
        serialize_linking(session=session)
        session.expire_all()  # what was read before the lock may be stale now
        if patient_pks(session=session, persons=persons()) <= wanted:
            return
        session.rollback()
    raise Conflict("the person changed while being locked for this change; try again")


def patient_pks(*, session: Session, persons: set[int]) -> set[int]:
    """The index's patient rows of the records of these persons."""
    if not persons:
        return set()
    rows = session.exec(
        select(IdentityRecord.patient_pk).where(
            col(IdentityRecord.person_id).in_(persons), col(IdentityRecord.patient_pk).is_not(None)
        )
    ).all()
    return {pk for pk in rows if pk is not None}
