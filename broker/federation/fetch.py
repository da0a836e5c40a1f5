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
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from broker.errors import NotFound, ScanOnceError, Unavailable
from broker.facilities.models import Facility
from broker.index import service as index
from broker.index.models import StudyLocation
from broker.index.schemas import StoreOutcome
from broker.peers import archive as remote
from broker.peers import dimse as scu
from broker.peers.errors import DimseStatusError
from broker.security.schemas import Principal, Role

log = logging.getLogger("scanonce.federation.fetch")

# How long after a fetch that left instances missing the study is fetched from that facility
# again. Every open of the study asks for it; without a wait, one instance the facility cannot
# send (or the broker refuses) would make each of them fetch the whole study again. Fetching
# again is cheap for the broker (what it holds is a duplicate) but not for the facility.
RETRY_AFTER = timedelta(minutes=10)

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


def ensure_local(
    *,
    engine: Engine,
    store: Any,
    study_uid: str,
    calling_ae: str = "SCANONCE",
    retry_after: timedelta = RETRY_AFTER,
) -> None:
    """Make sure the broker holds the study's pixels, fetching them from a facility if needed.

    Raises NotFound (no such study) or Unavailable (no facility holding it could send it whole;
    the message names each one and why, e.g. how many instances are missing). A fetch that left
    instances missing keeps what arrived and leaves the study held at the facility; that facility
    is asked again only `retry_after` later (till then the answer is the same Unavailable).
    Blocking: async callers run it in a thread.
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
            locations = {
                loc.facility_id: loc
                for loc in index.study_locations(session=session, study_uids=[study_uid]).get(study_uid, [])
            }
            held = len(index.held_instances(session=session, study_uid=study_uid))
        candidates = [f for f in facilities if f is not None and f.sharing_policy != "none"]
        # DICOMweb first: one HTTP stream, no SOP-class negotiation.
        candidates.sort(key=lambda f: (f.dicomweb_url is None, f.id))
        if not candidates:
            raise NotFound("the study is not held by any facility that shares it")
        errors: list[str] = []
        now = datetime.now(UTC)
        for facility in candidates:
            waiting = _waiting(locations.get(facility.id), held, now, retry_after)
            if waiting is not None:
                errors.append(waiting)
                continue
            try:
                _fetch_from(engine, store, facility, study_uid, calling_ae)
                return
            except _Incomplete as exc:
                again = datetime.now(UTC) + retry_after
                errors.append(f"{exc.message}; the facility is asked again after {again:%H:%M} UTC")
            except ScanOnceError as exc:
                log.warning("fetch from facility %s failed: %s", facility.id, exc.message)
                errors.append(exc.message)
        raise Unavailable("; ".join(errors))


def _waiting(location: StudyLocation | None, held: int, now: datetime, retry_after: timedelta) -> str | None:
    """Why the study is not fetched from this location's facility now (a fetch from it left
    instances missing less than `retry_after` ago), or None to fetch."""
    if location is None or location.fetched_at is None:
        return None
    last = location.fetched_at
    if last.tzinfo is None:
        last = last.replace(tzinfo=UTC)
    expected = location.remote_instances
    if now - last >= retry_after or 0 < expected <= held:
        return None  # waited long enough, or a sync since says the broker holds all there is
    missing = (
        f"{expected - held} of {expected} instances of the study are missing"
        if expected > held
        else "instances of the study are missing"
    )
    return (
        f"{missing} from facility {location.facility_id!r} (the fetch at {last:%H:%M} UTC could not "
        f"store them); the broker keeps the {held} it received; the facility is asked again after "
        f"{last + retry_after:%H:%M} UTC"
    )


def _fetch_from(engine: Engine, store: Any, facility: Facility, study_uid: str, calling_ae: str) -> None:
    with tempfile.TemporaryDirectory(prefix="scanonce-fetch-") as tmp:
        unsent = 0  # instances the facility reported it failed to send
        if facility.dicomweb_url:
            paths = remote.wado_retrieve_study(facility=facility, study_uid=study_uid, into=tmp)
        elif facility.ae_title and facility.host and facility.port:
            paths, unsent = _cget(facility, study_uid, tmp, calling_ae)
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
    with Session(engine) as session:
        held = index.held_instances(session=session, study_uid=study_uid)
        location = index.locations_at(session=session, facility_id=facility.id, study_uids=[study_uid]).get(
            study_uid
        )
    # What the facility listed at the last sync (0: it did not say), and what it sent that the
    # broker could not store: a conflict under a UID of another study is missing here too, while
    # an identical copy already held is a duplicate, not a failure; an instance of another study
    # sent by mistake is not missing from this one.
    expected = location.remote_instances if location is not None else 0
    refused = [
        o
        for o in outcomes
        if o.status == "failed" and o.sop_instance_uid not in held and o.study_uid in ("", study_uid)
    ]
    missing = max(expected - len(held), len(refused) + unsent)
    if missing <= 0 and held:
        index.mark_local(engine=engine, study_uid=study_uid)
        log.info("fetched study %s from facility %s: %d instances", study_uid, facility.id, len(outcomes))
        return
    stored = Counter(o.series_uid for o in outcomes if o.status == "stored")
    index.mark_partial(engine=engine, study_uid=study_uid, facility_id=facility.id, stored=stored)
    expected = max(expected, len(held) + missing)
    log.warning(
        "fetched study %s from facility %s incomplete: %d of %d instances missing "
        "(%d received, %d not sent, %d refused%s)",
        study_uid,
        facility.id,
        missing,
        expected,
        len(outcomes),
        unsent,
        len(refused),
        f": {_reasons(refused)}" if refused else "",
    )
    why = _why(refused, unsent)
    if not held:
        raise _Incomplete(f"facility {facility.id!r} sent the study but no instance could be stored{why}")
    raise _Incomplete(
        f"{missing} of {expected} instances of the study are missing from facility {facility.id!r}"
        f"{why}; the broker keeps the {len(held)} it received"
    )


class _Incomplete(Unavailable):
    """A fetch that left instances missing (what arrived is kept): asked again only later."""


def _reasons(refused: list[StoreOutcome]) -> str:
    """Why ingest refused instances, each reason once with how many: outcome messages carry no
    patient data."""
    return "; ".join(f"{n} x {message}" for message, n in Counter(o.message for o in refused).items())


def _why(refused: list[StoreOutcome], unsent: int) -> str:
    parts = [f"{unsent} not sent by the facility"] if unsent else []
    if refused:
        parts.append(f"{len(refused)} refused: {_reasons(refused)}")
    return f" ({'; '.join(parts)})" if parts else ""


def _cget(facility: Facility, study_uid: str, into: str, calling_ae: str) -> tuple[list[str], int]:
    """The files a C-GET of the study brought, and how many instances the facility reported it
    failed to send."""
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
    if result.failed and not result.paths:
        raise Unavailable(
            f"facility {facility.id!r} failed to send {result.failed} instance(s) of the study by C-GET"
        )
    # Part of the study arrived (0xB000): the broker acknowledged each instance that did, so it
    # keeps them; the fetch counts the rest as missing, as it does instances ingest refuses.
    return list(result.paths), result.failed
