"""Facility registry: who is federated, where their archive answers, and what they share."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from broker.db import session_scope
from broker.errors import BadRequest, Conflict, NotFound
from broker.federation.models import Facility, FacilityAE, StudyLocation, SyncState
from broker.federation.schemas import FACILITY_ID, SharingPolicy
from broker.settings import Settings

if TYPE_CHECKING:
    from broker.federation.sync import SyncResult

_AE = re.compile(r"^[ -\[\]-~]{1,16}$")
_UNSET: Any = object()


def ensure_default_facility(*, engine: Engine, settings: Settings) -> None:
    """The embedded default always has the `local` facility (safe to call on every start)."""
    with session_scope(engine) as session:
        if session.get(Facility, settings.default_facility) is None:
            session.add(
                Facility(id=settings.default_facility, name="Local archive", issuer=settings.default_issuer)
            )


def _ae(value: str, what: str) -> str:
    value = value.strip()
    if not _AE.match(value) or not value:
        raise BadRequest(f"{what} must be 1-16 characters, no backslash or control characters")
    return value


def _check_endpoints(facility: Facility) -> None:
    if facility.dicomweb_url is not None and not re.match(r"^https?://", facility.dicomweb_url):
        raise BadRequest("dicomweb_url must be an http:// or https:// URL")
    dimse = (facility.ae_title, facility.host, facility.port)
    if any(v is not None for v in dimse) and not all(v is not None for v in dimse):
        raise BadRequest("a DIMSE endpoint needs all of ae_title, host and port")
    if facility.port is not None and not 0 < facility.port < 65536:
        raise BadRequest("port must be 1-65535")
    if facility.sharing_policy not in SharingPolicy.__members__:
        raise BadRequest(f"sharing_policy must be one of {', '.join(SharingPolicy.__members__)}")


def _set_calling_aes(session: Session, facility_id: str, titles: Iterable[str]) -> None:
    wanted = list(dict.fromkeys(_ae(t, "calling AE title") for t in titles))
    if wanted:
        taken = session.exec(
            select(FacilityAE).where(
                col(FacilityAE.ae_title).in_(wanted), FacilityAE.facility_id != facility_id
            )
        ).first()
        if taken is not None:
            raise Conflict(
                f"calling AE title {taken.ae_title!r} already belongs to facility {taken.facility_id!r}"
            )
    session.exec(delete(FacilityAE).where(col(FacilityAE.facility_id) == facility_id))  # type: ignore[call-overload]
    for title in wanted:
        session.add(FacilityAE(ae_title=title, facility_id=facility_id))


def add_facility(
    *,
    session: Session,
    facility_id: str,
    issuer: str,
    name: str = "",
    dicomweb_url: str | None = None,
    ae_title: str | None = None,
    host: str | None = None,
    port: int | None = None,
    calling_ae_titles: Iterable[str] = (),
    sharing_policy: str = "share_all",
) -> Facility:
    if not re.match(FACILITY_ID, facility_id):
        raise BadRequest("facility id must be 1-64 letters, digits, '.', '_' or '-'")
    if not issuer:
        raise BadRequest("issuer is required")
    if session.get(Facility, facility_id) is not None:
        raise Conflict(f"facility {facility_id!r} already exists")
    if session.exec(select(Facility).where(Facility.issuer == issuer)).first() is not None:
        raise Conflict(f"issuer {issuer!r} is already registered to another facility")
    facility = Facility(
        id=facility_id,
        issuer=issuer,
        name=name,
        dicomweb_url=dicomweb_url.rstrip("/") if dicomweb_url else None,
        ae_title=_ae(ae_title, "AE title") if ae_title else None,
        host=host or None,
        port=port,
        sharing_policy=str(sharing_policy),
    )
    _check_endpoints(facility)
    session.add(facility)
    session.flush()
    _set_calling_aes(session, facility_id, calling_ae_titles)
    session.commit()
    session.refresh(facility)
    return facility


def update_facility(*, session: Session, facility_id: str, **changes: Any) -> Facility:
    """Change the given fields (issuer, name, dicomweb_url, ae_title, host, port,
    calling_ae_titles, sharing_policy); a None endpoint field clears it."""
    facility = get_facility(session=session, facility_id=facility_id)
    allowed = {"issuer", "name", "dicomweb_url", "ae_title", "host", "port", "sharing_policy"}
    unknown = set(changes) - allowed - {"calling_ae_titles"}
    if unknown:
        raise BadRequest(f"unknown facility fields: {', '.join(sorted(unknown))}")
    if "issuer" in changes:
        issuer = changes["issuer"]
        if not issuer:
            raise BadRequest("issuer cannot be empty")
        other = session.exec(
            select(Facility).where(Facility.issuer == issuer, Facility.id != facility_id)
        ).first()
        if other is not None:
            raise Conflict(f"issuer {issuer!r} is already registered to another facility")
    for name in allowed & set(changes):
        value = changes[name]
        if name == "dicomweb_url" and value:
            value = value.rstrip("/")
        if name == "ae_title" and value:
            value = _ae(value, "AE title")
        if name in ("name",) and value is None:
            value = ""
        if name == "sharing_policy" and value is not None:
            value = str(value)
        setattr(facility, name, value)
    _check_endpoints(facility)
    if changes.get("calling_ae_titles") is not None:
        _set_calling_aes(session, facility_id, changes["calling_ae_titles"])
    session.add(facility)
    session.commit()
    session.refresh(facility)
    return facility


def remove_facility(*, session: Session, facility_id: str) -> None:
    """Unregister a facility. Refused while the index holds its studies or patients: those rows
    are qualified by its issuer and must not become orphans."""
    from broker.index.models import Patient, Study

    facility = get_facility(session=session, facility_id=facility_id)
    held = session.exec(select(Study.pk).where(Study.facility_id == facility_id).limit(1)).first()
    held = held or session.exec(select(Patient.pk).where(Patient.facility_id == facility_id).limit(1)).first()
    if held is not None:
        raise Conflict(f"facility {facility_id!r} still has studies in the index; remove them first")
    for table in (FacilityAE, SyncState, StudyLocation):
        session.exec(delete(table).where(table.facility_id == facility_id))  # type: ignore[call-overload, attr-defined, arg-type]
    session.delete(facility)
    session.commit()


def list_facilities(*, session: Session) -> list[Facility]:
    return list(session.exec(select(Facility).order_by(col(Facility.id))))


def get_facility(*, session: Session, facility_id: str) -> Facility:
    facility = session.get(Facility, facility_id)
    if facility is None:
        raise NotFound(f"no facility {facility_id!r}")
    return facility


def calling_ae_titles(*, session: Session, facility_id: str) -> list[str]:
    return list(
        session.exec(
            select(FacilityAE.ae_title)
            .where(FacilityAE.facility_id == facility_id)
            .order_by(col(FacilityAE.ae_title))
        )
    )


def sync_state(*, session: Session, facility_id: str) -> SyncState | None:
    return session.get(SyncState, facility_id)


def facility_for_calling_ae(*, session: Session, ae_title: str) -> Facility | None:
    """The facility a DIMSE caller belongs to, by its calling AE title (trailing spaces ignored)."""
    row = session.get(FacilityAE, ae_title.strip())
    return session.get(Facility, row.facility_id) if row is not None else None


# -- index sync and retrieve on demand (implemented in sync.py / fetch.py) ---------------------


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
    from broker.federation import sync

    return sync.sync_facility(
        engine=engine, store=store, facility_id=facility_id, progress=progress, calling_ae=calling_ae
    )


def ensure_local(*, engine: Engine, store: Any, study_uid: str, calling_ae: str = "SCANONCE") -> None:
    """Fetch a study held only at a facility (once, however many ask); NotFound / Unavailable."""
    from broker.federation import fetch

    fetch.ensure_local(engine=engine, store=store, study_uid=study_uid, calling_ae=calling_ae)


def is_remote_only(*, session: Session, study_uid: str) -> bool:
    from broker.federation import fetch

    return fetch.is_remote_only(session=session, study_uid=study_uid)


def study_locations(*, session: Session, study_uids: Sequence[str]) -> dict[str, list[StudyLocation]]:
    """Where each study is held (facility id, whether the broker has the pixels)."""
    out: dict[str, list[StudyLocation]] = {}
    for i in range(0, len(study_uids), 500):
        for loc in session.exec(
            select(StudyLocation).where(col(StudyLocation.study_uid).in_(study_uids[i : i + 500]))
        ):
            out.setdefault(loc.study_uid, []).append(loc)
    return out


def queue_due_syncs(*, engine: Engine, interval_seconds: float, calling_ae: str = "SCANONCE") -> list[int]:
    """Queue a sync for every facility with an archive endpoint whose last sync started longer
    than `interval_seconds` ago (or never). Returns the job ids; a queued one is not doubled."""
    from broker.federation import sync

    now = datetime.now(UTC)
    queued: list[int] = []
    with Session(engine) as session:
        facilities = [
            f
            for f in list_facilities(session=session)
            if f.sharing_policy != "none" and (f.dicomweb_url or (f.ae_title and f.host and f.port))
        ]
        states = {f.id: session.get(SyncState, f.id) for f in facilities}
    for f in facilities:
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
