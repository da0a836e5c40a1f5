"""Shapes of identity results and requests (service results are dataclasses; API bodies pydantic)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

Outcome = Literal["existing", "identifier", "trusted-identifier", "probabilistic", "review", "new"]


@dataclass(frozen=True, slots=True)
class Identifier:
    """A patient identifier: always qualified by its issuer."""

    issuer: str
    value: str


@dataclass(slots=True)
class RebuildResult:
    """What a blocking-key rebuild did: records read, records whose keys differed, keys
    added and removed (a second run reports zeros)."""

    records: int
    changed: int
    keys_added: int
    keys_removed: int
    seconds: float
    # The longest a batch held the linking lock (links wait that long at most).
    longest_lock_seconds: float = 0.0
    job_id: int | None = None


@dataclass(slots=True)
class LinkDecision:
    record_id: int
    person_id: int
    outcome: Outcome
    weight: float | None = None
    matched_record_id: int | None = None
    contributions: dict[str, Any] = field(default_factory=dict)
    review_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class PersonView:
    person_id: int
    identifiers: list[Identifier]
    family: str
    given: str
    middle: str
    birth_date: str
    sex: str
    address: str
    phone: str


class Decision(BaseModel):
    """A human's decision: who is taken from the caller, why is required."""

    reason: str = Field(min_length=1, max_length=512)


class LinkRequest(Decision):
    record_id: int
    to_record_id: int


class UnlinkRequest(Decision):
    record_id: int


class ReviewDecision(Decision):
    decision: Literal["link", "reject"]


class TrustedIssuerIn(BaseModel):
    issuer: str = Field(min_length=1, max_length=128)
    note: str = Field(default="", max_length=256)
