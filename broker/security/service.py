"""Authentication. Until enforcement exists, the embedded default's caller is an
administrator of the `local` facility (DESIGN.md, rules of the house)."""

from __future__ import annotations

from broker.security.schemas import Principal, Role
from broker.settings import Settings


def principal_for_http(*, settings: Settings) -> Principal:
    return Principal(who="anonymous", role=Role.admin, facility=settings.default_facility)


def principal_for_dimse(*, settings: Settings, calling_ae: str, facility: str | None) -> Principal:
    return Principal(
        who=f"ae:{calling_ae}", role=Role.facility, facility=facility or settings.default_facility
    )
