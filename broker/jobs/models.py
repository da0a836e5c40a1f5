"""Durable jobs: one row per job, claimed by whichever worker gets it first."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Column, Index, Text
from sqlmodel import Field, SQLModel


def _now() -> datetime:
    return datetime.now(UTC)


class Job(SQLModel, table=True):
    """A unit of background work (an index sync, a fetch, an import).

    The lease of a running job lasts the job lease past `heartbeat_at`.
    `checkpoint` is the handler's own JSON note of how far it got: a job reclaimed after its
    worker died resumes from there instead of starting over.
    """

    __tablename__ = "job"
    __table_args__ = (Index("ix_job_status_id", "status", "id"), Index("ix_job_kind_key", "kind", "key"))

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=32)
    # What the job is about (a facility id, a study UID): one active job per (kind, key).
    key: str = Field(default="", max_length=128)
    status: str = Field(default="queued", max_length=16)  # queued | running | done | failed
    params: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    checkpoint: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    progress_done: int = 0
    progress_total: int | None = None
    message: str = Field(default="", max_length=512)
    error: str = Field(default="", sa_column=Column(Text, nullable=False))
    # Claims so far; with `owner`, the fencing token of the current claim (jobs.service.Lease).
    attempts: int = 0
    owner: str = Field(default="", max_length=128)
    # Queued again after a transient failure: not claimed before this (exponential backoff).
    run_after: datetime | None = None
    created_at: datetime = Field(default_factory=_now)
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    finished_at: datetime | None = None
