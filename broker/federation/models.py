"""Facility registry tables."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import Field, SQLModel


def _now() -> datetime:
    return datetime.now(UTC)


class Facility(SQLModel, table=True):
    """A federated archive. Its `issuer` qualifies every Patient ID it sends."""

    __tablename__ = "facility"

    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(default="", max_length=256)
    issuer: str = Field(max_length=128, unique=True)
    created_at: datetime = Field(default_factory=_now)
