"""Request and response shapes of /api/consent and /api/break-glass."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from broker.facilities.schemas import FACILITY_ID


class Decision(StrEnum):
    deny = "deny"  # opt out: the person's records are not shared with other facilities
    permit = "permit"  # opt in: shared (what an opt-in facility needs before it shares)


class ConsentIn(BaseModel):
    facility: str = Field(pattern=FACILITY_ID, description="The facility where the choice is made.")
    patient_id: str = Field(min_length=1, max_length=128, description="The patient's ID at that facility.")
    decision: Decision
    scope: str | None = Field(
        default=None,
        pattern=FACILITY_ID,
        description="Only the records this facility holds; omitted: the person's records everywhere.",
    )


class ConsentOut(BaseModel):
    id: int
    recorded_at_facility: str
    scope: str | None = Field(description="The facility whose records it covers; null: every facility.")
    decision: Decision
    recorded_by: str
    recorded_at: datetime
    source: str


class ConsentList(BaseModel):
    facility: str
    patient_id: str
    consents: list[ConsentOut]


class BreakGlassIn(BaseModel):
    facility: str = Field(
        pattern=FACILITY_ID, description="The facility that knows the patient by patient_id."
    )
    patient_id: str = Field(min_length=1, max_length=128)
    reason: str = Field(min_length=1, max_length=1000, description="Why this is an emergency (mandatory).")
    minutes: int = Field(default=30, description="How long the grant lasts (at most the configured maximum).")


class BreakGlassOut(BaseModel):
    id: int
    who: str
    role: str
    facility: str = Field(description="The requester's facility.")
    patient_facility: str = Field(description="Where the record named in the request is held.")
    patient_id: str = Field(description="The patient's ID there (for the reviewer).")
    reason: str
    created_at: datetime
    expires_at: datetime
    active: bool
    reviewed: bool
