"""Consent tables: a person's sharing choice, and break-the-glass grants."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def _now() -> datetime:
    return datetime.now(UTC)


class Consent(SQLModel, table=True):
    """A patient's choice about sharing: `deny` (opt-out) or `permit` (opt-in).

    Given for one patient record (`patient_pk`, at the facility where it was recorded) and applied
    to every record of that record's current person. `scope_facility` limits it to the records a
    facility holds; "" means the person's records at every facility. One row per (record, scope):
    recording again replaces the choice.
    """

    __tablename__ = "consent"
    __table_args__ = (
        UniqueConstraint("patient_pk", "scope_facility", name="uq_consent_patient_scope"),
        Index("ix_consent_patient", "patient_pk"),
    )

    id: int | None = Field(default=None, primary_key=True)
    patient_pk: int = Field(foreign_key="patient.pk")
    # The person at the time of recording (informative; matching uses the record's current person).
    person_id: int | None = None
    recorded_at_facility: str = Field(max_length=64)
    scope_facility: str = Field(default="", max_length=64)
    decision: str = Field(max_length=8)  # deny | permit
    recorded_by: str = Field(default="", max_length=128)
    source: str = Field(default="api", max_length=8)  # api | fhir
    recorded_at: datetime = Field(default_factory=_now)


class BreakGlass(SQLModel, table=True):
    """An emergency read: `who` (of `facility`) may see the person of `patient_pk`'s records at
    every facility until `expires_at`, whatever the consent, for the `reason` given."""

    __tablename__ = "break_glass"
    __table_args__ = (Index("ix_break_glass_who", "who", "facility", "expires_at"),)

    id: int | None = Field(default=None, primary_key=True)
    who: str = Field(max_length=128)
    issuer: str = Field(default="", max_length=256)
    role: str = Field(max_length=16)
    facility: str = Field(max_length=64)
    patient_pk: int = Field(foreign_key="patient.pk")
    person_id: int | None = None
    reason: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=_now)
    expires_at: datetime
    reviewed: bool = False
