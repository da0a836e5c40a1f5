"""Who is calling: every route and DIMSE handler receives a Principal."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    admin = "admin"
    clinician = "clinician"
    radiologist = "radiologist"
    facility = "facility"


@dataclass(frozen=True, slots=True)
class Principal:
    who: str
    role: Role
    facility: str
