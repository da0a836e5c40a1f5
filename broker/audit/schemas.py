"""What one audit event says (FHIR AuditEvent / IHE BALP): who, which patient, what, why, with
which outcome, from where. Built by whoever records an access, hashed and stored by the service."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel

from broker.security.schemas import Principal


class Action(StrEnum):
    create = "C"
    read = "R"
    update = "U"
    delete = "D"
    execute = "E"  # a query or an operation


class Outcome(StrEnum):
    success = "0"
    minor_failure = "4"  # refused, not found, bad request
    serious_failure = "8"  # the broker failed
    major_failure = "12"


# The event subtypes this broker records (AuditEvent.subtype, its own code system).
SUBTYPES = (
    "query",
    "read",
    "retrieve",
    "store",
    "import",
    "create",
    "update",
    "link",
    "unlink",
    "consent",
    "break-the-glass",
    "sign-in-failure",
    "audit-read",
)


@dataclass(slots=True)
class AuditRecord:
    """One access, before it is sequenced and hashed. Empty strings where a part is unknown."""

    action: str
    subtype: str
    outcome: str = Outcome.success.value
    outcome_desc: str = ""
    agent_who: str = ""
    agent_role: str = ""
    agent_facility: str = ""
    agent_issuer: str = ""
    agent_via: str = ""
    purpose_of_use: str = ""
    patient_id: str = ""
    patient_issuer: str = ""
    study_uid: str = ""
    source_node: str = ""
    source_interface: str = ""
    client_address: str = ""
    entity: str = ""
    # Not stored: ask the study's patient from the index when patient_id is empty.
    resolve_study: bool = field(default=True, repr=False)

    def by(self, principal: Principal | None) -> AuditRecord:
        """The same record with the caller as its agent."""
        if principal is not None:
            self.agent_who = principal.who
            self.agent_role = principal.role.value
            self.agent_facility = principal.facility
            self.agent_issuer = principal.issuer or ""
            self.agent_via = principal.via
            self.purpose_of_use = principal.purpose_of_use or ""
        return self


class AuditEventOut(BaseModel):
    """An audit event as `/api/audit` lists it."""

    seq: int
    recorded: str
    action: str
    subtype: str
    outcome: str
    outcome_desc: str
    agent_who: str
    agent_role: str
    agent_facility: str
    agent_issuer: str
    agent_via: str
    purpose_of_use: str
    patient_id: str
    patient_issuer: str
    study_uid: str
    source_node: str
    source_interface: str
    client_address: str
    entity: str
    prev_hash: str
    hash: str


class VerifyOut(BaseModel):
    """What `scanonce audit verify` and `/api/audit/verify` answer."""

    ok: bool
    checked: int  # rows walked
    head_seq: int
    head_hash: str
    broken_seq: int | None = None  # the first row that breaks the chain
    problem: str = ""
