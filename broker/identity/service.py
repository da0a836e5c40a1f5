"""Patient identity: linking (issuer, value) records to persons (MPI).

Order of evidence, strongest first:
1. the same (issuer, value) is the same record;
2. a shared identifier from a trusted issuer (a national ID), or a record naming another
   record's (issuer, value) among its identifiers, links deterministically, unless the
   demographics contradict it (then a human reviews);
3. Fellegi–Sunter match weight over blocked candidates: auto-link above AUTO_WEIGHT when the
   name agrees *and* a birth date, address or phone agrees; a review item between the
   thresholds; a new person below.

Nothing is ever deleted: every change of a record's person is a `LinkEvent` with its method,
per-field contributions, who and why, and a merge can be split back by its group.

Functions never commit unless their name says a human or a feed made a decision (those are
called by routes/CLI/MLLP and commit themselves); `link_patient` runs inside ingest's
transaction.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, or_, text, update
from sqlalchemy import select as sa_select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from broker.errors import BadRequest, Conflict, NotFound
from broker.identity import matching
from broker.identity.matching import Demographics
from broker.identity.models import (
    BlockKey,
    IdentityIdentifier,
    IdentityRecord,
    IdentitySetting,
    LinkEvent,
    ModelParams,
    NoLink,
    Person,
    ReviewItem,
    TrustedIssuer,
)
from broker.identity.schemas import Identifier, LinkDecision, PersonView, RebuildResult
from broker.index.models import Patient
from broker.jobs import service as jobs
from broker.jobs.models import Job

log = logging.getLogger("scanonce.identity")

# Match weights (log2 Bayes factor). Exact name + exact birth date is ~ +26 with default
# parameters; a common exact name alone is ~ +12 (never enough: see auto_link_allowed).
# Conservative on purpose: a false link shows one patient's images to another patient's
# clinician, a miss only costs a review.
AUTO_WEIGHT = 16.0
REVIEW_WEIGHT = 10.0
# The smallest contribution that counts as a corroborating field agreeing.
CORROBORATION_BITS = 3.0
# Birth years at least this far apart are a generation (parent and child); closer plainly
# different dates are a wrong date, judged by the weight alone.
GENERATION_YEARS = 12
# A blocking key shared by more records than this says little; its candidates are cut.
KEY_CAP = 100
# Pseudo-count for term frequencies: a small index borrows the default name frequencies.
_TF_PSEUDO = 1000.0
# PostgreSQL advisory lock key that serializes linking (see _serialize_linking): any constant
# no other part of the broker uses ("SCANONCE" in ASCII).
_LINK_LOCK_KEY = 0x5343414E4F4E4345

_COLUMNS: tuple[Any, ...] = (
    IdentityRecord.id,
    IdentityRecord.person_id,
    IdentityRecord.issuer,
    IdentityRecord.family,
    IdentityRecord.given,
    IdentityRecord.middle,
    IdentityRecord.birth_date,
    IdentityRecord.sex,
    IdentityRecord.address,
    IdentityRecord.phone,
)


def _now() -> datetime:
    return datetime.now(UTC)


def _demo_of(rec: Any) -> Demographics:
    return Demographics(
        family=rec.family,
        given=rec.given,
        middle=rec.middle,
        birth_date=rec.birth_date,
        sex=rec.sex,
        address=rec.address,
        phone=rec.phone,
    )


# ---------------------------------------------------------------- parameters


_PARAMS_CACHE: dict[str, tuple[float, dict[str, Any]]] = {}
# Parameters change only when someone trains or sets thresholds; other processes notice
# within this many seconds (saves a query on every link).
_PARAMS_TTL = 10.0


def current_params(*, session: Session) -> dict[str, Any]:
    key = str(session.get_bind().engine.url)
    hit = _PARAMS_CACHE.get(key)
    if hit is not None and time.monotonic() - hit[0] < _PARAMS_TTL:
        return hit[1]
    row = session.exec(select(ModelParams).order_by(ModelParams.id.desc()).limit(1)).first()  # type: ignore[union-attr]
    params = matching.DEFAULT_PARAMS if row is None else json.loads(row.params)
    _PARAMS_CACHE[key] = (time.monotonic(), params)
    return params  # type: ignore[no-any-return]


def _forget_params(session: Session) -> None:
    _PARAMS_CACHE.pop(str(session.get_bind().engine.url), None)


def train(*, session: Session, max_pairs: int = 200_000, seed: int = 7) -> dict[str, Any]:
    """Estimate m/u from the records themselves (matching.fit_parameters): u from random pairs,
    m by EM over the pairs that blocking proposes, one training rule (key kind) at a time as
    Splink trains. Stores the result (used from the next link on)."""
    rows = session.execute(sa_select(*_COLUMNS)).all()
    if len(rows) < 50:
        raise BadRequest("too few identity records to estimate parameters (need at least 50)")
    demo = {r.id: _demo_of(r) for r in rows}
    ids = list(demo)
    rng = random.Random(seed)
    # Two distinct records per pair: a record compared with itself agrees on everything, and
    # in a small index those pairs alone would make a full address look 1e-4 likely by chance.
    drawn = (rng.sample(ids, 2) for _ in range(min(max_pairs, 50_000)))
    random_pairs = [(demo[a], demo[b]) for a, b in drawn]
    blocks: dict[str, list[int]] = {}
    for key, rid in session.exec(select(BlockKey.key, BlockKey.record_id)).all():  # type: ignore[call-overload]
        if matching.training_rule(key) is not None:
            blocks.setdefault(key, []).append(rid)
    by_rule: dict[str, set[tuple[int, int]]] = {}
    for key, members in blocks.items():
        if len(members) > KEY_CAP:
            continue
        seen = by_rule.setdefault(matching.training_rule(key) or "", set())
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                seen.add((a, b) if a < b else (b, a))
    levels_by_rule = {}
    n_pairs = 0
    for rule, seen in sorted(by_rule.items()):
        pairs = sorted(seen)
        rng.shuffle(pairs)
        pairs = pairs[:max_pairs]
        n_pairs += len(pairs)
        levels_by_rule[rule] = matching.level_matrix([(demo[a], demo[b]) for a, b in pairs])
    union = sorted(set().union(*by_rule.values()))
    blocked_pairs = len(union)
    rng.shuffle(union)
    params = matching.fit_parameters(
        random_levels=matching.level_matrix(random_pairs),
        levels_by_rule=levels_by_rule,
        blocked_levels=matching.level_matrix([(demo[a], demo[b]) for a, b in union[:max_pairs]]),
        blocked_pairs=blocked_pairs,
        records=len(ids),
    )
    if "policy" in current_params(session=session):
        params["policy"] = current_params(session=session)["policy"]
    session.add(ModelParams(params=json.dumps(params), pairs=n_pairs))
    session.commit()
    _forget_params(session)
    return params


def _term_frequencies(*, session: Session, d: Demographics, params: dict[str, Any]) -> dict[str, float]:
    """How common the record's family and given names are (one query: two index counts)."""
    row = session.execute(
        text(f"SELECT {_TF_COLUMNS}"),
        {"tf_f": d.family, "tf_g": d.given},
    ).one()
    return _tf_from_counts(d=d, counts=tuple(row), params=params)


_TF_COLUMNS = (
    "(SELECT max(id) FROM identity_record) AS tf_total,"
    " (SELECT count(*) FROM identity_record WHERE family = :tf_f) AS tf_family,"
    " (SELECT count(*) FROM identity_record WHERE given = :tf_g) AS tf_given"
)


def _tf_from_counts(*, d: Demographics, counts: tuple[Any, ...], params: dict[str, Any]) -> dict[str, float]:
    total = counts[0] or 0
    tf: dict[str, float] = {}
    for field, count in (("family", counts[1]), ("given", counts[2])):
        if getattr(d, field):
            prior_u = params["u"][field][0]
            tf[field] = (count + _TF_PSEUDO * prior_u) / (total + _TF_PSEUDO)
    return tf


# ---------------------------------------------------------------- trusted issuers


def set_trusted_issuer(*, session: Session, issuer: str, note: str = "") -> None:
    if not issuer.strip():
        raise BadRequest("issuer must not be empty")
    if session.get(TrustedIssuer, issuer) is None:
        session.add(TrustedIssuer(issuer=issuer, note=note))
        session.commit()


def _trusted(*, session: Session) -> set[str]:
    return set(session.exec(select(TrustedIssuer.issuer)).all())


# ---------------------------------------------------------------- records


def _check_identifier(ident: Identifier) -> Identifier:
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


def _set_keys(*, session: Session, record: IdentityRecord, d: Demographics, new: bool = False) -> None:
    if not new:
        session.execute(delete(BlockKey).where(BlockKey.record_id == record.id))  # type: ignore[arg-type]
    keys = matching.block_keys(d)
    if keys:
        session.execute(
            BlockKey.__table__.insert(),  # type: ignore[attr-defined]
            [{"key": k, "record_id": record.id} for k in keys],
        )


def _set_identifiers(*, session: Session, record: IdentityRecord, identifiers: Sequence[Identifier]) -> None:
    if not identifiers:
        return
    existing = {
        (i.issuer, i.value)
        for i in session.exec(select(IdentityIdentifier).where(IdentityIdentifier.record_id == record.id))
    }
    for ident in identifiers:
        key = (ident.issuer, ident.value)
        if key == (record.issuer, record.value) or key in existing:
            continue
        existing.add(key)
        session.add(IdentityIdentifier(record_id=record.id, issuer=ident.issuer, value=ident.value))  # type: ignore[arg-type]


def _sync_patients(*, session: Session, record_ids: Sequence[int]) -> None:
    """Mirror records' persons onto the index's patient rows, so studies follow their person."""
    if not record_ids:
        return
    rows = session.exec(
        select(IdentityRecord.patient_pk, IdentityRecord.person_id).where(
            IdentityRecord.id.in_(record_ids),  # type: ignore[union-attr]
            IdentityRecord.patient_pk.is_not(None),  # type: ignore[union-attr]
        )
    ).all()
    for patient_pk, person_id in rows:
        session.execute(update(Patient).where(Patient.pk == patient_pk).values(person_id=person_id))  # type: ignore[arg-type]


def _serialize_linking(*, session: Session) -> None:
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


# A lock taken for a move can find the person grown by then (a record linked in between):
# start over this many times, then tell the caller to try again.
_MOVE_ATTEMPTS = 5


def _lock_for_move(*, session: Session, persons: Callable[[], set[int]]) -> None:
    """Before a merge, manual link or unlink moves the records of `persons()`: lock what the
    move writes, in the one order every identity writer takes (PostgreSQL; SQLite has a
    single writer). Starts the caller's transaction: call before anything else is written.

    1. The index's patient rows of those records (the move sets their person_id), in key
       order, as ingest writes its patient rows and a feed locks its identifier's row before
       they link;
    2. the linking lock (`_serialize_linking`), so no record is linked to a person while it is
       being emptied, nor read as a candidate on the person it is leaving.

    Which records move is only known for sure under the linking lock; if a record with a
    patient row not yet locked joined them meanwhile, locking that row now would invert the
    order (and deadlock with an ingest holding it while it waits for the linking lock), so
    the transaction rolls back and starts over.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    for _ in range(_MOVE_ATTEMPTS):
        wanted = _patient_pks(session=session, persons=persons())
        if wanted:
            session.execute(
                sa_select(col(Patient.pk))
                .where(col(Patient.pk).in_(sorted(wanted)))
                .order_by(col(Patient.pk))
                .with_for_update(key_share=True)  # FOR NO KEY UPDATE: what the move's UPDATE takes
            )
        _serialize_linking(session=session)
        session.expire_all()  # what was read before the lock may be stale now
        if _patient_pks(session=session, persons=persons()) <= wanted:
            return
        session.rollback()
    raise Conflict("the person changed while being locked for this change; try again")


def _patient_pks(*, session: Session, persons: set[int]) -> set[int]:
    if not persons:
        return set()
    rows = session.exec(
        select(IdentityRecord.patient_pk).where(
            col(IdentityRecord.person_id).in_(persons), col(IdentityRecord.patient_pk).is_not(None)
        )
    ).all()
    return {pk for pk in rows if pk is not None}


def _new_person(*, session: Session) -> int:
    person = Person()
    session.add(person)
    session.flush()
    assert person.id is not None
    return person.id


def _event(
    *,
    session: Session,
    record: IdentityRecord,
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
    assert record.id is not None
    session.add(
        LinkEvent(
            record_id=record.id,
            person_id=person_id,
            previous_person_id=previous,
            method=method,
            weight=None if weight is None else round(weight, 3),
            matched_record_id=matched,
            contributions=json.dumps(contributions or {}),
            group_id=group,
            who=who[:128],
            why=why[:512],
        )
    )


def upsert_record(
    *,
    session: Session,
    identifier: Identifier,
    demographics: Demographics,
    identifiers: Sequence[Identifier] = (),
    facility_id: str | None = None,
    patient_pk: int | None = None,
    source: str = "dicom",
    who: str = "system",
) -> LinkDecision:
    """Create or update the record for `identifier` and link it; flushes, never commits.

    A feed (FHIR, HL7) is the registration system: its demographics win over what a DICOM
    header says about the same identifier.
    """
    ident = _check_identifier(identifier)
    others = [_check_identifier(i) for i in identifiers]
    if patient_pk is None:
        # A feed: lock the index's row for this identifier (if any) before the linking lock,
        # in the order ingest takes them (it writes its patient rows, then links), so a feed
        # and an ingest of the same patient wait for each other instead of deadlocking.
        patient_pk = session.exec(
            select(Patient.pk)
            .where(Patient.issuer == ident.issuer, Patient.patient_id == ident.value)
            .with_for_update(key_share=True)
        ).first()
    _serialize_linking(session=session)
    record = get_record(session=session, issuer=ident.issuer, value=ident.value)
    if record is not None:
        changed = False
        if source != "dicom" or record.source == "dicom":
            new = demographics.as_dict()
            if source == "dicom":
                # A header that leaves a field empty does not erase what an earlier one said.
                new = {k: v or getattr(record, k) for k, v in new.items()}
            if _demo_of(record).as_dict() != new:
                changed = True
                for k, v in new.items():
                    setattr(record, k, v)
            record.source = source
        if patient_pk is not None and record.patient_pk is None:
            record.patient_pk = patient_pk
        if facility_id and not record.facility_id:
            record.facility_id = facility_id
        record.updated_at = _now()
        session.add(record)
        session.flush()
        _set_identifiers(session=session, record=record, identifiers=others)
        if changed:
            _set_keys(session=session, record=record, d=_demo_of(record))
            decision = _relink_after_update(session=session, record=record, who=who)
        else:
            decision = LinkDecision(record_id=record.id, person_id=record.person_id, outcome="existing")  # type: ignore[arg-type]
        session.flush()
        _sync_patients(session=session, record_ids=[record.id])  # type: ignore[list-item]
        return decision

    decision_parts = _decide(session=session, d=demographics, identifiers=others, exclude_record=None)
    person_id = decision_parts["person_id"] or _new_person(session=session)
    record = IdentityRecord(
        issuer=ident.issuer,
        value=ident.value,
        person_id=person_id,
        facility_id=facility_id,
        patient_pk=patient_pk,
        source=source,
        **demographics.as_dict(),  # type: ignore[arg-type]
    )
    session.add(record)
    session.flush()
    assert record.id is not None
    _set_keys(session=session, record=record, d=demographics, new=True)
    _set_identifiers(session=session, record=record, identifiers=others)
    return _apply(session=session, record=record, parts=decision_parts, person_id=person_id, who=who)


def _apply(
    *, session: Session, record: IdentityRecord, parts: dict[str, Any], person_id: int, who: str
) -> LinkDecision:
    assert record.id is not None
    outcome = parts["outcome"]
    method = {"review": "new", "new": "new"}.get(outcome, outcome)
    _event(
        session=session,
        record=record,
        person_id=person_id,
        previous=None,
        method=method,
        weight=parts.get("weight"),
        matched=parts.get("matched"),
        contributions=parts.get("contributions"),
        who=who,
        why=parts.get("why", ""),
    )
    review_ids = _add_reviews(session=session, record_id=record.id, review=parts.get("review", []))
    if record.patient_pk is not None:
        session.execute(
            update(Patient).where(Patient.pk == record.patient_pk).values(person_id=person_id)  # type: ignore[arg-type]
        )
    return LinkDecision(
        record_id=record.id,
        person_id=person_id,
        outcome=outcome,
        weight=parts.get("weight"),
        matched_record_id=parts.get("matched"),
        contributions=parts.get("contributions") or {},
        review_ids=review_ids,
    )


def _add_reviews(
    *, session: Session, record_id: int, review: Sequence[tuple[int, matching.Score]]
) -> list[int]:
    ids: list[int] = []
    for cand_id, score in review:
        item = ReviewItem(
            record_id=record_id,
            candidate_record_id=cand_id,
            weight=round(score.weight, 3),
            contributions=json.dumps(score.contributions),
        )
        session.add(item)
        session.flush()
        assert item.id is not None
        ids.append(item.id)
    return ids


def _relink_after_update(*, session: Session, record: IdentityRecord, who: str) -> LinkDecision:
    """Changed demographics: a record alone in its person may now match someone; a linked
    record that no longer resembles its person goes to review (never split silently)."""
    assert record.id is not None
    d = _demo_of(record)
    params = current_params(session=session)
    mates = session.execute(
        sa_select(*_COLUMNS).where(
            col(IdentityRecord.person_id) == record.person_id,
            col(IdentityRecord.id) != record.id,
        )
    ).all()
    if not mates:
        manual = session.exec(
            select(LinkEvent.id).where(LinkEvent.record_id == record.id, LinkEvent.method == "manual-unlink")
        ).first()
        if manual is not None:
            return LinkDecision(record_id=record.id, person_id=record.person_id, outcome="existing")
        parts = _decide(session=session, d=d, identifiers=[], exclude_record=record.id)
        if parts["person_id"] is None:
            review_ids = _add_reviews(session=session, record_id=record.id, review=parts.get("review", []))
            return LinkDecision(
                record_id=record.id,
                person_id=record.person_id,
                outcome="review" if review_ids else "existing",
                review_ids=review_ids,
            )
        previous = record.person_id
        record.person_id = parts["person_id"]
        session.add(record)
        session.flush()
        _event(
            session=session,
            record=record,
            person_id=record.person_id,
            previous=previous,
            method=parts["outcome"],
            weight=parts.get("weight"),
            matched=parts.get("matched"),
            contributions=parts.get("contributions"),
            who=who,
            why="demographics updated",
        )
        # Questions asked about the old demographics are answered by the new ones.
        session.execute(
            update(ReviewItem)
            .where(col(ReviewItem.record_id) == record.id, col(ReviewItem.status) == "open")
            .values(
                status="superseded", reason="demographics updated, linked automatically", decided_at=_now()
            )
        )
        return LinkDecision(
            record_id=record.id,
            person_id=record.person_id,
            outcome=parts["outcome"],
            weight=parts.get("weight"),
            matched_record_id=parts.get("matched"),
            contributions=parts.get("contributions") or {},
        )
    tf = _term_frequencies(session=session, d=d, params=params)
    scores = [(m.id, matching.score_pair(d, _demo_of(m), params=params, tf=tf)) for m in mates]
    best_id, best = max(scores, key=lambda s: s[1].weight)
    if best.weight < policy(params)[1]:
        session.add(
            ReviewItem(
                record_id=record.id,
                candidate_record_id=best_id,
                weight=round(best.weight, 3),
                contributions=json.dumps(
                    {**best.contributions, "note": "update conflicts with linked person"}
                ),
            )
        )
    return LinkDecision(record_id=record.id, person_id=record.person_id, outcome="existing")


def _nolink_records(*, session: Session, record_id: int | None) -> set[int]:
    if record_id is None:
        return set()
    rows = session.exec(
        select(NoLink.record_a, NoLink.record_b).where(
            or_(NoLink.record_a == record_id, NoLink.record_b == record_id)  # type: ignore[arg-type]
        )
    ).all()
    return {b if a == record_id else a for a, b in rows}


def _decide(
    *,
    session: Session,
    d: Demographics,
    identifiers: Sequence[Identifier],
    exclude_record: int | None,
) -> dict[str, Any]:
    """Which person a record with demographics `d` belongs to (None = a new person)."""
    params = current_params(session=session)
    forbidden = _nolink_records(session=session, record_id=exclude_record)
    forbidden_persons: set[int] = set()
    if forbidden:
        forbidden_persons = set(
            session.exec(select(IdentityRecord.person_id).where(IdentityRecord.id.in_(forbidden))).all()  # type: ignore[union-attr]
        )

    # Deterministic: identifiers shared with existing records.
    if identifiers:
        trusted = _trusted(session=session)
        hit = _identifier_match(
            session=session, identifiers=identifiers, trusted=trusted, exclude=exclude_record
        )
        if hit is not None:
            method, other = hit
            score = matching.score_pair(d, _demo_of(other), params=params)
            if other.person_id not in forbidden_persons and score.weight >= 0:
                return {
                    "outcome": method,
                    "person_id": other.person_id,
                    "weight": score.weight,
                    "matched": other.id,
                    "contributions": score.contributions,
                    "why": "shared identifier",
                }
            return {
                "outcome": "review",
                "person_id": None,
                "review": [(other.id, score)],
                "why": "shared identifier but demographics disagree",
            }

    candidates, counts = _candidates(session=session, d=d, exclude=exclude_record)
    if not candidates:
        return {"outcome": "new", "person_id": None}
    tf = _tf_from_counts(d=d, counts=counts, params=params)
    best_by_person: dict[int, tuple[int, matching.Score]] = {}
    for row in candidates:
        if row.person_id in forbidden_persons:
            continue
        score = matching.score_pair(d, _demo_of(row), params=params, tf=tf)
        held = best_by_person.get(row.person_id)
        if held is None or score.weight > held[1].weight:
            best_by_person[row.person_id] = (row.id, score)
    auto, review_at, strict = policy(params)
    ranked = sorted(best_by_person.items(), key=lambda kv: kv[1][1].weight, reverse=True)
    if not ranked or ranked[0][1][1].weight < review_at:
        return {"outcome": "new", "person_id": None}
    person_id, (rec_id, best) = ranked[0]
    rivals = [kv for kv in ranked[1:] if kv[1][1].weight >= review_at]
    if (
        best.weight >= auto
        and auto_link_allowed(best, strict=strict)
        # Another person as likely is ambiguity, unless the rules call that pair two people
        # (the new record's twin, father or son): then it is no rival to the one it matches.
        and not any(r[1][1].weight >= auto and auto_link_allowed(r[1][1], strict=strict) for r in rivals)
    ):
        return {
            "outcome": "probabilistic",
            "person_id": person_id,
            "weight": best.weight,
            "matched": rec_id,
            "contributions": best.contributions,
        }
    review = [(rid, s) for _pid, (rid, s) in [ranked[0], *rivals][:3]]
    return {"outcome": "review", "person_id": None, "review": review, "why": "candidate needs review"}


def auto_link_allowed(score: matching.Score, *, strict: bool = True) -> bool:
    """Never on the name alone: a birth date, address or phone must agree too.

    `strict` (the default) also needs a name to agree, and sends the classic false-link
    patterns to review: twins or siblings (same family name and address, given names plainly
    different, not a typo of each other) and father/son (same names and address, birth dates
    plainly different and a generation apart). Without `strict` the Fellegi–Sunter weight
    decides, and a pair whose names both disagree needs two other fields to agree.
    """
    name_ok = any(score.contribution(f) > 0 for f in matching.NAME_FIELDS)
    agreeing = sum(score.contribution(f) >= CORROBORATION_BITS for f in matching.CORROBORATING)
    if agreeing == 0:
        return False
    if not strict:
        return name_ok or agreeing >= 2
    if not name_ok:
        return False
    family_level = score.levels[matching.FIELDS.index("family")]
    given_level = score.levels[matching.FIELDS.index("given")]
    date_level = score.levels[matching.FIELDS.index("birth_date")]
    # Read crossed, either name could be the given name (which record was swapped is unknown):
    # SONJA^NGUYEN against NGUYEN^PIA agrees on NGUYEN only, and that is the twin pattern.
    if given_level == 3 or (score.swapped and family_level == 3):
        return False
    return not (date_level == 3 and score.years_apart >= GENERATION_YEARS)


def policy(params: dict[str, Any]) -> tuple[float, float, bool]:
    """(auto-link weight, review weight, strict) for a parameter set."""
    pol = params.get("policy", {})
    return (
        float(pol.get("auto", AUTO_WEIGHT)),
        float(pol.get("review", REVIEW_WEIGHT)),
        bool(pol.get("strict", True)),
    )


def set_policy(
    *, session: Session, auto: float | None = None, review: float | None = None, strict: bool | None = None
) -> dict[str, Any]:
    """Store new thresholds (a new parameter row, so earlier decisions stay explainable)."""
    params = dict(current_params(session=session))
    a, r, st = policy(params)
    a, r, st = (
        (a if auto is None else auto),
        (r if review is None else review),
        (st if strict is None else strict),
    )
    if r > a:
        raise BadRequest("the review threshold must not be above the auto-link threshold")
    params["policy"] = {"auto": a, "review": r, "strict": st}
    session.add(ModelParams(params=json.dumps(params), pairs=0))
    session.commit()
    _forget_params(session)
    return params


def _identifier_match(
    *, session: Session, identifiers: Sequence[Identifier], trusted: set[str], exclude: int | None
) -> tuple[str, Any] | None:
    for ident in identifiers:
        # A record whose own (issuer, value) is this identifier: the sender asserts it is the same.
        own = session.execute(
            sa_select(*_COLUMNS).where(
                col(IdentityRecord.issuer) == ident.issuer,
                col(IdentityRecord.value) == ident.value,
            )
        ).first()
        if own is not None and own.id != exclude:
            return ("trusted-identifier" if ident.issuer in trusted else "identifier"), own
        if ident.issuer in trusted:
            other = session.execute(
                sa_select(*_COLUMNS)
                .join(IdentityIdentifier, IdentityIdentifier.record_id == IdentityRecord.id)  # type: ignore[arg-type]
                .where(IdentityIdentifier.issuer == ident.issuer, IdentityIdentifier.value == ident.value)  # type: ignore[arg-type]
            ).first()
            if other is not None and other.id != exclude:
                return "trusted-identifier", other
    return None


def _candidates(
    *, session: Session, d: Demographics, exclude: int | None
) -> tuple[list[Any], tuple[Any, ...]]:
    """Records sharing a blocking key with `d`, and the name counts for term frequencies, in
    one round trip (the counts only matter when there are candidates to score).

    A key shared by more than KEY_CAP records (SMITH + JOHN, no birth date) is dropped rather
    than cut arbitrarily: it says little, and the other keys of a true match still find it.
    """
    keys = sorted(matching.query_keys(d))
    if not keys:
        return [], ()
    parts = [
        f"SELECT * FROM (SELECT key, record_id FROM identity_block WHERE key = :k{i} "
        f"LIMIT {KEY_CAP + 1}) AS b{i}"
        for i in range(len(keys))
    ]
    sql = text(
        f"WITH k AS ({' UNION ALL '.join(parts)}),"
        f" crowded AS (SELECT key FROM k GROUP BY key HAVING count(*) > {KEY_CAP})"
        f" SELECT r.id, r.person_id, r.issuer, r.family, r.given, r.middle, r.birth_date, r.sex,"
        f" r.address, r.phone, {_TF_COLUMNS} FROM identity_record r"
        f" WHERE r.id IN (SELECT record_id FROM k WHERE key NOT IN (SELECT key FROM crowded))"
    )
    params: dict[str, Any] = {f"k{i}": k for i, k in enumerate(keys)}
    params.update(tf_f=d.family, tf_g=d.given)
    rows = [r for r in session.execute(sql, params).all() if r.id != exclude]
    counts = (rows[0].tf_total, rows[0].tf_family, rows[0].tf_given) if rows else ()
    return rows, counts


# ---------------------------------------------------------------- DICOM ingest hook


def _json_values(attrs: dict[str, Any], tag: str) -> list[Any]:
    item = attrs.get(tag)
    return list(item.get("Value") or []) if isinstance(item, dict) else []


def patient_extras(dataset: Any) -> tuple[str, str, list[Identifier]]:
    """(address, telephone, other identifiers) from a pydicom Dataset or a DICOM JSON object.

    Other identifiers come from OtherPatientIDsSequence items that name an issuer; the caller
    keeps only issuers the broker knows (an ID under an unknown issuer is a bare ID).
    """
    if dataset is None:
        return "", "", []
    if isinstance(dataset, dict):  # DICOM JSON model (PS3.18 F.2), as ingest parses it
        address = " ".join(str(v) for v in _json_values(dataset, "00101040"))
        phone = str(next(iter(_json_values(dataset, "00102154")), "") or "")
        items = [
            (
                str(next(iter(_json_values(it, "00100020")), "") or ""),
                str(next(iter(_json_values(it, "00100021")), "") or ""),
            )
            for it in _json_values(dataset, "00101002")
            if isinstance(it, dict)
        ]
    else:
        address = str(getattr(dataset, "PatientAddress", "") or "")
        phone = str(getattr(dataset, "PatientTelephoneNumbers", "") or "")
        items = [
            (str(getattr(it, "PatientID", "") or ""), str(getattr(it, "IssuerOfPatientID", "") or ""))
            for it in getattr(dataset, "OtherPatientIDsSequence", None) or []
        ]
    others = [Identifier(issuer=i.strip(), value=v.strip()) for v, i in items if v.strip() and i.strip()]
    return address, phone, others


def link_patient(*, session: Session, patient: Patient, dataset: Any = None) -> None:
    """Called by ingest after a patient row is created or its demographics change.

    Sets `patient.person_id`. `dataset` (optional: a pydicom Dataset or the instance's DICOM
    JSON attributes) adds the address, telephone and OtherPatientIDsSequence, which the patient
    row does not hold. Flushes only: the caller's transaction commits.
    """
    if patient.pk is None:
        session.add(patient)
        session.flush()
    address, phone, others = patient_extras(dataset)
    if others:
        from broker.facilities.models import Facility

        known = set(session.exec(select(Facility.issuer)).all()) | _trusted(session=session)
        others = [i for i in others if i.issuer in known]
    d = matching.demographics(
        patient_name=patient.patient_name,
        birth_date=patient.birth_date,
        sex=patient.sex,
        address=address,
        phone=phone,
        lenient_date=True,
    )
    decision = upsert_record(
        session=session,
        identifier=Identifier(issuer=patient.issuer, value=patient.patient_id),
        demographics=d,
        identifiers=others,
        facility_id=patient.facility_id,
        patient_pk=patient.pk,
        source="dicom",
    )
    patient.person_id = decision.person_id


# ---------------------------------------------------------------- merges and manual decisions


def _move_person(
    *,
    session: Session,
    from_person: int,
    to_person: int,
    method: str,
    who: str,
    why: str,
    matched: int | None = None,
    only: Sequence[int] | None = None,
) -> str:
    """Move records (all of `from_person`'s, or `only` those) to `to_person`, as one group."""
    group = uuid.uuid4().hex
    stmt = select(IdentityRecord).where(IdentityRecord.person_id == from_person)
    if only is not None:
        stmt = stmt.where(IdentityRecord.id.in_(only))  # type: ignore[union-attr]
    moved = list(session.exec(stmt))
    for rec in moved:
        rec.person_id = to_person
        session.add(rec)
        _event(
            session=session,
            record=rec,
            person_id=to_person,
            previous=from_person,
            method=method,
            matched=matched,
            group=group,
            who=who,
            why=why,
        )
    session.flush()
    _sync_patients(session=session, record_ids=[r.id for r in moved if r.id is not None])
    return group


def _require_why(who: str, why: str) -> None:
    if not who.strip():
        raise BadRequest("a manual decision must say who made it")
    if not why.strip():
        raise BadRequest("a manual decision must say why")


def _record(session: Session, record_id: int) -> IdentityRecord:
    rec = session.get(IdentityRecord, record_id)
    if rec is None:
        raise NotFound(f"no identity record {record_id}")
    return rec


def merge(
    *, session: Session, survivor: Identifier, merged: Identifier, who: str, why: str = "A40 merge"
) -> LinkDecision:
    """IHE ITI-8 merge: `merged` is retired into `survivor`; its person's records (and so their
    studies) move to the survivor's person. Commits. An unlink of the merged record splits back."""
    surv = get_record(session=session, issuer=survivor.issuer, value=survivor.value)
    old = get_record(session=session, issuer=merged.issuer, value=merged.value)
    if surv is None:
        raise NotFound("surviving patient identifier is unknown")
    if old is None:
        raise NotFound("merged (prior) patient identifier is unknown")
    if surv.id == old.id:
        raise BadRequest("a record cannot be merged into itself")
    assert surv.id is not None and old.id is not None
    old_id = old.id
    _lock_for_move(session=session, persons=lambda: {_record(session, old_id).person_id})
    old.merged_into = surv.id
    session.add(old)
    if old.person_id != surv.person_id:
        _move_person(
            session=session,
            from_person=old.person_id,
            to_person=surv.person_id,
            method="merge",
            who=who,
            why=why,
            matched=surv.id,
        )
    session.commit()
    return LinkDecision(
        record_id=old.id, person_id=surv.person_id, outcome="identifier", matched_record_id=surv.id
    )


def manual_link(*, session: Session, record_id: int, to_record_id: int, who: str, why: str) -> LinkDecision:
    """A human says two records are one person: the record's whole person joins the other's."""
    _require_why(who, why)
    rec, target = _record(session, record_id), _record(session, to_record_id)
    assert rec.id is not None and target.id is not None
    _lock_for_move(session=session, persons=lambda: {_record(session, record_id).person_id})
    # A human overrides an earlier "different people" decision; drop it so it cannot contradict.
    session.execute(
        delete(NoLink).where(  # type: ignore[arg-type]
            or_(
                and_(NoLink.record_a == rec.id, NoLink.record_b == target.id),  # type: ignore[arg-type]
                and_(NoLink.record_a == target.id, NoLink.record_b == rec.id),  # type: ignore[arg-type]
            )
        )
    )
    if rec.person_id != target.person_id:
        _move_person(
            session=session,
            from_person=rec.person_id,
            to_person=target.person_id,
            method="manual-link",
            who=who,
            why=why,
            matched=target.id,
        )
    _close_reviews(session=session, record_ids={rec.id, target.id}, status="linked", who=who, why=why)
    session.commit()
    return LinkDecision(
        record_id=rec.id, person_id=target.person_id, outcome="existing", matched_record_id=target.id
    )


def unlink(*, session: Session, record_id: int, who: str, why: str) -> LinkDecision:
    """Split a record out of its person. If it arrived by a merge or link that moved a group of
    records, the whole group goes back to the person it came from; otherwise the record gets a
    person of its own. Either way the split is remembered so automatic linking won't redo it."""
    _require_why(who, why)
    rec = _record(session, record_id)
    assert rec.id is not None
    _lock_for_move(session=session, persons=lambda: {_record(session, record_id).person_id})
    last = session.exec(
        select(LinkEvent)
        .where(LinkEvent.record_id == rec.id, LinkEvent.person_id == rec.person_id)
        .order_by(LinkEvent.id.desc())  # type: ignore[union-attr]
        .limit(1)
    ).first()
    current = rec.person_id
    mates_before = [
        r.id
        for r in session.exec(select(IdentityRecord).where(IdentityRecord.person_id == current))
        if r.id is not None
    ]
    if len(mates_before) <= 1:
        raise Conflict("record is not linked to any other record")
    if last is not None and last.group_id and last.previous_person_id is not None:
        group_records = [
            e.record_id for e in session.exec(select(LinkEvent).where(LinkEvent.group_id == last.group_id))
        ]
        movers = [r for r in group_records if r in mates_before]
        target = last.previous_person_id
        if len(movers) >= len(mates_before):  # the whole person came in: give the rest a new one
            target = _new_person(session=session)
    else:
        movers = [rec.id]
        target = _new_person(session=session)
    _move_person(
        session=session,
        from_person=current,
        to_person=target,
        method="manual-unlink",
        who=who,
        why=why,
        only=movers,
    )
    stayers = [r for r in mates_before if r not in movers]
    for a in movers:
        for b in stayers:
            key = (min(a, b), max(a, b))
            if session.get(NoLink, key) is None:
                session.add(NoLink(record_a=key[0], record_b=key[1], who=who[:128], why=why[:512]))
    rec.merged_into = None
    session.add(rec)
    session.commit()
    return LinkDecision(record_id=rec.id, person_id=target, outcome="existing")


def _close_reviews(*, session: Session, record_ids: set[int], status: str, who: str, why: str) -> None:
    for item in session.exec(
        select(ReviewItem).where(
            ReviewItem.status == "open",
            or_(ReviewItem.record_id.in_(record_ids), ReviewItem.candidate_record_id.in_(record_ids)),  # type: ignore[attr-defined]
        )
    ):
        pair = {item.record_id, item.candidate_record_id}
        if pair <= record_ids:
            item.status, item.decided_by, item.reason, item.decided_at = status, who, why, _now()
            session.add(item)


def review_queue(
    *, session: Session, status: str = "open", limit: int = 100, offset: int = 0
) -> list[ReviewItem]:
    return list(
        session.exec(
            select(ReviewItem)
            .where(ReviewItem.status == status)
            .order_by(ReviewItem.weight.desc(), ReviewItem.id)  # type: ignore[attr-defined, arg-type]
            .offset(offset)
            .limit(limit)
        )
    )


def decide_review(*, session: Session, review_id: int, decision: str, who: str, why: str) -> ReviewItem:
    _require_why(who, why)
    item = session.get(ReviewItem, review_id)
    if item is None:
        raise NotFound(f"no review item {review_id}")
    if item.status != "open":
        raise Conflict(f"review item {review_id} was already decided ({item.status})")
    if decision == "link":
        manual_link(
            session=session, record_id=item.record_id, to_record_id=item.candidate_record_id, who=who, why=why
        )
        item.status = "linked"
    elif decision == "reject":
        a, b = sorted((item.record_id, item.candidate_record_id))
        if session.get(NoLink, (a, b)) is None:
            session.add(NoLink(record_a=a, record_b=b, who=who[:128], why=why[:512]))
        item.status = "rejected"
    else:
        raise BadRequest("decision must be 'link' or 'reject'")
    item.decided_by, item.reason, item.decided_at = who[:128], why[:512], _now()
    session.add(item)
    session.commit()
    session.refresh(item)
    return item


def explain(*, session: Session, record_id: int) -> dict[str, Any]:
    """Why a record belongs to its person: the history of its links and, against each other
    record of the person, today's per-field comparison."""
    rec = _record(session, record_id)
    params = current_params(session=session)
    d = _demo_of(rec)
    history = [
        {
            "at": e.created_at.isoformat(),
            "method": e.method,
            "person_id": e.person_id,
            "previous_person_id": e.previous_person_id,
            "weight": e.weight,
            "matched_record_id": e.matched_record_id,
            "contributions": json.loads(e.contributions),
            "who": e.who,
            "why": e.why,
        }
        for e in session.exec(
            select(LinkEvent).where(LinkEvent.record_id == rec.id).order_by(LinkEvent.id)  # type: ignore[arg-type]
        )
    ]
    mates = session.execute(
        sa_select(*_COLUMNS).where(IdentityRecord.person_id == rec.person_id, IdentityRecord.id != rec.id)  # type: ignore[arg-type]
    ).all()
    comparisons = []
    for m in mates:
        s = matching.score_pair(d, _demo_of(m), params=params)
        comparisons.append(
            {
                "record_id": m.id,
                "issuer": m.issuer,
                "weight": round(s.weight, 3),
                "probability": matching.probability(s.weight, params=params),
                "contributions": s.contributions,
            }
        )
    return {
        "record_id": rec.id,
        "identifier": {"issuer": rec.issuer, "value": rec.value},
        "person_id": rec.person_id,
        "merged_into": rec.merged_into,
        "history": history,
        "compared_with_person": comparisons,
        "thresholds": dict(zip(("auto", "review", "strict"), policy(params), strict=True)),
    }


# ---------------------------------------------------------------- queries (PIXm, PDQm)


def person_identifiers(*, session: Session, person_id: int) -> list[Identifier]:
    recs = session.exec(
        select(IdentityRecord).where(IdentityRecord.person_id == person_id).order_by(IdentityRecord.id)  # type: ignore[arg-type]
    ).all()  # type: ignore[arg-type]
    out: list[Identifier] = []
    seen: set[tuple[str, str]] = set()
    rec_ids = [r.id for r in recs]
    extra = session.exec(select(IdentityIdentifier).where(IdentityIdentifier.record_id.in_(rec_ids))).all()  # type: ignore[attr-defined]
    for issuer, value in [(r.issuer, r.value) for r in recs] + [(i.issuer, i.value) for i in extra]:
        if (issuer, value) not in seen:
            seen.add((issuer, value))
            out.append(Identifier(issuer=issuer, value=value))
    return out


def cross_reference(
    *, session: Session, identifier: Identifier, target_issuers: Sequence[str] = ()
) -> list[Identifier]:
    """PIXm: every other identifier of the person `identifier` belongs to (NotFound if unknown)."""
    ident = _check_identifier(identifier)
    rec = get_record(session=session, issuer=ident.issuer, value=ident.value)
    if rec is None:
        owner = session.exec(
            select(IdentityIdentifier).where(
                IdentityIdentifier.issuer == ident.issuer, IdentityIdentifier.value == ident.value
            )
        ).first()
        if owner is None:
            raise NotFound("source identifier is unknown")
        rec = _record(session, owner.record_id)
    ids = [i for i in person_identifiers(session=session, person_id=rec.person_id) if i != ident]
    if target_issuers:
        wanted = set(target_issuers)
        ids = [i for i in ids if i.issuer in wanted]
    return ids


def person_view(*, session: Session, person_id: int) -> PersonView:
    recs = session.exec(
        select(IdentityRecord)
        .where(IdentityRecord.person_id == person_id)
        .order_by(IdentityRecord.updated_at.desc())  # type: ignore[attr-defined]
    ).all()
    if not recs:
        raise NotFound(f"no person {person_id}")

    def first(field: str) -> str:
        return next((getattr(r, field) for r in recs if getattr(r, field)), "")

    return PersonView(
        person_id=person_id,
        identifiers=person_identifiers(session=session, person_id=person_id),
        **{f: first(f) for f in matching.FIELDS},
    )


def search_persons(
    *,
    session: Session,
    family: str | None = None,
    given: str | None = None,
    birth_date: str | None = None,
    identifier: Identifier | None = None,
    limit: int = 50,
) -> list[PersonView]:
    """PDQm: persons matching all given demographics (names: exact or prefix, case-insensitive)."""
    stmt = select(IdentityRecord.person_id).distinct()
    if identifier is not None:
        ident = _check_identifier(identifier)
        by_own = select(IdentityRecord.person_id).where(
            IdentityRecord.issuer == ident.issuer, IdentityRecord.value == ident.value
        )
        by_other = (
            select(IdentityRecord.person_id)
            .join(IdentityIdentifier, IdentityIdentifier.record_id == IdentityRecord.id)  # type: ignore[arg-type]
            .where(IdentityIdentifier.issuer == ident.issuer, IdentityIdentifier.value == ident.value)
        )
        persons = set(session.exec(by_own).all()) | set(session.exec(by_other).all())
        stmt = stmt.where(IdentityRecord.person_id.in_(persons))  # type: ignore[attr-defined]
    criteria = False
    if family is not None:
        f = matching.normalize_name_part(family)
        if not f:
            raise BadRequest("family must contain letters")
        stmt = stmt.where(IdentityRecord.family.startswith(f))  # type: ignore[attr-defined]
        criteria = True
    if given is not None:
        g = matching.normalize_name_part(given)
        if not g:
            raise BadRequest("given must contain letters")
        stmt = stmt.where(IdentityRecord.given.startswith(g))  # type: ignore[attr-defined]
        criteria = True
    if birth_date is not None:
        b = matching.normalize_date(birth_date)
        if not b:
            raise BadRequest("birthdate must be a real date (YYYY-MM-DD)")
        stmt = stmt.where(IdentityRecord.birth_date == b)
        criteria = True
    if identifier is None and not criteria:
        raise BadRequest("give at least one of family, given, birthdate, identifier")
    person_ids = list(session.exec(stmt.limit(limit)).all())
    return [person_view(session=session, person_id=p) for p in person_ids]


# ---------------------------------------------------------------- blocking-key rebuild

KEYS_JOB = "identity-keys"
_KEYS_VERSION = "keys_version"
_KEYS_CURSOR = "keys_rebuild"
# Records per batch: a batch holds the linking lock while it writes, and links wait that long
# at most (0.16-0.26 s measured for 1,000 records getting ~3.7 new keys each; docs/identity.md).
REBUILD_BATCH = 1000


def keys_version(*, session: Session) -> int:
    """The `matching.block_keys` version the stored keys were computed with (0: before versions)."""
    row = session.get(IdentitySetting, _KEYS_VERSION)
    return int(row.value) if row is not None and row.value.isdigit() else 0


def _put_setting(*, session: Session, name: str, value: str) -> None:
    # UPDATE first: on SQLite a write statement takes the database's write lock, so the reads
    # that follow in this transaction cannot be overtaken by another writer's commit.
    done = session.execute(
        update(IdentitySetting).where(col(IdentitySetting.name) == name).values(value=value)
    )
    if not done.rowcount:  # type: ignore[attr-defined]
        session.execute(IdentitySetting.__table__.insert().values(name=name, value=value))  # type: ignore[attr-defined]


def _rebuild_batch(
    *, session: Session, after: int, batch: int
) -> tuple[int, int, int, int, int, float] | None:
    """Recompute the keys of the next `batch` records after id `after`, writing only the
    difference; the cursor moves in the same transaction. None when no record is left.
    Returns (last id, records, records changed, keys added, keys removed, seconds locked)."""
    # Read and compute first, without the linking lock: that is most of the work, and links
    # waiting on the lock would wait for it.
    rows = session.execute(
        sa_select(*_COLUMNS, col(IdentityRecord.updated_at))
        .where(col(IdentityRecord.id) > after)
        .order_by(col(IdentityRecord.id))
        .limit(batch)
    ).all()
    if not rows:
        session.rollback()
        return None
    lo, hi = rows[0].id, rows[-1].id
    stored: dict[int, set[str]] = {}
    for key, rid in session.execute(
        sa_select(col(BlockKey.key), col(BlockKey.record_id)).where(col(BlockKey.record_id).between(lo, hi))
    ).all():
        stored.setdefault(rid, set()).add(key)
    session.rollback()
    want = {r.id: matching.block_keys(_demo_of(r)) for r in rows}
    read_at = {r.id: r.updated_at for r in rows}

    locked = time.monotonic()
    _serialize_linking(session=session)
    _put_setting(  # first write: on SQLite it takes the write lock before the next read
        session=session, name=_KEYS_CURSOR, value=json.dumps({"v": matching.KEYS_VERSION, "after": after})
    )
    # A record updated since it was read got its keys from its new demographics when it was
    # relinked: leave it (under the lock nothing else changes keys).
    now_at = dict(
        session.execute(
            sa_select(col(IdentityRecord.id), col(IdentityRecord.updated_at)).where(
                col(IdentityRecord.id).between(lo, hi)
            )
        ).all()
    )
    keep = {rid for rid, at in read_at.items() if now_at.get(rid) == at}
    # Only the difference is written: a version that adds key kinds inserts the new keys and
    # leaves the rest (a third of the writes of delete-all-and-insert).
    stale = [{"k": k, "r": rid} for rid in keep for k in stored.get(rid, set()) - want[rid]]
    missing = [{"key": k, "record_id": rid} for rid in keep for k in want[rid] - stored.get(rid, set())]
    table = BlockKey.__table__  # type: ignore[attr-defined]
    if stale:
        session.connection().execute(
            table.delete().where(table.c.key == bindparam("k"), table.c.record_id == bindparam("r")), stale
        )
    if missing:
        # A key already there (another rebuild run at the same time) is as good as ours.
        insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        session.connection().execute(insert(table).on_conflict_do_nothing(), missing)
    _put_setting(
        session=session, name=_KEYS_CURSOR, value=json.dumps({"v": matching.KEYS_VERSION, "after": hi})
    )
    session.commit()
    changed = {row["r"] for row in stale} | {row["record_id"] for row in missing}
    return hi, len(rows), len(changed), len(missing), len(stale), time.monotonic() - locked


def rebuild_keys(
    *,
    session: Session,
    batch: int = REBUILD_BATCH,
    progress: Callable[[int, int], None] | None = None,
) -> RebuildResult:
    """Recompute every record's blocking keys from its stored demographics, `batch` records per
    transaction, then record the keys version. Commits each batch.

    Idempotent (a record whose keys are already right is not written) and restartable: the
    cursor is stored with each batch, so an interrupted rebuild of this keys version resumes
    after the last committed batch. Linking may go on meanwhile: a batch reads and computes
    without the linking lock and holds it only to write (a record relinked in between keeps
    the keys its relink gave it). `progress(done, total)` after each batch.
    """
    if batch < 1:
        raise BadRequest("batch must be at least 1")
    started = time.monotonic()
    after = 0
    row = session.get(IdentitySetting, _KEYS_CURSOR)
    if row is not None:
        note = json.loads(row.value or "{}")
        if note.get("v") == matching.KEYS_VERSION:
            after = int(note.get("after") or 0)
    total = session.execute(sa_select(func.count()).select_from(IdentityRecord)).scalar_one()
    done = session.execute(
        sa_select(func.count()).select_from(IdentityRecord).where(col(IdentityRecord.id) <= after)
    ).scalar_one()
    session.rollback()  # end the read transaction: each batch is its own
    if progress is not None:
        progress(done, total)
    records = changed = added = removed = 0
    longest_lock = 0.0
    while True:
        step = _rebuild_batch(session=session, after=after, batch=batch)
        if step is None:
            break
        after, n, c, a, r, held = step
        records, changed, added, removed = records + n, changed + c, added + a, removed + r
        longest_lock = max(longest_lock, held)
        done += n
        if progress is not None:
            progress(done, max(total, done))
    _put_setting(session=session, name=_KEYS_VERSION, value=str(matching.KEYS_VERSION))
    session.execute(delete(IdentitySetting).where(col(IdentitySetting.name) == _KEYS_CURSOR))
    session.commit()
    return RebuildResult(
        records=records,
        changed=changed,
        keys_added=added,
        keys_removed=removed,
        seconds=time.monotonic() - started,
        longest_lock_seconds=longest_lock,
    )


def ensure_keys_current(*, engine: Engine) -> Job | None:
    """At startup: queue a rebuild of the blocking keys if they are older than the code's
    (`matching.KEYS_VERSION`). One query when they are current.

    A durable job rather than a rebuild inside startup: a million records take minutes, and
    the broker should serve meanwhile (records linked meanwhile already get the new keys; old
    ones are found by the keys they share with the old version until their batch is done).
    An index with no records is current at once."""
    with Session(engine) as session:
        if keys_version(session=session) >= matching.KEYS_VERSION:
            return None
        if session.exec(select(IdentityRecord.id).limit(1)).first() is None:
            _put_setting(session=session, name=_KEYS_VERSION, value=str(matching.KEYS_VERSION))
            session.commit()
            return None
    log.info("identity blocking keys are older than version %d: rebuild queued", matching.KEYS_VERSION)
    return jobs.enqueue(engine=engine, kind=KEYS_JOB, key=str(matching.KEYS_VERSION))


def rebuild_keys_now(
    *,
    engine: Engine,
    batch: int = REBUILD_BATCH,
    progress: Callable[[int, int], None] | None = None,
) -> RebuildResult:
    """Run the rebuild in this thread as the keys job (the CLI): the queued one if startup
    queued it; Conflict if another process is running it."""
    job = jobs.enqueue(engine=engine, kind=KEYS_JOB, key=str(matching.KEYS_VERSION), params={"batch": batch})
    assert job.id is not None
    claimed = jobs.claim(engine=engine, job_id=job.id)
    if claimed is None:
        raise Conflict(f"a blocking-key rebuild is already running (job {job.id})")
    try:
        with jobs.heartbeat(engine=engine, job_id=job.id), Session(engine) as session:
            result = rebuild_keys(
                session=session, batch=batch, progress=_job_progress(engine, job.id, progress)
            )
    except Exception as exc:
        jobs.finish(engine=engine, job_id=job.id, error=getattr(exc, "message", None) or type(exc).__name__)
        raise
    jobs.finish(engine=engine, job_id=job.id, message=describe_rebuild(result))
    result.job_id = job.id
    return result


def describe_rebuild(result: RebuildResult) -> str:
    return (
        f"{result.records} records, {result.changed} with changed keys "
        f"(+{result.keys_added} -{result.keys_removed} keys) in {result.seconds:.1f}s"
    )


def _job_progress(
    engine: Engine, job_id: int, listener: Callable[[int, int], None] | None
) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        jobs.report(engine=engine, job_id=job_id, done=done, total=total)
        if listener is not None:
            listener(done, total)

    return report


def _rebuild_keys_job(engine: Engine, _store: Any, job: Job, progress: jobs.Progress) -> None:
    batch = int(jobs.params_of(job).get("batch") or REBUILD_BATCH)
    with Session(engine) as session:
        result = rebuild_keys(
            session=session, batch=batch, progress=lambda done, total: progress.update(done=done, total=total)
        )
    progress.update(message=describe_rebuild(result))


def register_jobs() -> None:
    """Identity's job kinds: the app factory and `scanonce worker` call this once."""
    jobs.register(KEYS_JOB)(_rebuild_keys_job)
