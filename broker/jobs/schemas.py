from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from broker.jobs.models import Job


class JobOut(BaseModel):
    id: int
    kind: str
    key: str = Field(description="What the job is about: a facility id, a study UID.")
    status: str = Field(description="queued | running | done | failed")
    progress_done: int
    progress_total: int | None = Field(description="None while the total is not known yet.")
    message: str
    error: str
    attempts: int = Field(description="Claims so far (a retry or a reclaim after a lost worker adds one).")
    owner: str = Field(description="The worker holding (or that last held) the job: host:pid:thread.")
    params: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None = Field(
        description="The running job's lease lasts the job lease past this."
    )
    run_after: datetime | None = Field(description="A job queued for a retry is not started before this.")
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(
            id=job.id or 0,
            kind=job.kind,
            key=job.key,
            status=job.status,
            progress_done=job.progress_done,
            progress_total=job.progress_total,
            message=job.message,
            error=job.error,
            attempts=job.attempts,
            owner=job.owner,
            params=json.loads(job.params or "{}"),
            created_at=job.created_at,
            started_at=job.started_at,
            heartbeat_at=job.heartbeat_at,
            run_after=job.run_after,
            finished_at=job.finished_at,
        )
