"""`/api/facilities`: the facility registry."""

from __future__ import annotations

from fastapi import APIRouter

from broker.deps import PrincipalDep, SessionDep
from broker.federation import service
from broker.federation.schemas import FacilityIn, FacilityOut

router = APIRouter(prefix="/api/facilities", tags=["facilities"])


@router.get("", response_model=list[FacilityOut])
def list_facilities(session: SessionDep, _principal: PrincipalDep) -> list[FacilityOut]:
    return [
        FacilityOut.model_validate(f, from_attributes=True) for f in service.list_facilities(session=session)
    ]


@router.post("", response_model=FacilityOut, status_code=201)
def add_facility(body: FacilityIn, session: SessionDep, _principal: PrincipalDep) -> FacilityOut:
    f = service.add_facility(session=session, facility_id=body.id, issuer=body.issuer, name=body.name)
    return FacilityOut.model_validate(f, from_attributes=True)


@router.get("/{facility_id}", response_model=FacilityOut)
def get_facility(facility_id: str, session: SessionDep, _principal: PrincipalDep) -> FacilityOut:
    return FacilityOut.model_validate(
        service.get_facility(session=session, facility_id=facility_id), from_attributes=True
    )
