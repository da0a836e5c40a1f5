"""`POST /api/verify`: queue an integrity check of index and object store (a job; its progress
and report in `/api/jobs/{id}`)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from broker.deps import PrincipalDep, StateDep
from broker.index import verify
from broker.jobs.schemas import JobOut

router = APIRouter(prefix="/api/verify", tags=["operations"])


class VerifyIn(BaseModel):
    facility: str | None = Field(
        default=None, max_length=64, description="Check this facility's instances only."
    )
    sample: int | None = Field(
        default=None, ge=1, description="Check a random sample of this many instances."
    )
    repair: bool = Field(
        default=False, description="Re-index parseable orphans; mark missing/changed instances."
    )
    min_age: float = Field(
        default=60, ge=0, description="Objects younger than this (seconds) are never orphans."
    )


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    summary="Queue an integrity check (missing, orphaned and changed objects)",
)
def queue_verify(body: VerifyIn, state: StateDep, _principal: PrincipalDep) -> JSONResponse:
    job = verify.enqueue_verify(
        engine=state.engine,
        facility=body.facility,
        sample=body.sample,
        repair=body.repair,
        min_age=body.min_age,
        default_facility=state.settings.default_facility,
    )
    return JSONResponse(
        status_code=202,
        content=JobOut.of(job).model_dump(mode="json"),
        headers={"Location": f"/api/jobs/{job.id}"},
    )
