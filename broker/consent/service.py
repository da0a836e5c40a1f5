"""Consent and break-the-glass: who may see which facility's records of a person.

The rule every interface asks (through `visibility`, `may_share`, `study_visible`,
`check_study` or `filter_studies`, which all build the same SQL condition):

- A caller always sees its own facility's records.
- Administrators (operators, the broker's own jobs and the CLI) are not limited here: what they
  may do is the role table's business (broker.security.policy).
- A clinician or radiologist sees other facilities' records only when the stated purpose of use
  is treatment (token claim `purpose_of_use`, or the `X-Purpose-Of-Use` header: TREAT or ETREAT).
  A facility node (a PACS prefetching priors by C-FIND / QIDO-RS) acts for treatment by
  deployment; it carries no purpose of use.
- Another facility's record is then shared unless the person opted out (`deny`), or, where that
  facility's `consent_policy` is opt-in, only once the person opted in (`permit`); a `deny` wins
  over a `permit`. A choice is kept against the record it was given for and applies to every
  record of that record's current person (resolved through identity's links) whose facility is
  in its scope (one facility, or "" for all).
- An active break-the-glass grant for the caller and the person overrides all of the above.

Changes (consent recorded or revoked, break-the-glass granted) are announced to the listeners
registered with `add_listener`, inside the caller's transaction, so that the audit trail can
record them in the same commit (broker.app wires the audit in).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Integer,
    Select,
    String,
    and_,
    bindparam,
    false,
    func,
    literal,
    not_,
    or_,
)
from sqlalchemy import select as core_select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import FromClause
from sqlalchemy.sql.visitors import InternalTraversal
from sqlmodel import Session, col, select

from broker.audit import service as audit
from broker.audit.schemas import AuditRecord
from broker.consent.models import BreakGlass, Consent
from broker.db import core_table
from broker.errors import BadRequest, NotFound
from broker.facilities import service as facilities
from broker.facilities.models import Facility
from broker.identity.models import IdentityRecord
from broker.identity.queries import RecordFilter
from broker.index.models import Patient, Study
from broker.security.schemas import Principal, Role
from broker.settings import Settings

# The tables the condition reads. The patient and facility rows belong to index and facilities;
# consent only reads two columns of them (a record's person, a facility's consent policy) inside
# one SQL condition, which is what keeps every query interface's check in the database.
_consent = core_table(Consent)
_glass = core_table(BreakGlass)
_patient = core_table(Patient)
_study = core_table(Study)
_facility = core_table(Facility)
# Aliases built once: building one copies every column (a few ms per request if done each time).
_SUBJECT = _patient.alias("consent_subject")
_GIVEN_FOR = _patient.alias("consent_record")
_HOLDER = _facility.alias("consent_holder")
_GRANTED_FOR = _patient.alias("glass_record")

# An identity record (FHIR Patient, PIXm) as the rule sees it. Its facility: the one it was
# linked from, else the registered facility whose issuer it carries (a feed's record), else none.
# Its patient row: its own, else any of its person's (a feed's record without images): a choice
# applies to every record of the person, so any of them answers for it.
_identity = core_table(IdentityRecord)
_RECORD_HOLDER = _facility.alias("record_holder")
_RECORD_PATIENT = _patient.alias("record_patient")
_RECORD_FACILITY = func.coalesce(
    _identity.c.facility_id,
    core_select(_RECORD_HOLDER.c.id)
    .where(_RECORD_HOLDER.c.issuer == _identity.c.issuer)
    .limit(1)
    .correlate(_identity)
    .scalar_subquery(),
    literal(""),
)
_RECORD_PK = func.coalesce(
    _identity.c.patient_pk,
    core_select(func.min(_RECORD_PATIENT.c.pk))
    .where(_RECORD_PATIENT.c.person_id == _identity.c.person_id)
    .correlate(_identity)
    .scalar_subquery(),
)

# One record's facility and patient row, as bound parameters (`Visibility.allows`).
_ONE_FACILITY = bindparam("one_facility", type_=String())
_ONE_PATIENT = bindparam("one_patient", type_=Integer())
# The rows `Visibility.filter` and `Visibility.records` ask about, bound when they run.
_STUDY_PKS = bindparam("study_pks", type_=Integer(), expanding=True)
_RECORD_IDS = bindparam("record_ids", type_=Integer(), expanding=True)
# The moment a break-the-glass grant is checked against: read when the statement runs (not when
# it is built), so that one condition per caller serves all its requests.
_AT_EXECUTION = bindparam("consent_now", type_=_glass.c.expires_at.type, callable_=lambda: _now())

CLINICAL_ROLES = frozenset({Role.clinician, Role.radiologist})
# Roles whose view of other facilities' records consent limits. Reviewers and auditors read no
# images at all (the role table); administrators are operators.
LIMITED_ROLES = CLINICAL_ROLES | {Role.facility}
# HL7 v3 PurposeOfUse: treatment, emergency treatment.
TREATMENT = frozenset({"TREAT", "ETREAT"})
DECISIONS = ("deny", "permit")

WITHHELD_NOTE = "Some records are withheld by consent."


# -- the events the audit trail records --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsentEvent:
    """One change the audit trail must record. `action`: consent.recorded, consent.revoked or
    break-glass.granted. No patient identifiers beyond the broker's own row keys."""

    action: str
    who: str
    role: str
    facility: str
    patient_pk: int
    person_id: int | None
    at: datetime
    detail: dict[str, Any] = field(default_factory=dict)


class ConsentListener(Protocol):
    def __call__(self, *, session: Session, event: ConsentEvent) -> None: ...


_listeners: list[ConsentListener] = []


def add_listener(listener: ConsentListener) -> None:
    """Call `listener(session=..., event=...)` for every consent change and break-the-glass grant,
    before the change commits (an exception in it rolls the change back: no unrecorded grant)."""
    if listener not in _listeners:
        _listeners.append(listener)


def remove_listener(listener: ConsentListener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def _announce(
    session: Session,
    *,
    principal: Principal,
    action: str,
    patient_pk: int,
    person_id: int | None,
    at: datetime,
    detail: dict[str, Any],
) -> None:
    """Record the change `principal` made in the audit trail, in this transaction (no
    unrecorded grant), then tell the listeners."""
    event = ConsentEvent(
        action=action,
        who=principal.who,
        role=str(principal.role),
        facility=principal.facility,
        patient_pk=patient_pk,
        person_id=person_id,
        at=at,
        detail=detail,
    )
    patient = session.get(Patient, event.patient_pk)
    what = (
        event.detail.get("reason") if event.action == "break-glass.granted" else event.detail.get("decision")
    )
    record = AuditRecord(
        action="E" if event.action == "break-glass.granted" else "U",
        subtype=event.action,
        outcome_desc=f"{event.action}: {what}" if what else event.action,
        patient_id=patient.patient_id if patient is not None else "",
        patient_issuer=patient.issuer if patient is not None else "",
        source_interface="consent",
        entity=",".join(f"{k}={v}" for k, v in event.detail.items() if k != "reason"),
        resolve_study=False,
    ).by(principal)
    audit.append(session=session, records=[record])
    for listener in list(_listeners):
        listener(session=session, event=event)


# -- the condition -------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def purpose_is_treatment(principal: Principal) -> bool:
    return (principal.purpose_of_use or "").strip().upper() in TREATMENT


def limited(principal: Principal) -> bool:
    """True when consent and purpose of use limit what `principal` sees of other facilities."""
    return principal.role in LIMITED_ROLES


def _person_of(pk_col: Any) -> Any:
    subject = _SUBJECT
    # Correlated to the outermost query's record (two subqueries up): say so, as SQLAlchemy only
    # correlates to the immediately enclosing query by itself.
    return (
        core_select(subject.c.person_id)
        .where(subject.c.pk == pk_col)
        .correlate_except(subject)
        .scalar_subquery()
    )


def _choice(decision: str, fac_col: Any, pk_col: Any) -> ColumnElement[bool]:
    """A `decision` choice that applies to the record `pk_col` held by facility `fac_col`."""
    given_for = _GIVEN_FOR
    applies = (
        _consent.c.decision == decision,
        or_(_consent.c.scope_facility == "", _consent.c.scope_facility == fac_col),
    )
    # Two EXISTS rather than one with an OR across both tables: each finds its rows through an
    # index (the record's own choices by ix_consent_patient; its person's through the patient
    # rows of that person), where the OR made the database read every choice for every row.
    own = core_select(literal(1)).select_from(_consent).where(_consent.c.patient_pk == pk_col, *applies)
    persons = (
        core_select(literal(1))
        .select_from(given_for.join(_consent, _consent.c.patient_pk == given_for.c.pk))
        .where(given_for.c.person_id == _person_of(pk_col), *applies)
    )
    return or_(own.exists(), persons.exists())


def _opt_in(fac_col: Any) -> ColumnElement[bool]:
    holder = _HOLDER
    return core_select(literal(1)).where(holder.c.id == fac_col, holder.c.consent_policy == "opt-in").exists()


def _glass_open(who: Any, facility: Any, pk_col: Any) -> ColumnElement[bool]:
    granted_for = _GRANTED_FOR
    return (
        core_select(literal(1))
        .select_from(_glass.join(granted_for, granted_for.c.pk == _glass.c.patient_pk))
        .where(
            _glass.c.who == who,
            _glass.c.facility == facility,
            _glass.c.expires_at > _AT_EXECUTION,
            or_(_glass.c.patient_pk == pk_col, granted_for.c.person_id == _person_of(pk_col)),
        )
        .exists()
    )


@functools.lru_cache(maxsize=64)
def _shared(fac_col: Any, pk_col: Any) -> ColumnElement[bool]:
    """The consent part of the condition: the same for every caller, so built once per pair of
    columns (the index's study and patient columns) and reused; SQL constructs are immutable."""
    return and_(
        not_(_choice("deny", fac_col, pk_col)),
        or_(not_(_opt_in(fac_col)), _choice("permit", fac_col, pk_col)),
    )


class _Visible(ColumnElement[bool]):
    """One caller's condition on one record, as a single SQL element. SQLAlchemy finds a query's
    compiled form by a cache key it computes on every execution by walking the whole statement;
    walking the expanded condition (~200 elements: the consent and break-the-glass subqueries)
    cost more than running it. This element's key is its inputs alone: the record's columns,
    whether the caller acts for treatment, and the caller's facility and name as bound values
    (which the key hands to the cached compiled form, as for any bound value). It compiles to
    the expanded condition, which is built on those same bound values, in parentheses."""

    __visit_name__ = "scanonce_consent_visible"
    inherit_cache = True
    _traverse_internals = [
        ("fac_col", InternalTraversal.dp_clauseelement),
        ("pk_col", InternalTraversal.dp_clauseelement),
        ("treatment", InternalTraversal.dp_boolean),
        ("facility", InternalTraversal.dp_clauseelement),
        ("who", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, *, facility: str, who: str, treatment: bool, fac_col: Any, pk_col: Any) -> None:
        self.type = Boolean()
        self.fac_col = fac_col
        self.pk_col = pk_col
        self.treatment = treatment
        self.facility = literal(facility, String())
        self.who = literal(who, String())
        own = fac_col == self.facility
        shared: ColumnElement[bool] = _shared(fac_col, pk_col) if treatment else false()
        # Always in the condition, never asked beforehand: a query of its own for "does the
        # caller hold a grant?" cost every limited request a round trip (about half of
        # authorization's cost to a QIDO-RS); as the last term of the OR it runs only for rows
        # nothing else shows, on ix_break_glass_who.
        self.expanded = or_(own, shared, _glass_open(self.who, self.facility, pk_col))

    @property
    def _from_objects(self) -> list[FromClause]:
        # The tables its columns name, as the expanded condition would add to a statement.
        return self.expanded._from_objects


@compiles(_Visible)
def _compile_visible(element: _Visible, compiler: SQLCompiler, **kw: Any) -> str:
    # Parenthesised: it is an OR, and the statement around it knows only one element.
    return f"({compiler.process(element.expanded, **kw)})"


# Per caller (facility, who, purpose of use) and pair of columns: the condition, built once. A
# caller sends many requests with the same token, and building the condition cost as much as
# running it (~0.1 ms of SQL constructs per request, most of it the break-the-glass term); the
# grant's clock is read when the statement runs, so a cached condition never goes stale.
# Bounded: a caller pushed out is rebuilt on its next request, as every request was before.
_CALLERS_CACHED = 256


@functools.lru_cache(maxsize=_CALLERS_CACHED * 4)
def _condition(facility: str, who: str, treatment: bool, fac_col: Any, pk_col: Any) -> ColumnElement[bool]:
    return _Visible(facility=facility, who=who, treatment=treatment, fac_col=fac_col, pk_col=pk_col)


# The statements `Visibility` runs itself, built once per caller: a statement object reused
# keeps its SQL cache key, which SQLAlchemy otherwise recomputes on every execution by walking
# the whole condition (as long again as building it).
@functools.lru_cache(maxsize=_CALLERS_CACHED)
def _one_record_query(facility: str, who: str, treatment: bool) -> Select[Any]:
    return core_select(_condition(facility, who, treatment, _ONE_FACILITY, _ONE_PATIENT))


@functools.lru_cache(maxsize=_CALLERS_CACHED)
def _studies_query(facility: str, who: str, treatment: bool) -> Select[Any]:
    cond = _condition(facility, who, treatment, _study.c.facility_id, _study.c.patient_pk)
    return core_select(_study.c.pk).where(_study.c.pk.in_(_STUDY_PKS), cond)


@functools.lru_cache(maxsize=_CALLERS_CACHED)
def _records_query(facility: str, who: str, treatment: bool) -> Select[Any]:
    cond = _condition(facility, who, treatment, _RECORD_FACILITY, _RECORD_PK)
    return core_select(_identity.c.id).where(_identity.c.id.in_(_RECORD_IDS), cond)


class _HasStudy(Protocol):
    @property
    def study_pk(self) -> int: ...

    @property
    def facility_id(self) -> str: ...

    @property
    def patient_pk(self) -> int: ...


S = TypeVar("S", bound=_HasStudy)


@dataclass(frozen=True, slots=True)
class Visibility:
    """The rule for one caller, as an SQL condition on a record: called with the columns that name
    the record's facility and its patient row (study.facility_id, study.patient_pk, or the patient
    row's own), it returns the condition the index adds to its WHERE clause."""

    principal: Principal
    treatment: bool

    @property
    def _caller(self) -> tuple[str, str, bool]:
        return self.principal.facility, self.principal.who, self.treatment

    def __call__(self, fac_col: Any, pk_col: Any) -> ColumnElement[bool]:
        return _condition(*self._caller, fac_col, pk_col)

    def allows(self, *, session: Session, patient_pk: int, facility: str) -> bool:
        """May the caller see the record `patient_pk` that `facility` holds? One query (none for
        the caller's own facility), on bound parameters: its statement is the caller's, reused."""
        if facility == self.principal.facility:
            return True
        stmt = _one_record_query(*self._caller)
        return bool(session.execute(stmt, {"one_facility": facility, "one_patient": patient_pk}).scalar())

    def filter(self, *, session: Session, studies: Sequence[S]) -> tuple[list[S], int]:
        """(the studies the caller may see, how many were withheld). The rule depends only on a
        study's facility and patient row, so it is asked once per such pair, and not at all for
        the caller's own facility's studies: at most one query, none when all are its own."""
        own = self.principal.facility
        # One study stands for each other facility's (facility, patient row) pair.
        asked: dict[tuple[str, int], int] = {}
        for s in studies:
            if s.facility_id != own:
                asked.setdefault((s.facility_id, s.patient_pk), s.study_pk)
        shown: set[tuple[str, int]] = set()
        if asked:
            by_pk = {pk: pair for pair, pk in asked.items()}
            stmt = _studies_query(*self._caller)
            seen = session.execute(stmt, {"study_pks": list(by_pk)}).scalars()
            shown = {by_pk[pk] for pk in seen}
        kept = [s for s in studies if s.facility_id == own or (s.facility_id, s.patient_pk) in shown]
        return kept, len(studies) - len(kept)

    def records(self, *, session: Session, record_ids: Collection[int]) -> set[int]:
        """Of these identity record ids, those the caller may see (one query)."""
        if not record_ids:
            return set()
        stmt = _records_query(*self._caller)
        return set(session.execute(stmt, {"record_ids": list(record_ids)}).scalars())


def visibility(*, principal: Principal) -> Visibility | None:
    """The condition for `principal`, or None when consent does not limit it (administrators).
    It asks the database nothing: the query it joins does."""
    if not limited(principal):
        return None
    # A facility node acts for treatment by deployment (no purpose of use travels over DIMSE).
    treatment = principal.role not in CLINICAL_ROLES or purpose_is_treatment(principal)
    return Visibility(principal=principal, treatment=treatment)


def may_share(*, session: Session, patient_pk: int, from_facility: str, principal: Principal) -> bool:
    """May `principal` see the record `patient_pk` that `from_facility` holds? The one question."""
    rule = visibility(principal=principal)
    return (
        True if rule is None else rule.allows(session=session, patient_pk=patient_pk, facility=from_facility)
    )


def study_visible(*, session: Session, principal: Principal, study_uid: str) -> bool | None:
    """True or False for a study the index holds; None when it holds no such study."""
    row = session.execute(
        core_select(_study.c.facility_id, _study.c.patient_pk).where(_study.c.study_uid == study_uid)
    ).first()
    if row is None:
        return None
    return may_share(
        session=session, patient_pk=row.patient_pk, from_facility=row.facility_id, principal=principal
    )


def check_study(*, session: Session, principal: Principal, study_uid: str) -> None:
    """NotFound, worded as for a study the index does not hold, when `principal` may not see the
    study: a caller who may not know it exists learns nothing (no 403)."""
    if study_visible(session=session, principal=principal, study_uid=study_uid) is False:
        raise NotFound(f"no study {study_uid}")


def filter_studies(*, session: Session, principal: Principal, studies: Sequence[S]) -> tuple[list[S], int]:
    """(the studies `principal` may see, how many were withheld), at most one query."""
    rule = visibility(principal=principal)
    if rule is None:
        return list(studies), 0
    return rule.filter(session=session, studies=studies)


def record_filter(*, session: Session, principal: Principal) -> RecordFilter | None:
    """For identity's reads (FHIR Patient read and search, PIXm, the pages' name search): given
    identity record ids, those `principal` may see, by the same rule as studies (one query per
    call). None when consent does not limit the caller."""
    rule = visibility(principal=principal)
    if rule is None:
        return None

    def keep(record_ids: Collection[int]) -> set[int]:
        return rule.records(session=session, record_ids=record_ids)

    return keep


# -- break-the-glass in the audit trail ------------------------------------------------------------

# The audit subtypes that read patient data: the ones a grant can have opened.
_READS = frozenset({"query", "read", "retrieve", "import"})


def mark_emergency_accesses(*, session: Session, records: Sequence[AuditRecord]) -> None:
    """Flag, in place, each audit event of an access made under break-the-glass: its agent holds
    an active grant, and the event names a record of the granted person or names no patient at
    all (a query whose matches the grant may have widened). The flag is the purpose of use `BTG`
    (HL7 v3 ActReason) after the caller's own, so `purpose=BTG` lists them for a privacy officer.
    Wired into audit.append by the app: one indexed query per batch when no one holds a grant."""
    readers = {r.agent_who for r in records if r.agent_who and r.subtype in _READS}
    if not readers:
        return
    grants = session.execute(
        core_select(_glass.c.who, _glass.c.facility, _glass.c.patient_pk).where(
            _glass.c.who.in_(sorted(readers)), _glass.c.expires_at > _now()
        )
    ).all()
    if not grants:
        return
    # The granted persons now (links may have changed since the grant), per (who, facility).
    granted_pks = sorted({g.patient_pk for g in grants})
    person_of = dict(
        session.execute(
            core_select(_patient.c.pk, _patient.c.person_id).where(_patient.c.pk.in_(granted_pks))
        )
        .tuples()
        .all()
    )
    persons: dict[tuple[str, str], set[int | str]] = {}
    for g in grants:
        persons.setdefault((g.who, g.facility), set()).add(
            person_of.get(g.patient_pk) or f"pk:{g.patient_pk}"
        )
    named = {(r.patient_issuer, r.patient_id) for r in records if r.patient_id}
    # A record's (issuer, ID) to its person; a bare ID (a query without an issuer) to every
    # person with that ID.
    record_persons: dict[tuple[str, str], set[int | str]] = {}
    if named:
        for pk, issuer, pid, person in session.execute(
            core_select(_patient.c.pk, _patient.c.issuer, _patient.c.patient_id, _patient.c.person_id).where(
                _patient.c.patient_id.in_(sorted({pid for _i, pid in named}))
            )
        ).tuples():
            for key in ((issuer, pid), ("", pid)):
                record_persons.setdefault(key, set()).add(person or f"pk:{pk}")
    for r in records:
        held = persons.get((r.agent_who, r.agent_facility))
        if held is None or r.subtype not in _READS:
            continue
        if r.patient_id and not record_persons.get((r.patient_issuer, r.patient_id), set()) & held:
            continue
        codes = r.purpose_of_use.split()
        if audit.BREAK_THE_GLASS not in codes:
            r.purpose_of_use = " ".join([*codes, audit.BREAK_THE_GLASS])


# -- recording choices ---------------------------------------------------------------------------


def _record(session: Session, *, principal: Principal, facility: str, patient_id: str) -> Patient:
    """The patient record `patient_id` at `facility`. A caller not of that facility (other than
    an administrator) gets the same NotFound as for an unknown record: it may not learn whether
    another facility knows the patient."""
    missing = NotFound("no such patient at that facility")
    if principal.role is not Role.admin and principal.facility != facility:
        raise missing
    try:
        fac = facilities.get_facility(session=session, facility_id=facility)
    except NotFound:
        raise missing from None
    row = session.exec(
        select(Patient).where(Patient.issuer == fac.issuer, Patient.patient_id == patient_id)
    ).first()
    if row is None:
        raise missing
    return row


def _scope(session: Session, scope: str | None) -> str:
    if not scope:
        return ""
    try:
        facilities.get_facility(session=session, facility_id=scope)
    except NotFound:
        raise BadRequest("scope names no registered facility (omit it for every facility)") from None
    return scope


def record_consent(
    *,
    session: Session,
    principal: Principal,
    facility: str,
    patient_id: str,
    decision: str,
    scope: str | None = None,
    source: str = "api",
) -> Consent:
    """Record (or replace) the choice of the patient `patient_id` at `facility`: `deny` (opt out)
    or `permit` (opt in), for the person's records at `scope` (a facility) or everywhere."""
    if decision not in DECISIONS:
        raise BadRequest("decision must be deny or permit")
    if not patient_id or not patient_id.strip():
        raise BadRequest("patient_id is required")
    patient = _record(session, principal=principal, facility=facility, patient_id=patient_id.strip())
    return _store(
        session, principal=principal, patient=patient, decision=decision, scope=scope, source=source
    )


def record_consent_for_person(
    *,
    session: Session,
    principal: Principal,
    person_id: int,
    organization: str | None,
    decision: str,
    scope: str | None = None,
    source: str = "fhir",
) -> Consent:
    """The same for a person (FHIR's Patient id), given at `organization` (default: the caller's
    facility): kept against the person's record there."""
    if decision not in DECISIONS:
        raise BadRequest("decision must be deny or permit")
    at = organization or principal.facility
    missing = NotFound("no such patient at that facility")
    if principal.role is not Role.admin and principal.facility != at:
        raise missing
    rows = session.exec(
        select(Patient)
        .where(Patient.person_id == person_id, Patient.facility_id == at)
        .order_by(col(Patient.pk))
    ).all()
    if not rows:
        raise missing
    return _store(
        session, principal=principal, patient=rows[0], decision=decision, scope=scope, source=source
    )


def _store(
    session: Session, *, principal: Principal, patient: Patient, decision: str, scope: str | None, source: str
) -> Consent:
    assert patient.pk is not None
    scope_facility = _scope(session, scope)
    row = session.exec(
        select(Consent).where(Consent.patient_pk == patient.pk, Consent.scope_facility == scope_facility)
    ).first()
    now = _now()
    if row is None:
        row = Consent(
            patient_pk=patient.pk,
            recorded_at_facility=patient.facility_id,
            scope_facility=scope_facility,
            decision=decision,
        )
    row.person_id = patient.person_id
    row.decision = decision
    row.recorded_by = principal.who[:128]
    row.source = source
    row.recorded_at = now
    session.add(row)
    session.flush()
    _announce(
        session,
        principal=principal,
        action="consent.recorded",
        patient_pk=patient.pk,
        person_id=patient.person_id,
        at=now,
        detail={"consent_id": row.id, "decision": decision, "scope": scope_facility or "*"},
    )
    session.commit()
    session.refresh(row)
    return row


def consents_of(
    *, session: Session, principal: Principal, facility: str, patient_id: str
) -> tuple[Patient, list[Consent]]:
    """Every choice that applies to the person of the record `patient_id` at `facility`."""
    patient = _record(session, principal=principal, facility=facility, patient_id=patient_id.strip())
    return patient, consents_of_person(session=session, patient=patient)


def consents_of_person(*, session: Session, patient: Patient) -> list[Consent]:
    records = [patient.pk]
    if patient.person_id is not None:
        records = list(session.exec(select(Patient.pk).where(Patient.person_id == patient.person_id)).all())
    return list(
        session.exec(
            select(Consent).where(col(Consent.patient_pk).in_(records)).order_by(col(Consent.id))
        ).all()
    )


def consents_of_person_id(*, session: Session, principal: Principal, person_id: int) -> list[Consent]:
    """The choices of a person (FHIR search by patient). Outside an administrator, only a person
    with a record at the caller's facility: an unknown person and another facility's look alike."""
    records = session.exec(select(Patient).where(Patient.person_id == person_id)).all()
    if principal.role is not Role.admin and all(p.facility_id != principal.facility for p in records):
        return []
    if not records:
        return []
    return consents_of_person(session=session, patient=records[0])


def revoke_consent(*, session: Session, principal: Principal, consent_id: int) -> None:
    """Withdraw a choice (the facility's default applies again). Outside an administrator, only
    one recorded at the caller's facility; others are NotFound."""
    row = session.get(Consent, consent_id)
    if row is None or (principal.role is not Role.admin and row.recorded_at_facility != principal.facility):
        raise NotFound("no such consent")
    patient = session.get(Patient, row.patient_pk)
    _announce(
        session,
        principal=principal,
        action="consent.revoked",
        patient_pk=row.patient_pk,
        person_id=None if patient is None else patient.person_id,
        at=_now(),
        detail={"consent_id": row.id, "decision": row.decision, "scope": row.scope_facility or "*"},
    )
    session.delete(row)
    session.commit()


def patient_of(*, session: Session, patient_pk: int) -> Patient | None:
    return session.get(Patient, patient_pk)


# -- break-the-glass -----------------------------------------------------------------------------


def break_glass(
    *,
    session: Session,
    settings: Settings,
    principal: Principal,
    facility: str,
    patient_id: str,
    reason: str,
    minutes: int,
) -> BreakGlass:
    """Grant `principal` an emergency read of the person of `patient_id` (at `facility`) at every
    facility, whatever the consent, for `minutes` (at most the configured maximum). The reason is
    mandatory; the grant is announced to the audit trail and listed for review."""
    text = (reason or "").strip()
    if len(text) < 5:
        raise BadRequest("a reason is required (at least 5 characters): why is this an emergency?")
    if len(text) > 1000:
        raise BadRequest("the reason is too long (at most 1000 characters)")
    if minutes < 1 or minutes > settings.break_glass_max_minutes:
        raise BadRequest(f"minutes must be between 1 and {settings.break_glass_max_minutes}")
    if principal.role not in CLINICAL_ROLES and principal.role is not Role.admin:
        raise BadRequest("break-the-glass is for clinicians")
    try:
        fac = facilities.get_facility(session=session, facility_id=facility)
    except NotFound:
        raise NotFound("no such patient at that facility") from None
    patient = session.exec(
        select(Patient).where(Patient.issuer == fac.issuer, Patient.patient_id == patient_id.strip())
    ).first()
    if patient is None or patient.pk is None:
        raise NotFound("no such patient at that facility")
    now = _now()
    grant = BreakGlass(
        who=principal.who[:128],
        issuer=(principal.issuer or "")[:256],
        role=str(principal.role),
        facility=principal.facility,
        patient_pk=patient.pk,
        person_id=patient.person_id,
        reason=text,
        created_at=now,
        expires_at=now + timedelta(minutes=minutes),
    )
    session.add(grant)
    session.flush()
    _announce(
        session,
        principal=principal,
        action="break-glass.granted",
        patient_pk=patient.pk,
        person_id=patient.person_id,
        at=now,
        detail={"grant_id": grant.id, "minutes": minutes, "reason": text},
    )
    session.commit()
    session.refresh(grant)
    return grant


def break_glass_grants(*, session: Session, limit: int = 100, active_only: bool = False) -> list[BreakGlass]:
    """Grants for review, newest first."""
    stmt = select(BreakGlass).order_by(col(BreakGlass.id).desc()).limit(limit)
    if active_only:
        stmt = stmt.where(BreakGlass.expires_at > _now())
    return list(session.exec(stmt).all())


def mark_reviewed(*, session: Session, grant_id: int) -> BreakGlass:
    grant = session.get(BreakGlass, grant_id)
    if grant is None:
        raise NotFound("no such break-the-glass grant")
    grant.reviewed = True
    session.add(grant)
    session.commit()
    session.refresh(grant)
    return grant


def is_active(grant: BreakGlass, *, now: datetime | None = None) -> bool:
    expires = grant.expires_at
    if expires.tzinfo is None:  # SQLite hands back naive UTC
        expires = expires.replace(tzinfo=UTC)
    return expires > (now or _now())
