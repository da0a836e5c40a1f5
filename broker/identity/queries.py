"""What the FHIR interface asks of identity: the identifiers of a person (PIXm), persons by
demographics (PDQm), one person's view, and whether an issuer is known at all. Reads only.

Each read takes an optional `keep`: given record ids, the ones the caller may see (consent,
purpose of use; built by broker.consent, which sits above identity). A record the caller may not
see lends the person neither its identifiers nor its demographics, and does not make it found.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from sqlalchemy import ColumnElement, union_all
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from broker.errors import BadRequest, NotFound
from broker.facilities import service as facilities
from broker.identity import matching
from broker.identity.models import IdentityIdentifier, IdentityName, IdentityRecord, ReviewItem, TrustedIssuer
from broker.identity.records import check_identifier, get_record, require_record
from broker.identity.schemas import Identifier, PersonView

# Record ids in, the subset the caller may see out.
RecordFilter = Callable[[Collection[int]], set[int]]


def _kept(recs: Sequence[IdentityRecord], keep: RecordFilter | None) -> list[IdentityRecord]:
    if keep is None or not recs:
        return list(recs)
    seen = keep([r.id for r in recs if r.id is not None])
    return [r for r in recs if r.id in seen]


def person_identifiers(
    *, session: Session, person_id: int, keep: RecordFilter | None = None
) -> list[Identifier]:
    recs = _kept(
        session.exec(
            select(IdentityRecord)
            .where(IdentityRecord.person_id == person_id)
            .order_by(col(IdentityRecord.id))
        ).all(),
        keep,
    )
    out: list[Identifier] = []
    seen: set[tuple[str, str]] = set()
    rec_ids = [r.id for r in recs]
    extra = session.exec(
        select(IdentityIdentifier).where(col(IdentityIdentifier.record_id).in_(rec_ids))
    ).all()
    for issuer, value in [(r.issuer, r.value) for r in recs] + [(i.issuer, i.value) for i in extra]:
        if (issuer, value) not in seen:
            seen.add((issuer, value))
            out.append(Identifier(issuer=issuer, value=value))
    return out


def cross_reference(
    *,
    session: Session,
    identifier: Identifier,
    target_issuers: Sequence[str] = (),
    keep: RecordFilter | None = None,
) -> list[Identifier]:
    """PIXm: every other identifier of the person `identifier` belongs to (NotFound if unknown,
    or if the record it names is one the caller may not see: the same answer)."""
    ident = check_identifier(identifier)
    rec = get_record(session=session, issuer=ident.issuer, value=ident.value)
    if rec is None:
        owner = session.exec(
            select(IdentityIdentifier).where(
                IdentityIdentifier.issuer == ident.issuer, IdentityIdentifier.value == ident.value
            )
        ).first()
        if owner is None:
            raise NotFound("source identifier is unknown")
        rec = require_record(session=session, record_id=owner.record_id)
    if not _kept([rec], keep):
        raise NotFound("source identifier is unknown")
    ids = [i for i in person_identifiers(session=session, person_id=rec.person_id, keep=keep) if i != ident]
    if target_issuers:
        wanted = set(target_issuers)
        ids = [i for i in ids if i.issuer in wanted]
    return ids


def person_of(*, session: Session, identifier: Identifier) -> int | None:
    """The person of the record with this (issuer, value), if there is one."""
    rec = get_record(session=session, issuer=identifier.issuer, value=identifier.value)
    return None if rec is None else rec.person_id


def issuer_known(*, session: Session, issuer: str) -> bool:
    """A registered facility's or trusted issuer, or one any record or identifier carries
    (index lookups only: PIXm must stay fast on a large MPI)."""
    if issuer in facilities.issuers(session=session).values():
        return True
    return any(
        session.exec(stmt.limit(1)).first() is not None
        for stmt in (
            select(TrustedIssuer.issuer).where(TrustedIssuer.issuer == issuer),
            select(IdentityRecord.id).where(IdentityRecord.issuer == issuer),
            select(IdentityIdentifier.id).where(IdentityIdentifier.issuer == issuer),
        )
    )


def person_view(*, session: Session, person_id: int, keep: RecordFilter | None = None) -> PersonView:
    recs = _kept(
        session.exec(
            select(IdentityRecord)
            .where(IdentityRecord.person_id == person_id)
            .order_by(col(IdentityRecord.updated_at).desc())
        ).all(),
        keep,
    )
    if not recs:
        raise NotFound(f"no person {person_id}")

    def first(field: str) -> str:
        return next((getattr(r, field) for r in recs if getattr(r, field)), "")

    return PersonView(
        person_id=person_id,
        identifiers=person_identifiers(session=session, person_id=person_id, keep=keep),
        family=first("family"),
        given=first("given"),
        middle=first("middle"),
        birth_date=first("birth_date"),
        sex=first("sex"),
        address=first("address"),
        phone=first("phone"),
    )


def fed_other_names(
    *, session: Session, person_ids: Sequence[int], keep: RecordFilter | None = None
) -> dict[int, list[matching.OtherName]]:
    """Per person: the other names of its records whose demographics a feed (FHIR, HL7) gave
    last, of the records the caller may see; IDE before SYL, then by record. A header's names
    are left to the index's patient rows, which keep them as written; a row whose
    representation is not known (stored before 0014, named by no header) is left out."""
    if not person_ids:
        return {}
    rows = session.execute(
        sa_select(
            col(IdentityRecord.id),
            col(IdentityRecord.person_id),
            col(IdentityName.family),
            col(IdentityName.given),
            col(IdentityName.representation),
        )
        .join(IdentityName, col(IdentityName.record_id) == col(IdentityRecord.id))
        .where(
            col(IdentityRecord.person_id).in_(list(person_ids)),
            col(IdentityRecord.source) != "dicom",
            col(IdentityName.representation).in_((matching.IDEOGRAPHIC, matching.PHONETIC)),
        )
        .order_by(
            col(IdentityRecord.person_id),
            col(IdentityName.representation) != matching.IDEOGRAPHIC,
            col(IdentityRecord.id),
            col(IdentityName.family),
            col(IdentityName.given),
        )
    ).all()
    visible = keep({row[0] for row in rows}) if keep is not None and rows else None
    out: dict[int, list[matching.OtherName]] = {}
    for record_id, person_id, family, given, representation in rows:
        if visible is None or record_id in visible:
            name = matching.OtherName(family, given, representation)
            matching.add_other_name(out.setdefault(person_id, []), name)
    return out


def _name_starts(part: str, prefix: str) -> ColumnElement[bool]:
    """Records whose `part` (family, given) starts with `prefix`: in the record's own name or in
    one of its other names (a PatientName's Ideographic and Phonetic groups, `IdentityName`), so
    山田 finds `Yamada^Tarou=山田^太郎` as YAMADA does. PDQm matches each of family and given
    against any of a Patient's names (FHIR search), and so does this."""
    # One bound pattern, not startswith's `? || '%'`: SQLite serves only that from the index, and
    # a normalised name holds no LIKE wildcard (normalize_name_part keeps letters, ' ', - and ').
    # A union of two index scans, not `own LIKE OR id IN (other)`: neither backend can serve an
    # OR with a subquery from an index, so the record table was read whole for every search.
    # PostgreSQL serves LIKE from the *_pat indexes (0013, 0014) under a non-C collation.
    pattern = prefix + "%"
    own = select(IdentityRecord.id).where(col(getattr(IdentityRecord, part)).like(pattern))
    other = select(IdentityName.record_id).where(col(getattr(IdentityName, part)).like(pattern))
    return col(IdentityRecord.id).in_(union_all(own, other))


def search_persons(
    *,
    session: Session,
    family: str | None = None,
    given: str | None = None,
    birth_date: str | None = None,
    identifier: Identifier | None = None,
    limit: int = 50,
    keep: RecordFilter | None = None,
) -> list[PersonView]:
    """PDQm: persons matching all given demographics (names: exact or prefix, case-insensitive,
    in any of a record's names: its own and its PatientName's Ideographic and Phonetic groups).
    With `keep`, the identifier and the demographics must match records the caller may see."""
    stmt = select(IdentityRecord.id, IdentityRecord.person_id)
    if identifier is not None:
        ident = check_identifier(identifier)
        by_own = select(IdentityRecord.id).where(
            IdentityRecord.issuer == ident.issuer, IdentityRecord.value == ident.value
        )
        by_other = select(IdentityIdentifier.record_id).where(
            IdentityIdentifier.issuer == ident.issuer, IdentityIdentifier.value == ident.value
        )
        named = {i for i in [*session.exec(by_own).all(), *session.exec(by_other).all()] if i is not None}
        if keep is not None and named:
            named = keep(named)
        persons = (
            set(session.exec(select(IdentityRecord.person_id).where(col(IdentityRecord.id).in_(named))).all())
            if named
            else set()
        )
        stmt = stmt.where(col(IdentityRecord.person_id).in_(persons))
    criteria = False
    if family is not None:
        f = matching.normalize_name_part(family)
        if not f:
            raise BadRequest("family must contain letters")
        stmt = stmt.where(_name_starts("family", f))
        criteria = True
    if given is not None:
        g = matching.normalize_name_part(given)
        if not g:
            raise BadRequest("given must contain letters")
        stmt = stmt.where(_name_starts("given", g))
        criteria = True
    if birth_date is not None:
        b = matching.normalize_date(birth_date)
        if not b:
            raise BadRequest(matching.date_refusal("birthdate", birth_date))
        stmt = stmt.where(IdentityRecord.birth_date == b)
        criteria = True
    if identifier is None and not criteria:
        raise BadRequest("give at least one of family, given, birthdate, identifier")
    stmt = stmt.order_by(col(IdentityRecord.person_id), col(IdentityRecord.id))
    person_ids: list[int] = []
    # Paged: with `keep`, matching records the caller may not see are skipped, so a page may add
    # fewer persons than it has rows.
    page = max(limit * 4, 200)
    offset = 0
    while len(person_ids) < limit:
        rows = session.exec(stmt.offset(offset).limit(page)).all()
        visible = keep([r for r, _p in rows if r is not None]) if keep is not None and rows else None
        for record_id, person_id in rows:
            if (visible is None or record_id in visible) and person_id not in person_ids:
                person_ids.append(person_id)
                if len(person_ids) == limit:
                    break
        if len(rows) < page:
            break
        offset += page
    return [person_view(session=session, person_id=p, keep=keep) for p in person_ids]


def unconfirmed_patients(*, session: Session, person_id: int) -> dict[int, int]:
    """Index patients (patient pk -> review item id) that an open review item proposes to link
    to this person and no human has confirmed yet: shown as unconfirmed matches, never merged."""
    own = list(session.exec(select(IdentityRecord.id).where(IdentityRecord.person_id == person_id)))
    if not own:
        return {}
    items = list(
        session.exec(
            select(ReviewItem).where(
                ReviewItem.status == "open",
                col(ReviewItem.record_id).in_(own) | col(ReviewItem.candidate_record_id).in_(own),
            )
        )
    )
    mine = set(own)
    other: dict[int, int] = {}
    for item in items:
        rec = item.candidate_record_id if item.record_id in mine else item.record_id
        if rec not in mine:
            other.setdefault(rec, item.id or 0)
    if not other:
        return {}
    out: dict[int, int] = {}
    for rec_id, pk, pid in session.exec(
        select(IdentityRecord.id, IdentityRecord.patient_pk, IdentityRecord.person_id).where(
            col(IdentityRecord.id).in_(list(other))
        )
    ):
        if pk is not None and pid != person_id and rec_id is not None:
            out[pk] = other[rec_id]
    return out
