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
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from broker.errors import NotFound, ScanOnceError, Unavailable
from broker.facilities.models import Facility
from broker.index import service as index
from broker.peers import archive as remote
from broker.peers import dimse as scu
from broker.peers.errors import DimseStatusError
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


def ensure_local(*, engine: Engine, store: Any, study_uid: str, calling_ae: str = "SCANONCE") -> None:
    """Make sure the broker holds the study's pixels, fetching them from a facility if needed.

    Raises NotFound (no such study) or Unavailable (every facility holding it is down; the
    message names them). Blocking: async callers run it in a thread.
    """
    with Session(engine) as session:
        if not index.remote_holders(session=session, study_uid=study_uid):
            return
    with _study_lock(engine, study_uid):
        with Session(engine) as session:
            holders = index.remote_holders(session=session, study_uid=study_uid)
            if not holders:
                return  # fetched by whoever held the lock before us
            facilities = [session.get(Facility, facility_id) for facility_id in holders]
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
        outcomes = index.ingest_files(
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
    index.mark_local(engine=engine, study_uid=study_uid)
    log.info(
        "fetched a study from facility %s: %d instances, %d failed", facility.id, len(outcomes), len(failed)
    )


def _cget(facility: Facility, study_uid: str, into: str, calling_ae: str) -> list[str]:
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
    if result.failed:
        # Only part of the study arrived (0xB000, or 0xA702 when nothing did): taking it would
        # mark the study as held here with instances missing, never to be asked for again. A
        # WADO-RS retrieve that breaks off is refused whole the same way.
        raise Unavailable(
            f"facility {facility.id!r} failed to send {result.failed} instance(s) of the study by C-GET"
        )
    return list(result.paths)
