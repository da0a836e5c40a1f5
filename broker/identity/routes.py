"""HTTP for identity administration under /api/identity: the review queue, manual link and
unlink, explain, record lookup, trusted issuers, training. (FHIR PIXm/PDQm and the Patient feed
are the `broker.fhir` interface.)
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Query

from broker.deps import PrincipalDep, SessionDep
from broker.errors import NotFound
from broker.identity import service
from broker.identity.models import ReviewItem
from broker.identity.schemas import (
    Explanation,
    LinkRequest,
    LinkResult,
    ModelParameters,
    RecordOut,
    ReviewDecision,
    ReviewItemOut,
    TrustedIssuerIn,
    TrustedIssuerOut,
    UnlinkRequest,
)

router = APIRouter(prefix="/api/identity", tags=["identity"])


def _review_out(item: ReviewItem) -> ReviewItemOut:
    assert item.id is not None
    return ReviewItemOut(
        id=item.id,
        record_id=item.record_id,
        candidate_record_id=item.candidate_record_id,
        weight=item.weight,
        contributions=orjson.loads(item.contributions),
        status=item.status,
        decided_by=item.decided_by,
        reason=item.reason,
        decided_at=item.decided_at.isoformat() if item.decided_at else None,
    )


@router.get("/review", response_model=list[ReviewItemOut])
def list_review(
    session: SessionDep,
    _principal: PrincipalDep,
    status: str = "open",
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0),
) -> list[ReviewItemOut]:
    return [
        _review_out(i)
        for i in service.review_queue(session=session, status=status, limit=limit, offset=offset)
    ]


@router.post("/review/{review_id}", response_model=ReviewItemOut)
def decide(
    review_id: int, body: ReviewDecision, session: SessionDep, principal: PrincipalDep
) -> ReviewItemOut:
    item = service.decide_review(
        session=session, principal=principal, review_id=review_id, decision=body.decision, why=body.reason
    )
    return _review_out(item)


@router.post("/link", response_model=LinkResult)
def link(body: LinkRequest, session: SessionDep, principal: PrincipalDep) -> LinkResult:
    d = service.manual_link(
        session=session,
        record_id=body.record_id,
        to_record_id=body.to_record_id,
        principal=principal,
        why=body.reason,
    )
    return LinkResult(record_id=d.record_id, person_id=d.person_id)


@router.post("/unlink", response_model=LinkResult)
def unlink(body: UnlinkRequest, session: SessionDep, principal: PrincipalDep) -> LinkResult:
    d = service.unlink(session=session, principal=principal, record_id=body.record_id, why=body.reason)
    return LinkResult(record_id=d.record_id, person_id=d.person_id)


@router.get("/records/{record_id}/explain", response_model=Explanation)
def explain(record_id: int, session: SessionDep, _principal: PrincipalDep) -> Explanation:
    return service.explain(session=session, record_id=record_id)


@router.get("/records", response_model=RecordOut)
def find_record(issuer: str, value: str, session: SessionDep, _principal: PrincipalDep) -> RecordOut:
    rec = service.get_record(session=session, issuer=issuer, value=value)
    if rec is None or rec.id is None:
        raise NotFound("no record for that identifier")
    return RecordOut(id=rec.id, issuer=rec.issuer, value=rec.value, person_id=rec.person_id)


@router.post("/trusted-issuers", status_code=201, response_model=TrustedIssuerOut)
def add_trusted_issuer(
    body: TrustedIssuerIn, session: SessionDep, principal: PrincipalDep
) -> TrustedIssuerOut:
    service.set_trusted_issuer(session=session, principal=principal, issuer=body.issuer, note=body.note)
    return TrustedIssuerOut(issuer=body.issuer)


@router.post("/train", response_model=ModelParameters)
def train(session: SessionDep, principal: PrincipalDep) -> service.Params:
    return service.train(session=session, principal=principal)
