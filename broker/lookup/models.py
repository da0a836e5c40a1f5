"""The lookup's own table: repeats a clinician avoided after seeing a prior (the measure of what
ScanOnce is for)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Index
from sqlmodel import Field, SQLModel


def _now() -> datetime:
    return datetime.now(UTC)


class AvoidedRepeat(SQLModel, table=True):
    __tablename__ = "lookup_avoided"
    __table_args__ = (Index("ix_lookup_avoided_facility_at", "facility_id", "recorded_at"),)

    id: int | None = Field(default=None, primary_key=True)
    study_uid: str = Field(max_length=64)
    planned_exam: str = Field(max_length=256)
    facility_id: str = Field(max_length=64)
    who: str = Field(max_length=128)
    estimated_dose_msv: float | None = None
    basis: str = Field(default="unknown", max_length=16)
    recorded_at: datetime = Field(default_factory=_now)
