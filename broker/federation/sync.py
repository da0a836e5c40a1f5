"""Index sync: make a facility archive's studies findable without pulling its pixels.

One sync is one job. The facility's study list is read page by page (QIDO-RS or C-FIND STUDY);
only studies that are new or whose series/instance counts changed are asked about at SERIES
level, and each page is written in one transaction. Every study seen is stamped with the job's
id, so:

- a job that is interrupted and claimed again lists the archive again (one query; paging is
  not stable on every archive, see peers.archive) and skips the studies it already stamped;
  its checkpoint keeps the listing mode and the count written;
- once the listing is complete, the studies of that facility not stamped by this job are gone
  from the facility, and leave the index (unless the broker holds their pixels).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session

from broker.db import session_scope
from broker.dicom.json_model import str_value
from broker.errors import BadRequest, Conflict, Unavailable
from broker.facilities import service as facilities
from broker.facilities.models import Facility
from broker.index import service as index
from broker.index.models import StudyLocation
from broker.jobs import service as jobs
from broker.jobs.models import Job
from broker.peers.archive import RemoteSeries, RemoteStudy, Source, open_source, studies_from_series

log = logging.getLogger("scanonce.federation.sync")

SYNC_KIND = "sync"
_T_ISSUER = "00100021"


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class SyncResult:
    job_id: int
    studies_seen: int
    studies_written: int
    studies_removed: int
    seconds: float


def queue_sync(*, engine: Engine, facility: Facility, calling_ae: str = "SCANONCE") -> Job:
    if facility.sharing_policy == "none":
        raise BadRequest(f"facility {facility.id!r} shares nothing (sharing policy 'none')")
    if not facility.dicomweb_url and not (facility.ae_title and facility.host and facility.port):
        raise BadRequest(f"facility {facility.id!r} has neither a DICOMweb URL nor a DIMSE endpoint")
    return jobs.enqueue(
        engine=engine,
        kind=SYNC_KIND,
        key=facility.id,
        params={"facility_id": facility.id, "calling_ae": calling_ae},
    )


def sync_facility(
    *,
    engine: Engine,
    store: Any = None,
    facility_id: str,
    progress: Callable[[int, int | None, str], None] | None = None,
    calling_ae: str = "SCANONCE",
) -> SyncResult:
    """Sync now, in this thread, as a job (visible at /api/jobs/{id}).

    If a sync of this facility is already queued, it is this one that runs; if one is running
    elsewhere (fresh heartbeat), raises Conflict. `progress(done, total, message)` mirrors the
    job's progress (the CLI's progress bar).
    """
    with Session(engine) as session:
        facility = facilities.get_facility(session=session, facility_id=facility_id)
        job = queue_sync(engine=engine, facility=facility, calling_ae=calling_ae)
    assert job.id is not None
    claimed = jobs.claim(engine=engine, job_id=job.id)
    if claimed is None:
        raise Conflict(f"a sync of facility {facility_id!r} is already running (job {job.id})")
    started = _now()
    # The claim's fencing token: if a worker took the job over (this run stalled past its lease),
    # this run's progress and result are refused (jobs.LeaseLost) rather than overwriting its.
    lease = jobs.Lease.of(claimed)
    p = jobs.Progress(
        engine=engine, job_id=job.id, listener=progress, done=claimed.progress_done, lease=lease
    )
    try:
        with jobs.heartbeat(engine=engine, job_id=job.id, lease=lease, lost=p.lost):
            stats = run_sync(engine=engine, job=claimed, progress=p, calling_ae=calling_ae)
    except jobs.LeaseLost:
        raise
    except Exception as exc:
        jobs.finish(
            engine=engine, job_id=job.id, error=getattr(exc, "message", None) or str(exc), lease=lease
        )
        _record_state(engine, facility_id, job.id, status="failed", error=str(exc))
        raise
    jobs.finish(engine=engine, job_id=job.id, message=p.message, lease=lease)
    return SyncResult(
        job_id=job.id,
        studies_seen=stats["seen"],
        studies_written=stats["written"],
        studies_removed=stats["removed"],
        seconds=(_now() - started).total_seconds(),
    )


def sync_job(engine: Engine, _store: Any, job: Job, progress: jobs.Progress) -> None:
    try:
        run_sync(
            engine=engine,
            job=job,
            progress=progress,
            calling_ae=jobs.params_of(job).get("calling_ae", "SCANONCE"),
        )
    except Exception as exc:
        facility_id = jobs.params_of(job).get("facility_id", job.key)
        _record_state(engine, facility_id, job.id or 0, status="failed", error=str(exc))
        raise


def _record_state(
    engine: Engine, facility_id: str, job_id: int, *, status: str, error: str = "", total: int | None = None
) -> None:
    facilities.record_sync_state(
        engine=engine, facility_id=facility_id, job_id=job_id, status=status, error=error, total=total
    )


def run_sync(
    *, engine: Engine, job: Job, progress: jobs.Progress, calling_ae: str = "SCANONCE", chunk: int = 500
) -> dict[str, int]:
    """The body of a sync job. Safe to run again for the same job: what it already wrote is
    stamped with the job id and skipped."""
    assert job.id is not None
    run = job.id
    facility_id = jobs.params_of(job).get("facility_id") or job.key
    with Session(engine, expire_on_commit=False) as session:
        facility = facilities.get_facility(session=session, facility_id=facility_id)
        indexed = index.has_locations(session=session, facility_id=facility_id)
    if facility.sharing_policy == "none":
        raise BadRequest(f"facility {facility.id!r} shares nothing (sharing policy 'none')")
    checkpoint = jobs.checkpoint_of(job)
    _record_state(engine, facility_id, run, status="running")
    stats = {"seen": 0, "written": int(checkpoint.get("written", 0)), "removed": 0}
    source = open_source(facility, calling_ae=calling_ae)
    try:
        series_of: dict[str, list[RemoteSeries]] | None = None
        if source.prefers_series_listing and (not indexed or checkpoint.get("mode") == "full"):
            # Nothing indexed yet: every study is new, so one SERIES-level listing describes them
            # all (study keys ride along) and saves a round of per-study queries.
            progress.update(
                message=f"listing series at {facility.id}", checkpoint={**checkpoint, "mode": "full"}
            )
            try:
                all_series: list[RemoteSeries] | None = source.series(None)
            except (BadRequest, Unavailable) as exc:
                # A strictly hierarchical archive may refuse SERIES without a study: go study by study.
                log.info("facility %s refused a whole-archive series query (%s)", facility.id, exc.message)
                all_series = None
            if all_series is not None:
                studies = studies_from_series(all_series)
                series_of = {}
                for se in all_series:
                    series_of.setdefault(se.study_uid, []).append(se)
            else:
                studies = source.studies(None)
        else:
            progress.update(message=f"listing studies at {facility.id}")
            studies = source.studies(None)
        total = len(studies)
        progress.update(total=total, done=0, message=f"{total} studies at {facility.id}")
        for i in range(0, total, chunk):
            page = studies[i : i + chunk]
            stats["written"] += _sync_page(engine, source, facility, run, page, series_of)
            stats["seen"] = min(total, i + chunk)
            progress.update(
                done=stats["seen"],
                message=f"{stats['seen']}/{total} studies, {stats['written']} new or changed",
                checkpoint={
                    "mode": "full" if series_of is not None else "incremental",
                    "written": stats["written"],
                },
            )
        stats["removed"] = _remove_gone(engine, source, facility, run)
    finally:
        source.close()
    progress.update(
        done=stats["seen"],
        total=stats["seen"],
        message=(
            f"{stats['seen']} studies at {facility.id}: {stats['written']} new or changed, "
            f"{stats['removed']} removed"
        ),
    )
    _record_state(engine, facility_id, run, status="done", total=stats["seen"])
    return stats


# -- writing a page ---------------------------------------------------------------------------


def _sync_page(
    engine: Engine,
    source: Source,
    facility: Facility,
    run: int,
    page: list[RemoteStudy],
    known_series: dict[str, list[RemoteSeries]] | None = None,
) -> int:
    """Index one page of the facility's listing; returns how many studies were new or changed."""
    uids = list(dict.fromkeys(s.uid for s in page))
    by_uid = {s.uid: s for s in page}
    with Session(engine, expire_on_commit=False) as session:
        locations = index.locations_at(session=session, facility_id=facility.id, study_uids=uids)
    todo = [u for u in uids if (loc := locations.get(u)) is None or loc.seen_job != run]
    changed = [u for u in todo if _changed(by_uid[u], locations.get(u))]
    changed_set = set(changed)
    # Network before the transaction: a slow archive never holds database locks.
    series_of = _series_of(source, changed, known_series)
    for u in changed:
        _take_issuer_from_series(by_uid[u], series_of.get(u, []))
    unchanged = [u for u in todo if u not in changed_set]
    with session_scope(engine) as session:
        if unchanged:
            index.mark_seen(session=session, facility_id=facility.id, study_uids=unchanged, run=run)
        if changed:
            index.upsert_remote_studies(
                session=session,
                facility=facility,
                run=run,
                studies=[by_uid[u] for u in changed],
                series_of=series_of,
            )
    return len(changed)


def _changed(study: RemoteStudy, location: StudyLocation | None) -> bool:
    """New at the facility, or its series/instance counts differ from what the last sync saw."""
    if location is None:
        return True
    return (location.remote_series, location.remote_instances) != (study.num_series, study.num_instances)


def _series_of(
    source: Source, study_uids: list[str], known_series: dict[str, list[RemoteSeries]] | None
) -> dict[str, list[RemoteSeries]]:
    """The series of these studies: from the whole-archive listing when there was one, else asked."""
    if known_series is not None:
        return {u: known_series.get(u, []) for u in study_uids}
    series_of: dict[str, list[RemoteSeries]] = {}
    if study_uids:
        for se in source.series(study_uids):
            series_of.setdefault(se.study_uid, []).append(se)
    return series_of


def _take_issuer_from_series(study: RemoteStudy, series: Sequence[RemoteSeries]) -> None:
    """A C-FIND STUDY listing leaves IssuerOfPatientID out (it is slow to ask an archive for, see
    remote._CFIND_STUDY_FIELDS); the SERIES answers of a new or changed study carry it."""
    if str_value(study.attrs, _T_ISSUER):
        return
    for se in series:
        if str_value(se.attrs, _T_ISSUER):
            study.attrs[_T_ISSUER] = se.attrs[_T_ISSUER]
            return


# -- removing what the facility no longer holds -----------------------------------------------


def _remove_gone(engine: Engine, source: Source, facility: Facility, run: int) -> int:
    with Session(engine) as session:
        missing = index.unseen_studies(session=session, facility_id=facility.id, run=run)
    if not missing:
        return 0
    # Not in the listing is not proof of deletion (a listing can miss a match, e.g. one cut or
    # reordered by the archive): ask for those studies by UID, and keep the ones still there.
    still_there = source.studies(missing)
    if still_there:
        _sync_page(engine, source, facility, run, still_there)
    present = {s.uid for s in still_there}
    uids = [u for u in missing if u not in present]
    if uids:
        index.remove_gone(engine=engine, facility_id=facility.id, study_uids=uids)
    return len(uids)
