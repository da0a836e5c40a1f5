"""Shapes of identity results and requests: service results are dataclasses, or TypedDicts where
the result is a JSON document (`explain`, the model parameters) that the API returns as is; API
bodies and the review API's answers are pydantic models.

TypedDicts come from typing_extensions: pydantic (FastAPI's response models) needs its
TypedDict before Python 3.12.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, NotRequired
from urllib.parse import quote, unquote

from pydantic import BaseModel, Field
from typing_extensions import TypedDict

_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_LOCAL_PREFIX = "urn:scanonce:issuer:"
# What a URN's namespace-specific string may hold as it is (RFC 8141: pchar and `/`; `%` only
# to start an escape, `?` and `#` would start a query or a fragment).
_URN_SAFE = "-._~!$&'()*+,;=:@/"


def system_for_issuer(issuer: str) -> str:
    """An issuer as a FHIR identifier system: OIDs as urn:oid:, URIs as is, others namespaced.
    A namespaced issuer is percent-encoded where a URN may not hold it as it is (RFC 8141: a
    space, `%`, `|`, non-ASCII ...): HL7 namespace IDs such as "St Mary Hospital" made a system
    that was not a URI, which FHIR clients and validators refuse."""
    if _OID.match(issuer):
        return "urn:oid:" + issuer
    if ":" in issuer:
        return issuer
    return _LOCAL_PREFIX + quote(issuer, safe=_URN_SAFE)


def issuer_from_system(system: str) -> str:
    """The issuer a FHIR identifier system names (the inverse of `system_for_issuer`); every
    interface that takes `system|value` (FHIR, the lookup, CDS Hooks, the page) reads it so.
    A URN's `urn:` and namespace are case-insensitive (RFC 8141)."""
    if system[:8].lower() == "urn:oid:":
        return system[8:]
    if system[: len(_LOCAL_PREFIX)].lower() == _LOCAL_PREFIX:
        return unquote(system[len(_LOCAL_PREFIX) :])  # as `system_for_issuer` encoded it
    return system


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


# ---------------------------------------------------------------- explain


class IdentifierOut(TypedDict):
    issuer: str
    value: str


class HistoryEntry(TypedDict):
    """One change of the record's person (a `LinkEvent`)."""

    at: str
    method: str
    person_id: int
    previous_person_id: int | None
    weight: float | None
    matched_record_id: int | None
    # Per field: comparison level and log2 Bayes factor.
    contributions: dict[str, Any]
    who: str
    why: str


class Comparison(TypedDict):
    """The record against another record of its person, with today's parameters."""

    record_id: int
    issuer: str
    weight: float
    probability: float
    contributions: dict[str, Any]


class Thresholds(TypedDict):
    auto: float
    review: float
    strict: bool


class Explanation(TypedDict):
    """Why a record belongs to its person."""

    record_id: int
    identifier: IdentifierOut
    person_id: int
    merged_into: int | None
    history: list[HistoryEntry]
    compared_with_person: list[Comparison]
    thresholds: Thresholds


# ---------------------------------------------------------------- model parameters

# m and u: per field, the probability of each comparison level among matches / non-matches.
LevelProbabilities = dict[str, list[float]]


class LinkPolicy(TypedDict):
    auto: float
    review: float
    strict: bool


# "lambda" is a Python keyword: the functional form names it.
ModelParameters = TypedDict(
    "ModelParameters",
    {
        "m": LevelProbabilities,
        "u": LevelProbabilities,
        # The share of all pairs that are matches.
        "lambda": float,
        "expected_matches": NotRequired[float],
        "policy": NotRequired[LinkPolicy],
    },
)
"""The Fellegi–Sunter parameters in use, as `train` and `set_policy` store them and
`current_params` returns them: the JSON document `matching` reads, and the API's response shape."""


# ---------------------------------------------------------------- review queue (API)


class ReviewItemOut(BaseModel):
    id: int
    record_id: int
    candidate_record_id: int
    weight: float
    contributions: dict[str, Any]
    status: str
    decided_by: str | None
    reason: str | None
    decided_at: str | None


class LinkResult(BaseModel):
    record_id: int
    person_id: int


class RecordOut(BaseModel):
    id: int
    issuer: str
    value: str
    person_id: int


class TrustedIssuerOut(BaseModel):
    issuer: str
