"""Who is calling: every route and DIMSE handler receives a Principal."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    admin = "admin"
    clinician = "clinician"
    radiologist = "radiologist"
    facility = "facility"  # a facility node (its archive or gateway): pushes into its own partition
    reviewer = "reviewer"  # identity reviewer: works the person-linking review queue
    auditor = "auditor"  # reads the audit trail, no patient data otherwise


@dataclass(frozen=True, slots=True)
class Principal:
    who: str
    role: Role
    facility: str
    # How the caller proved who they are ("bearer", "session", "dimse", "system", "anonymous").
    via: str = "system"
    # The token's issuer, for the audit trail's "who" (None: the broker itself or no token).
    issuer: str | None = None
    # The stated purpose of use (HL7 v3 PurposeOfUse code, e.g. TREAT), when the token carries one.
    purpose_of_use: str | None = None
