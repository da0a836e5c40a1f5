"""Changes a human or a feed decides: IHE ITI-8 merges, manual links and unlinks, the review
queue, and `explain` (why a record belongs to its person).

Each decision commits. A move of records between persons locks first (`locks.lock_for_move`),
then moves them as one group, so an unlink can split the group back.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

from sqlalchemy import and_, delete, or_
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from broker.errors import BadRequest, Conflict, NotFound
from broker.identity import locks, matching
from broker.identity.models import IdentityRecord, LinkEvent, NoLink, ReviewItem
from broker.identity.params import current_params, policy
from broker.identity.records import (
    RECORD_COLUMNS,
    add_event,
    demo_of,
    get_record,
    new_person,
    now,
    record_id_of,
    require_record,
    sync_patients,
)
from broker.identity.schemas import Comparison, Explanation, HistoryEntry, Identifier, LinkDecision
from broker.security.schemas import Principal
from broker.security.service import authorize


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
        stmt = stmt.where(col(IdentityRecord.id).in_(only))
    moved = list(session.exec(stmt))
    for rec in moved:
        rec.person_id = to_person
        session.add(rec)
        add_event(
            session=session,
            record_id=record_id_of(rec),
            person_id=to_person,
            previous=from_person,
            method=method,
            matched=matched,
            group=group,
            who=who,
            why=why,
        )
    session.flush()
    sync_patients(session=session, record_ids=[record_id_of(r) for r in moved])
    return group


def _require_why(who: str, why: str) -> None:
    if not who.strip():
        raise BadRequest("a manual decision must say who made it")
    if not why.strip():
        raise BadRequest("a manual decision must say why")


def _person_of(session: Session, record_id: int) -> set[int]:
    """The person a record is on now (what a move of it locks)."""
    return {require_record(session=session, record_id=record_id).person_id}


def merge(
    *,
    session: Session,
    principal: Principal,
    survivor: Identifier,
    merged: Identifier,
    why: str = "A40 merge",
) -> LinkDecision:
    """IHE ITI-8 merge: `merged` is retired into `survivor`; its person's records (and so their
    studies) move to the survivor's person. Commits. An unlink of the merged record splits back."""
    authorize(principal, action="identity.write")
    who = principal.who
    surv = get_record(session=session, issuer=survivor.issuer, value=survivor.value)
    old = get_record(session=session, issuer=merged.issuer, value=merged.value)
    if surv is None:
        raise NotFound("surviving patient identifier is unknown")
    if old is None:
        raise NotFound("merged (prior) patient identifier is unknown")
    surv_id, old_id = record_id_of(surv), record_id_of(old)
    if surv_id == old_id:
        raise BadRequest("a record cannot be merged into itself")
    locks.lock_for_move(session=session, persons=lambda: _person_of(session, old_id))
    old.merged_into = surv_id
    session.add(old)
    if old.person_id != surv.person_id:
        _move_person(
            session=session,
            from_person=old.person_id,
            to_person=surv.person_id,
            method="merge",
            who=who,
            why=why,
            matched=surv_id,
        )
    session.commit()
    return LinkDecision(
        record_id=old_id, person_id=surv.person_id, outcome="identifier", matched_record_id=surv_id
    )


def manual_link(
    *, session: Session, principal: Principal, record_id: int, to_record_id: int, why: str
) -> LinkDecision:
    """A human says two records are one person: the record's whole person joins the other's."""
    authorize(principal, action="identity.write")
    who = principal.who
    _require_why(who, why)
    rec = require_record(session=session, record_id=record_id)
    target = require_record(session=session, record_id=to_record_id)
    rec_id, target_id = record_id_of(rec), record_id_of(target)
    locks.lock_for_move(session=session, persons=lambda: _person_of(session, record_id))
    # A human overrides an earlier "different people" decision; drop it so it cannot contradict.
    session.execute(
        delete(NoLink).where(
            or_(
                and_(col(NoLink.record_a) == rec_id, col(NoLink.record_b) == target_id),
                and_(col(NoLink.record_a) == target_id, col(NoLink.record_b) == rec_id),
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
            matched=target_id,
        )
    _close_reviews(session=session, record_ids={rec_id, target_id}, status="linked", who=who, why=why)
    session.commit()
    return LinkDecision(
        record_id=rec_id, person_id=target.person_id, outcome="existing", matched_record_id=target_id
    )


def unlink(*, session: Session, principal: Principal, record_id: int, why: str) -> LinkDecision:
    """Split a record out of its person. If it arrived by a merge or link that moved a group of
    records, the whole group goes back to the person it came from; otherwise the record gets a
    person of its own. Either way the split is remembered so automatic linking won't redo it."""
    authorize(principal, action="identity.write")
    who = principal.who
    _require_why(who, why)
    rec = require_record(session=session, record_id=record_id)
    rec_id = record_id_of(rec)
    locks.lock_for_move(session=session, persons=lambda: _person_of(session, record_id))
    last = session.exec(
        select(LinkEvent)
        .where(LinkEvent.record_id == rec_id, LinkEvent.person_id == rec.person_id)
        .order_by(col(LinkEvent.id).desc())
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
            target = new_person(session=session)
    else:
        movers = [rec_id]
        target = new_person(session=session)
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
    return LinkDecision(record_id=rec_id, person_id=target, outcome="existing")


def _close_reviews(*, session: Session, record_ids: set[int], status: str, who: str, why: str) -> None:
    for item in session.exec(
        select(ReviewItem).where(
            ReviewItem.status == "open",
            or_(
                col(ReviewItem.record_id).in_(record_ids), col(ReviewItem.candidate_record_id).in_(record_ids)
            ),
        )
    ):
        pair = {item.record_id, item.candidate_record_id}
        if pair <= record_ids:
            item.status, item.decided_by, item.reason, item.decided_at = status, who, why, now()
            session.add(item)


def review_queue(
    *, session: Session, status: str = "open", limit: int = 100, offset: int = 0
) -> list[ReviewItem]:
    return list(
        session.exec(
            select(ReviewItem)
            .where(ReviewItem.status == status)
            .order_by(col(ReviewItem.weight).desc(), col(ReviewItem.id))
            .offset(offset)
            .limit(limit)
        )
    )


def decide_review(
    *, session: Session, principal: Principal, review_id: int, decision: str, why: str
) -> ReviewItem:
    """A human's answer to a review item: "link" the pair (a manual link) or "reject" it (never
    linked automatically again). Commits."""
    authorize(principal, action="identity.write")
    who = principal.who
    _require_why(who, why)
    item = session.get(ReviewItem, review_id)
    if item is None:
        raise NotFound(f"no review item {review_id}")
    if item.status != "open":
        raise Conflict(f"review item {review_id} was already decided ({item.status})")
    if decision == "link":
        manual_link(
            session=session,
            principal=principal,
            record_id=item.record_id,
            to_record_id=item.candidate_record_id,
            why=why,
        )
        item.status = "linked"
    elif decision == "reject":
        a, b = sorted((item.record_id, item.candidate_record_id))
        if session.get(NoLink, (a, b)) is None:
            session.add(NoLink(record_a=a, record_b=b, who=who[:128], why=why[:512]))
        item.status = "rejected"
    else:
        raise BadRequest("decision must be 'link' or 'reject'")
    item.decided_by, item.reason, item.decided_at = who[:128], why[:512], now()
    session.add(item)
    session.commit()
    session.refresh(item)
    return item


def explain(*, session: Session, record_id: int) -> Explanation:
    """Why a record belongs to its person: the history of its links and, against each other
    record of the person, today's per-field comparison."""
    rec = require_record(session=session, record_id=record_id)
    rec_id = record_id_of(rec)
    params = current_params(session=session)
    d = demo_of(rec)
    history: list[HistoryEntry] = [
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
            select(LinkEvent).where(LinkEvent.record_id == rec_id).order_by(col(LinkEvent.id))
        )
    ]
    mates = session.execute(
        sa_select(*RECORD_COLUMNS).where(
            col(IdentityRecord.person_id) == rec.person_id, col(IdentityRecord.id) != rec_id
        )
    ).all()
    comparisons: list[Comparison] = []
    for m in mates:
        s = matching.score_pair(d, demo_of(m), params=params)
        comparisons.append(
            {
                "record_id": m.id,
                "issuer": m.issuer,
                "weight": round(s.weight, 3),
                "probability": matching.probability(s.weight, params=params),
                "contributions": s.contributions,
            }
        )
    thresholds = policy(params)
    return {
        "record_id": rec_id,
        "identifier": {"issuer": rec.issuer, "value": rec.value},
        "person_id": rec.person_id,
        "merged_into": rec.merged_into,
        "history": history,
        "compared_with_person": comparisons,
        "thresholds": {"auto": thresholds.auto, "review": thresholds.review, "strict": thresholds.strict},
    }
