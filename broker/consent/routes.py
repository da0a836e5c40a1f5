"""`/api/consent` (patients' sharing choices) and `/api/break-glass` (emergency reads); thin: see
service. Who may call them is the policy table's (broker.security.policy)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Response
from sqlmodel import Session

from broker.consent import service
from broker.consent.models import BreakGlass, Consent
from broker.consent.schemas import BreakGlassIn, BreakGlassOut, ConsentIn, ConsentList, ConsentOut, Decision
from broker.deps import PrincipalDep, SessionDep, SettingsDep

router = APIRouter(tags=["consent"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Bad input"},
    404: {"description": "No such patient at that facility (or not the caller's to see)"},
}


def consent_out(row: Consent) -> ConsentOut:
    assert row.id is not None
    return ConsentOut(
        id=row.id,
        recorded_at_facility=row.recorded_at_facility,
        scope=row.scope_facility or None,
        decision=Decision(row.decision),
        recorded_by=row.recorded_by,
        recorded_at=row.recorded_at,
        source=row.source,
    )


def grant_out(session: Session, row: BreakGlass) -> BreakGlassOut:
    assert row.id is not None
    patient = service.patient_of(session=session, patient_pk=row.patient_pk)
    return BreakGlassOut(
        id=row.id,
        who=row.who,
        role=row.role,
        facility=row.facility,
        patient_facility=patient.facility_id if patient is not None else "",
        patient_id=patient.patient_id if patient is not None else "",
        reason=row.reason,
        created_at=row.created_at,
        expires_at=row.expires_at,
        active=service.is_active(row),
        reviewed=row.reviewed,
    )


@router.post(
    "/api/consent", response_model=ConsentOut, status_code=201, responses=_ERRORS, summary="Record a choice"
)
def record_consent(body: ConsentIn, session: SessionDep, principal: PrincipalDep) -> ConsentOut:
    row = service.record_consent(
        session=session,
        principal=principal,
        facility=body.facility,
        patient_id=body.patient_id,
        decision=body.decision.value,
        scope=body.scope,
    )
    return consent_out(row)


@router.get(
    "/api/consent", response_model=ConsentList, responses=_ERRORS, summary="The choices of a patient's person"
)
def list_consent(
    session: SessionDep,
    principal: PrincipalDep,
    facility: str = Query(max_length=64),
    patient_id: str = Query(min_length=1, max_length=128),
) -> ConsentList:
    _patient, rows = service.consents_of(
        session=session, principal=principal, facility=facility, patient_id=patient_id
    )
    return ConsentList(facility=facility, patient_id=patient_id, consents=[consent_out(r) for r in rows])


@router.delete(
    "/api/consent/{consent_id}",
    status_code=204,
    response_class=Response,
    responses=_ERRORS,
    summary="Withdraw a choice (the facility's default applies again)",
)
def revoke_consent(consent_id: int, session: SessionDep, principal: PrincipalDep) -> Response:
    service.revoke_consent(session=session, principal=principal, consent_id=consent_id)
    return Response(status_code=204)


@router.post(
    "/api/break-glass",
    response_model=BreakGlassOut,
    status_code=201,
    responses=_ERRORS,
    summary="Emergency read of a person's records at every facility, with a reason, for a limited time",
)
def request_break_glass(
    body: BreakGlassIn, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> BreakGlassOut:
    grant = service.break_glass(
        session=session,
        settings=settings,
        principal=principal,
        facility=body.facility,
        patient_id=body.patient_id,
        reason=body.reason,
        minutes=body.minutes,
    )
    return grant_out(session, grant)


@router.get(
    "/api/break-glass", response_model=list[BreakGlassOut], summary="Break-the-glass grants, for review"
)
def list_break_glass(
    session: SessionDep,
    _principal: PrincipalDep,
    active: bool = False,
    limit: int = Query(default=100, ge=1, le=1000),
) -> list[BreakGlassOut]:
    return [
        grant_out(session, g)
        for g in service.break_glass_grants(session=session, limit=limit, active_only=active)
    ]


@router.post(
    "/api/break-glass/{grant_id}/reviewed",
    response_model=BreakGlassOut,
    responses={404: {"description": "No such grant"}},
    summary="Mark a grant as reviewed",
)
def mark_reviewed(grant_id: int, session: SessionDep, _principal: PrincipalDep) -> BreakGlassOut:
    return grant_out(session, service.mark_reviewed(session=session, grant_id=grant_id))
