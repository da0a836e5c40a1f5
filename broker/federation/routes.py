"""`POST /api/facilities/{id}/sync`: queue an index sync of a facility's archive."""

from __future__ import annotations

from fastapi import APIRouter

from broker.deps import PrincipalDep, StateDep
from broker.federation import service
from broker.federation.schemas import SyncStarted

router = APIRouter(prefix="/api/facilities", tags=["facilities"])


@router.post(
    "/{facility_id}/sync",
    response_model=SyncStarted,
    status_code=202,
    responses={
        404: {"description": "No such facility"},
        400: {"description": "The facility has no archive endpoint to sync from"},
    },
    summary="Queue an index sync of the facility's archive (progress at /api/jobs/{job_id})",
)
def start_sync(facility_id: str, state: StateDep, principal: PrincipalDep) -> SyncStarted:
    job = service.queue_sync(
        engine=state.engine, principal=principal, facility_id=facility_id, calling_ae=state.settings.ae_title
    )
    assert job.id is not None
    return SyncStarted(job_id=job.id, status=job.status)
