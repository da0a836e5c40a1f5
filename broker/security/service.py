"""Who is calling, and what they may do.

HTTP callers are authenticated and authorized by the guard middleware (broker.security.http)
against the one policy table (broker.security.policy) before any route runs; `principal_for_http`
is the caller only when authentication is switched off (loopback development). A DIMSE caller acts
for the facility its calling AE title belongs to (established at association, from its AE title
and peer address; broker.dimse.access). `authorize` is where services and the DIMSE handlers ask
the policy (broker.security.policy.permits, the same answer as for HTTP) about an action: the
actions of `policy.ACTIONS` (every DIMSE operation) are decided there; any other was already
decided by the HTTP guard for the route that called (consent and per-patient sharing come here).
"""

from __future__ import annotations

from broker.errors import Forbidden
from broker.security import policy
from broker.security.schemas import Principal, Role
from broker.settings import Settings


def principal_for_http(*, settings: Settings) -> Principal:
    return Principal(who="anonymous", role=Role.admin, facility=settings.default_facility)


def principal_for_dimse(*, settings: Settings, calling_ae: str, facility: str | None) -> Principal:
    """A DIMSE peer: a facility node scoped to the facility its calling AE title is registered to
    (in open mode, the default facility)."""
    return Principal(
        who=f"ae:{calling_ae}",
        role=Role.facility,
        facility=facility or settings.default_facility,
        via="dimse",
    )


def system_principal(*, who: str, facility: str) -> Principal:
    """The broker acting on its own behalf or for an operator at the command line (the CLI,
    background jobs, the demo loader)."""
    return Principal(who=who, role=Role.admin, facility=facility)


def authorize(principal: Principal, *, action: str, facility: str | None = None) -> None:
    """Allow `principal` to perform `action` (e.g. "dimse.store") on `facility`'s data, or raise
    `broker.errors.Forbidden` (see the module docstring for which actions are decided here)."""
    permission = policy.ACTIONS.get(action)
    if permission is None:
        return
    decision = policy.permits(principal, permission, facility=facility)
    if not decision.allowed:
        raise Forbidden(f"not permitted: {action}")
