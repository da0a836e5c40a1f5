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

import time

from sqlalchemy import delete, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from broker.db import DatabaseUnreachable, core_table
from broker.errors import Forbidden
from broker.security import policy
from broker.security.models import SeenTokenId
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


def claim_token_id(
    *, engine: Engine, key: str, expires_at: int, now: float | None = None, wait_for_flush: bool = False
) -> bool:
    """Record a one-time token's id (`key`, kept until `expires_at`, Unix seconds); False if some
    node already did and it has not expired: a replay. One statement: the primary key decides
    between nodes racing with the same token, so exactly one of them gets True. A row left over
    from an expired token (not purged yet) is taken over, as if it had been purged.

    Raises DatabaseUnreachable when it cannot be recorded: the token is then refused (never
    accepted unrecorded, which would let a replay through). `wait_for_flush`: PostgreSQL commits
    durably (bench/token_replay.py compares the two)."""
    table = core_table(SeenTokenId)
    dialect = sqlite if engine.dialect.name == "sqlite" else postgresql
    insert = dialect.insert(table).values(key=key, expires_at=expires_at)
    stmt = insert.on_conflict_do_update(
        index_elements=[table.c.key],
        set_={"expires_at": insert.excluded.expires_at},
        where=table.c.expires_at < int(time.time() if now is None else now),
    ).returning(table.c.key)  # a row back: inserted or taken over (rowcount is -1 on psycopg)
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql" and not wait_for_flush:
                # Not waiting for the WAL flush (~half the cost): the record can be lost only if
                # PostgreSQL crashes within a fraction of a second of it (a clean restart or a
                # failover to a synchronous replica keeps it); the replay window that leaves is
                # that fraction of a second, after a database crash.
                conn.execute(text("SET LOCAL synchronous_commit = off"))
            return conn.execute(stmt).first() is not None
    except SQLAlchemyError as exc:
        raise DatabaseUnreachable("the token could not be checked for replay; try again shortly") from exc


def purge_token_ids(*, engine: Engine, now: float | None = None) -> int:
    """Delete the ids of tokens expired before `now` (by the expiry index); how many went."""
    table = core_table(SeenTokenId)
    with engine.begin() as conn:
        return int(conn.execute(delete(table).where(table.c.expires_at < int(now or time.time()))).rowcount)
