"""Who is calling, and what they may do.

HTTP callers are authenticated and authorized by the guard middleware (broker.security.http)
against the one policy table (broker.security.policy) before any route runs; `principal_for_http`
is the caller only when authentication is switched off (loopback development). A DIMSE caller acts
for the facility its calling AE title belongs to. `authorize` is where services that act for a
caller ask about the data itself (consent, per-patient sharing): today it allows what the guard
already let through.
"""

from __future__ import annotations

from broker.security.schemas import Principal, Role
from broker.settings import Settings


def principal_for_http(*, settings: Settings) -> Principal:
    return Principal(who="anonymous", role=Role.admin, facility=settings.default_facility)


def principal_for_dimse(*, settings: Settings, calling_ae: str, facility: str | None) -> Principal:
    return Principal(
        who=f"ae:{calling_ae}", role=Role.facility, facility=facility or settings.default_facility
    )


def system_principal(*, who: str, facility: str) -> Principal:
    """The broker acting on its own behalf or for an operator at the command line (the CLI,
    background jobs, the demo loader)."""
    return Principal(who=who, role=Role.admin, facility=facility)


def authorize(principal: Principal, *, action: str, facility: str | None = None) -> None:
    """Allow `principal` to perform `action` (e.g. "facility.write") on `facility`'s data, or
    raise `broker.errors.Forbidden`. Today: everything is allowed (see the module docstring)."""
    del principal, action, facility
