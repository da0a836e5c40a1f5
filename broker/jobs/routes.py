"""`/api/jobs`: background work and its progress."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from broker.deps import PrincipalDep, SessionDep
from broker.jobs import service
from broker.jobs.schemas import JobOut

router = APIRouter(prefix="/api/jobs", tags=["jobs"])

_ERRORS: dict[int | str, dict[str, Any]] = {404: {"description": "No such job"}}


@router.get("", response_model=list[JobOut], summary="Recent jobs, newest first")
def list_jobs(
    session: SessionDep,
    _principal: PrincipalDep,
    kind: str | None = None,
    status: str | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
) -> list[JobOut]:
    return [JobOut.of(j) for j in service.list_jobs(session=session, kind=kind, status=status, limit=limit)]


@router.get("/{job_id}", response_model=JobOut, responses=_ERRORS, summary="One job and its progress")
def get_job(job_id: int, session: SessionDep, _principal: PrincipalDep) -> JobOut:
    return JobOut.of(service.get_job(session=session, job_id=job_id))
