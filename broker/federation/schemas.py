"""Response shapes of federation's routes."""

from __future__ import annotations

from pydantic import BaseModel


class SyncStarted(BaseModel):
    job_id: int
    status: str
