"""Retrieve on demand: bring a study that is held only at a facility into the broker.

The study is fetched once, however many requests ask for it at the same moment: a lock per
study in this process, and on PostgreSQL an advisory lock per study across processes. The
fetched instances go through the ordinary ingest path (same validation, idempotency and
conflict rules as STOW-RS and C-STORE).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import func, text, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from broker.db import session_scope
from broker.errors import NotFound, ScanOnceError, Unavailable
from broker.facilities.models import Facility
from broker.index.models import Instance, Series, Study, StudyLocation
from broker.peers import archive as remote
from broker.security.schemas import Principal, Role

log = logging.getLogger("scanonce.federation.fetch")

# study UID -> [lock, number of threads holding or waiting for it]; an entry lives only while
# someone needs it, so the table does not grow with every study ever fetched.
_locks: dict[str, list[Any]] = {}
_locks_guard = threading.Lock()


@contextmanager
def _study_lock(engine: Engine, study_uid: str) -> Iterator[None]:
    with _locks_guard:
        entry = _locks.setdefault(study_uid, [threading.Lock(), 0])
        entry[1] += 1
    try:
        with entry[0]:
            if engine.dialect.name != "postgresql":
                yield
                return
            # Other broker nodes: a session-level advisory lock on a connection of our own.
            key = zlib.crc32(study_uid.encode()) - (1 << 31)
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
    finally:
        with _locks_guard:
            entry[1] -= 1
            if entry[1] == 0:
                del _locks[study_uid]


def _has_pixels(session: Session, study_uid: str) -> tuple[bool, list[StudyLocation]]:
    """Whether the broker holds the study's pixels, and the facilities that hold it remotely."""
    locations = list(session.exec(select(StudyLocation).where(StudyLocation.study_uid == study_uid)))
    study = session.exec(select(Study).where(Study.study_uid == study_uid)).first()
    if study is None:
        raise NotFound("no such study in the index")
    if any(loc.has_pixels for loc in locations):
        return True, locations
    if not locations:
        # Not synced from anywhere: it came by STOW-RS or C-STORE, so what the index has is local.
        return True, locations
    return False, locations


def is_remote_only(*, session: Session, study_uid: str) -> bool:
    """True when the index knows the study only from a facility's archive (pixels not here)."""
    try:
        local, _ = _has_pixels(session, study_uid)
    except NotFound:
        return False
    return not local


def ensure_local(*, engine: Engine, store: Any, study_uid: str, calling_ae: str = "SCANONCE") -> None:
    """Make sure the broker holds the study's pixels, fetching them from a facility if needed.

    Raises NotFound (no such study) or Unavailable (every facility holding it is down; the
    message names them). Blocking: async callers run it in a thread.
    """
    with Session(engine) as session:
        local, _ = _has_pixels(session, study_uid)
    if local:
        return
    with _study_lock(engine, study_uid):
        with Session(engine) as session:
            local, locations = _has_pixels(session, study_uid)
            if local:
                return  # fetched by whoever held the lock before us
            facilities = [session.get(Facility, loc.facility_id) for loc in locations]
        candidates = [f for f in facilities if f is not None and f.sharing_policy != "none"]
        # DICOMweb first: one HTTP stream, no SOP-class negotiation.
        candidates.sort(key=lambda f: (f.dicomweb_url is None, f.id))
        if not candidates:
            raise NotFound("the study is not held by any facility that shares it")
        errors: list[str] = []
        for facility in candidates:
            try:
                _fetch_from(engine, store, facility, study_uid, calling_ae)
                return
            except ScanOnceError as exc:
                log.warning("fetch from facility %s failed: %s", facility.id, exc.message)
                errors.append(exc.message)
        raise Unavailable("; ".join(errors))


def _fetch_from(engine: Engine, store: Any, facility: Facility, study_uid: str, calling_ae: str) -> None:
    from broker.index.service import ingest_files

    with tempfile.TemporaryDirectory(prefix="scanonce-fetch-") as tmp:
        if facility.dicomweb_url:
            paths = remote.wado_retrieve_study(facility=facility, study_uid=study_uid, into=tmp)
        elif facility.ae_title and facility.host and facility.port:
            paths = _cget(facility, study_uid, tmp, calling_ae)
        else:
            raise Unavailable(f"facility {facility.id!r} has no archive endpoint to fetch from")
        if not paths:
            raise NotFound(f"the study is no longer at facility {facility.id!r}")
        principal = Principal(who=f"federation:fetch:{facility.id}", role=Role.admin, facility=facility.id)
        outcomes = ingest_files(
            engine=engine,
            store=store,
            principal=principal,
            facility_id=facility.id,
            paths=paths,
            expected_study_uid=study_uid,
            consume=True,
        )
    failed = [o for o in outcomes if o.status == "failed"]
    if failed and len(failed) == len(outcomes):
        raise Unavailable(f"facility {facility.id!r} sent the study but no instance could be stored")
    _mark_local(engine, facility, study_uid)
    log.info(
        "fetched a study from facility %s: %d instances, %d failed", facility.id, len(outcomes), len(failed)
    )


def _cget(facility: Facility, study_uid: str, into: str, calling_ae: str) -> list[str]:
    from broker.peers import dimse as scu
    from broker.peers.errors import DimseStatusError

    assert facility.host and facility.port and facility.ae_title
    try:
        result = scu.get(
            host=facility.host,
            port=int(facility.port),
            called_ae=facility.ae_title,
            into=into,
            level="STUDY",
            study_uid=study_uid,
            calling_ae=calling_ae,
        )
    except Unavailable as exc:
        raise Unavailable(f"facility {facility.id!r} is unavailable: {exc.message}") from exc
    except DimseStatusError as exc:
        raise Unavailable(f"facility {facility.id!r} failed the C-GET: {exc}") from exc
    return list(result.paths)


def _mark_local(engine: Engine, facility: Facility, study_uid: str) -> None:
    """Counts from the instances now held (ingest added to the remote counts sync had set), and
    the study's answers say ONLINE instead of NEARLINE."""
    with session_scope(engine) as session:
        study = session.exec(select(Study).where(Study.study_uid == study_uid)).one()
        per_series = dict(
            session.exec(  # type: ignore[call-overload]
                select(Instance.series_pk, func.count())
                .where(Instance.study_pk == study.pk)
                .group_by(col(Instance.series_pk))
            ).all()
        )
        for series in session.exec(select(Series).where(Series.study_pk == study.pk)):
            series.num_instances = int(per_series.get(series.pk or 0, 0))
            session.add(series)
        study.num_instances = int(sum(per_series.values()))
        study.num_series = len(per_series) or study.num_series
        attrs = orjson.loads(study.study_json or "{}")
        attrs["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
        study.study_json = orjson.dumps(attrs).decode()
        session.add(study)
        session.exec(
            update(StudyLocation)  # type: ignore[call-overload]
            .where(col(StudyLocation.study_uid) == study_uid)
            .values(has_pixels=True, fetched_at=datetime.now(UTC))
        )
