"""`/api/facilities`: the facility registry (an index sync is started by federation's routes)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from sqlmodel import Session

from broker.deps import PrincipalDep, SessionDep
from broker.errors import BadRequest
from broker.facilities import service
from broker.facilities.models import Facility
from broker.facilities.schemas import (
    CallingAE,
    ConsentPolicy,
    FacilityIn,
    FacilityOut,
    FacilityUpdate,
    SharingPolicy,
    SyncStateOut,
)

router = APIRouter(prefix="/api/facilities", tags=["facilities"])

Responses = dict[int | str, dict[str, Any]]

_NOT_FOUND: Responses = {404: {"description": "No such facility"}}
_BAD: Responses = {400: {"description": "Invalid field (id, AE title, URL, incomplete DIMSE endpoint)"}}
_CONFLICT: Responses = {409: {"description": "The id, issuer or a calling AE title is already taken"}}


def _out(session: Session, facility: Facility) -> FacilityOut:
    state = service.sync_state(session=session, facility_id=facility.id)
    aes = service.calling_aes(session=session, facility_id=facility.id)
    return FacilityOut(
        id=facility.id,
        issuer=facility.issuer,
        name=facility.name,
        dicomweb_url=facility.dicomweb_url,
        ae_title=facility.ae_title,
        host=facility.host,
        port=facility.port,
        calling_ae_titles=[ae.ae_title for ae in aes],
        calling_aes=[
            CallingAE(ae_title=ae.ae_title, network=ae.network, certificate=ae.certificate) for ae in aes
        ],
        sharing_policy=SharingPolicy(facility.sharing_policy),
        consent_policy=ConsentPolicy(facility.consent_policy),
        sync=SyncStateOut.model_validate(state, from_attributes=True) if state else None,
    )


def _calling(titles: list[str], aes: list[CallingAE]) -> list[service.CallingAE]:
    return [*titles, *((ae.ae_title, ae.network, ae.certificate) for ae in aes)]


@router.get("", response_model=list[FacilityOut], summary="All registered facilities")
def list_facilities(session: SessionDep, _principal: PrincipalDep) -> list[FacilityOut]:
    return [_out(session, f) for f in service.list_facilities(session=session)]


@router.post(
    "",
    response_model=FacilityOut,
    status_code=201,
    responses={**_BAD, **_CONFLICT},
    summary="Register a facility",
)
def add_facility(body: FacilityIn, session: SessionDep, principal: PrincipalDep) -> FacilityOut:
    f = service.add_facility(
        session=session,
        principal=principal,
        facility_id=body.id,
        issuer=body.issuer,
        name=body.name,
        dicomweb_url=body.dicomweb_url,
        ae_title=body.ae_title,
        host=body.host,
        port=body.port,
        calling_ae_titles=_calling(body.calling_ae_titles, body.calling_aes),
        sharing_policy=body.sharing_policy.value,
        consent_policy=body.consent_policy.value,
    )
    return _out(session, f)


@router.get("/{facility_id}", response_model=FacilityOut, responses=_NOT_FOUND, summary="One facility")
def get_facility(facility_id: str, session: SessionDep, _principal: PrincipalDep) -> FacilityOut:
    return _out(session, service.get_facility(session=session, facility_id=facility_id))


@router.patch(
    "/{facility_id}",
    response_model=FacilityOut,
    responses={**_NOT_FOUND, **_BAD, **_CONFLICT},
    summary="Change some fields of a facility",
)
def update_facility(
    facility_id: str, body: FacilityUpdate, session: SessionDep, principal: PrincipalDep
) -> FacilityOut:
    changes = body.model_dump(exclude_unset=True)
    if changes.get("calling_aes") is not None or changes.get("calling_ae_titles") is not None:
        changes["calling_ae_titles"] = _calling(body.calling_ae_titles or [], body.calling_aes or [])
    changes.pop("calling_aes", None)
    if "sharing_policy" in changes and changes["sharing_policy"] is not None:
        changes["sharing_policy"] = SharingPolicy(changes["sharing_policy"]).value
    if "consent_policy" in changes:
        if changes["consent_policy"] is None:
            raise BadRequest("consent_policy cannot be null: opt-out or opt-in")
        changes["consent_policy"] = ConsentPolicy(changes["consent_policy"]).value
    f = service.update_facility(session=session, principal=principal, facility_id=facility_id, **changes)
    return _out(session, f)


@router.delete(
    "/{facility_id}",
    status_code=204,
    response_class=Response,
    responses={**_NOT_FOUND, 409: {"description": "The index still holds the facility's studies"}},
    summary="Unregister a facility",
)
def remove_facility(facility_id: str, session: SessionDep, principal: PrincipalDep) -> Response:
    service.remove_facility(session=session, principal=principal, facility_id=facility_id)
    return Response(status_code=204)
