"""The CDS service's tables: every card it issued (feedback names a card only by its uuid) and
every feedback entry a CDS client posted."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Index
from sqlmodel import Field, SQLModel


def _now() -> datetime:
    return datetime.now(UTC)


class IssuedCard(SQLModel, table=True):
    """One card as issued: what it said about which prior, for which draft order, and the
    avoided repeat its accepted suggestion became (once, however often feedback repeats)."""

    __tablename__ = "cds_card"
    __table_args__ = (Index("ix_cds_card_issued_at", "issued_at"),)

    uuid: str = Field(primary_key=True, max_length=36)
    service_id: str = Field(max_length=64)
    hook_instance: str = Field(max_length=64)
    suggestion_uuid: str | None = Field(default=None, max_length=36)
    order_ref: str = Field(default="", max_length=128)  # e.g. ServiceRequest/123 (the EHR's id)
    planned_exam: str = Field(max_length=256)
    prior_study_uid: str = Field(max_length=64)
    facility_id: str = Field(max_length=64)  # whose clinician ordered: the avoided repeat's facility
    indicator: str = Field(max_length=16)
    issued_at: datetime = Field(default_factory=_now)
    # lookup_avoided.id once the suggestion was accepted; -1 while that record is being written.
    avoided_id: int | None = None


class Feedback(SQLModel, table=True):
    __tablename__ = "cds_feedback"
    __table_args__ = (Index("ix_cds_feedback_card", "card_uuid"),)

    id: int | None = Field(default=None, primary_key=True)
    card_uuid: str = Field(max_length=36)
    service_id: str = Field(max_length=64)
    outcome: str = Field(max_length=16)  # accepted | overridden
    accepted_suggestions: str = Field(default="", max_length=1024)  # suggestion uuids, comma-separated
    override_system: str = Field(default="", max_length=256)
    override_code: str = Field(default="", max_length=64)
    override_display: str = Field(default="", max_length=256)
    user_comment: str = Field(default="", max_length=1024)
    outcome_at: datetime
    received_at: datetime = Field(default_factory=_now)
    avoided_id: int | None = None
