"""Federation: index sync of facility archives and retrieve on demand, behind one facade.

The facility registry itself is `broker.facilities`; the clients that talk to an archive are
`broker.peers`. This module is what the interfaces (routes, CLI, DIMSE, DICOMweb) call.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session

from broker.facilities import service as facilities
from broker.facilities.models import SyncState
from broker.federation import fetch, sync
from broker.federation.sync import SyncResult
from broker.index import service as index
from broker.jobs import service as jobs
from broker.security.schemas import Principal
from broker.security.service import authorize


def register_jobs() -> None:
    """Federation's job kinds: the app factory and `scanonce worker` call this once."""
    jobs.register(sync.SYNC_KIND)(sync.sync_job)


def sync_facility(
    *,
    engine: Engine,
    store: Any,
    facility_id: str,
    progress: Callable[[int, int | None, str], None] | None = None,
    calling_ae: str = "SCANONCE",
) -> SyncResult:
    """Index the facility archive's studies now (incremental; a job visible at /api/jobs/{id}).
    `progress(done, total, message)` is called after every page."""
    return sync.sync_facility(
        engine=engine, store=store, facility_id=facility_id, progress=progress, calling_ae=calling_ae
    )


def queue_sync(
    *, engine: Engine, principal: Principal, facility_id: str, calling_ae: str = "SCANONCE"
) -> Any:
    """Queue a sync of one facility for `principal` (NotFound, BadRequest when it has nothing to
    sync from)."""
    authorize(principal, action="federation.sync", facility=facility_id)
    with Session(engine) as session:
        facility = facilities.get_facility(session=session, facility_id=facility_id)
    return sync.queue_sync(engine=engine, facility=facility, calling_ae=calling_ae)


def ensure_local(
    *,
    engine: Engine,
    store: Any,
    study_uid: str,
    calling_ae: str = "SCANONCE",
    retry_after: timedelta = fetch.RETRY_AFTER,
) -> None:
    """Fetch a study held only at a facility (once, however many ask); NotFound / Unavailable
    (naming the facilities, and how many instances a fetch left missing: what arrived is kept,
    the study stays held at its facility, and is asked for again only `retry_after` later)."""
    fetch.ensure_local(
        engine=engine, store=store, study_uid=study_uid, calling_ae=calling_ae, retry_after=retry_after
    )


def is_remote_only(*, session: Session, study_uid: str) -> bool:
    """True when the index knows the study only from a facility's archive (pixels not here)."""
    return index.is_remote_only(session=session, study_uid=study_uid)


def remote_only_count(*, session: Session, facility_id: str) -> int:
    """How many studies indexed from the facility the broker holds no pixels of."""
    return index.remote_only_count(session=session, facility_id=facility_id)


def queue_due_syncs(*, engine: Engine, interval_seconds: float, calling_ae: str = "SCANONCE") -> list[int]:
    """Queue a sync for every facility with an archive endpoint whose last sync started longer
    than `interval_seconds` ago (or never). Returns the job ids; a queued one is not doubled."""
    now = datetime.now(UTC)
    queued: list[int] = []
    with Session(engine) as session:
        due = [
            f
            for f in facilities.list_facilities(session=session)
            if f.sharing_policy != "none" and facilities.has_archive_endpoint(f)
        ]
        states = {f.id: session.get(SyncState, f.id) for f in due}
    for f in due:
        state = states[f.id]
        last = state.last_started_at if state is not None else None
        if last is not None and last.tzinfo is None:
            last = last.replace(tzinfo=UTC)
        if last is not None and (now - last).total_seconds() < interval_seconds:
            continue
        job = sync.queue_sync(engine=engine, facility=f, calling_ae=calling_ae)
        if job.id is not None and job.status == "queued":
            queued.append(job.id)
    return queued
