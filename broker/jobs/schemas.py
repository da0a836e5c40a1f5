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
    attempts: int
    params: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
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
            params=json.loads(job.params or "{}"),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )
