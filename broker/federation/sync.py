"""Index sync: make a facility archive's studies findable without pulling its pixels.

One sync is one job. The facility's study list is read page by page (QIDO-RS or C-FIND STUDY);
only studies that are new or whose series/instance counts changed are asked about at SERIES
level, and each page is written in one transaction. Every study seen is stamped with the job's
id, so:

- a job that is interrupted and claimed again skips what it already wrote (and, for QIDO-RS,
  resumes the listing at its checkpointed offset);
- once the listing is complete, the studies of that facility not stamped by this job are gone
  from the facility, and leave the index (unless the broker holds their pixels).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import bindparam, delete, func, insert, tuple_, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from broker.db import session_scope
from broker.dicom.attributes import is_series_level, is_study_level
from broker.dicom.bounds import bound_dataset
from broker.dicom.json_model import casefold_pn, fuzzy_pn, int_value, str_value
from broker.errors import BadRequest, Conflict, NotFound, Unavailable
from broker.facilities import service as facilities
from broker.facilities.models import Facility
from broker.index.models import Instance, Patient, Series, Study, StudyLocation
from broker.jobs import service as jobs
from broker.jobs.models import Job
from broker.peers.archive import RemoteSeries, RemoteStudy, Source, open_source, studies_from_series

log = logging.getLogger("scanonce.federation.sync")

SYNC_KIND = "sync"
# Remote-only studies say so in their QIDO-RS/C-FIND answers (PS3.18 InstanceAvailability).
_T_AVAILABILITY = "00080056"
_T_ISSUER = "00100021"
_DROP = {"00081190", "00080056", "00201206", "00201208", "00201209", "00080061"}


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
        facility = session.get(Facility, facility_id)
        if facility is None:
            raise NotFound(f"no facility {facility_id!r}")
        job = queue_sync(engine=engine, facility=facility, calling_ae=calling_ae)
    assert job.id is not None
    claimed = jobs.claim(engine=engine, job_id=job.id)
    if claimed is None:
        raise Conflict(f"a sync of facility {facility_id!r} is already running (job {job.id})")
    started = _now()
    p = jobs.Progress(engine=engine, job_id=job.id, listener=progress, done=claimed.progress_done)
    try:
        with jobs.heartbeat(engine=engine, job_id=job.id):
            stats = run_sync(engine=engine, job=claimed, progress=p, calling_ae=calling_ae)
    except Exception as exc:
        jobs.finish(engine=engine, job_id=job.id, error=getattr(exc, "message", None) or str(exc))
        _record_state(engine, facility_id, job.id, status="failed", error=str(exc))
        raise
    jobs.finish(engine=engine, job_id=job.id, message=p.message)
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
        facility = session.get(Facility, facility_id)
        if facility is None:
            raise NotFound(f"no facility {facility_id!r}")
        first = session.exec(
            select(StudyLocation.study_uid).where(StudyLocation.facility_id == facility_id)
        ).first()
    if facility.sharing_policy == "none":
        raise BadRequest(f"facility {facility.id!r} shares nothing (sharing policy 'none')")
    checkpoint = jobs.checkpoint_of(job)
    _record_state(engine, facility_id, run, status="running")
    stats = {"seen": 0, "written": int(checkpoint.get("written", 0)), "removed": 0}
    source = open_source(facility, calling_ae=calling_ae)
    try:
        series_of: dict[str, list[RemoteSeries]] | None = None
        if source.prefers_series_listing and (first is None or checkpoint.get("mode") == "full"):
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
    uids = list(dict.fromkeys(s.uid for s in page))
    by_uid = {s.uid: s for s in page}
    with Session(engine, expire_on_commit=False) as session:
        locations = {
            loc.study_uid: loc
            for loc in session.exec(
                select(StudyLocation).where(
                    StudyLocation.facility_id == facility.id, col(StudyLocation.study_uid).in_(uids)
                )
            )
        }
    todo = [u for u in uids if (loc := locations.get(u)) is None or loc.seen_job != run]
    changed = [
        u
        for u in todo
        if (loc := locations.get(u)) is None
        or (loc.remote_series, loc.remote_instances) != (by_uid[u].num_series, by_uid[u].num_instances)
    ]
    series_of: dict[str, list[RemoteSeries]] = {}
    if known_series is not None:
        series_of = {u: known_series.get(u, []) for u in changed}
    elif changed:
        # Network before the transaction: a slow archive never holds database locks.
        for se in source.series(changed):
            series_of.setdefault(se.study_uid, []).append(se)
    for u in changed:
        _take_issuer_from_series(by_uid[u], series_of.get(u, []))
    unchanged = [u for u in todo if u not in set(changed)]
    with session_scope(engine) as session:
        if unchanged:
            session.exec(
                update(StudyLocation)  # type: ignore[call-overload]
                .where(
                    col(StudyLocation.facility_id) == facility.id, col(StudyLocation.study_uid).in_(unchanged)
                )
                .values(seen_job=run)
            )
        if changed:
            _write_studies(session, facility, run, [by_uid[u] for u in changed], series_of, locations)
    return len(changed)


def _take_issuer_from_series(study: RemoteStudy, series: Sequence[RemoteSeries]) -> None:
    """A C-FIND STUDY listing leaves IssuerOfPatientID out (it is slow to ask an archive for, see
    remote._CFIND_STUDY_FIELDS); the SERIES answers of a new or changed study carry it."""
    if str_value(study.attrs, _T_ISSUER):
        return
    for se in series:
        if str_value(se.attrs, _T_ISSUER):
            study.attrs[_T_ISSUER] = se.attrs[_T_ISSUER]
            return


def _level_json(attrs: dict[str, Any], pick: Callable[[str], bool]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if k not in _DROP and pick(k)}


def _modalities(study: RemoteStudy, series: Sequence[RemoteSeries]) -> str:
    values = [str_value(s.attrs, "00080060") for s in series]
    if not any(values):
        values = [str(v) for v in (study.attrs.get("00080061") or {}).get("Value") or []]
    mods = list(dict.fromkeys(v for v in values if v))
    return "\\" + "".join(f"{m}\\" for m in mods) if mods else "\\"


def _write_studies(
    session: Session,
    facility: Facility,
    run: int,
    studies: list[RemoteStudy],
    series_of: dict[str, list[RemoteSeries]],
    locations: dict[str, StudyLocation],
) -> None:
    from broker.index.ingest import known_issuers, normalize_time, patient_issuer

    # The index holds values bounded by their VR, whatever an archive answered (as ingest does).
    for s in studies:
        s.attrs = bound_dataset(s.attrs)
    for remote_series in series_of.values():
        for rs in remote_series:
            rs.attrs = bound_dataset(rs.attrs)
    uids = [s.uid for s in studies]
    existing = {st.study_uid: st for st in session.exec(select(Study).where(col(Study.study_uid).in_(uids)))}
    # Studies whose pixels the broker holds are the broker's own copy: sync only notes the location.
    local = set(
        session.exec(
            select(Study.study_uid)
            .join(Instance, col(Instance.study_pk) == col(Study.pk))
            .where(col(Study.study_uid).in_(uids))
            .distinct()
        )
    )
    # Patients: one per (issuer, Patient ID). The same rule as ingest picks the issuer: the
    # data's IssuerOfPatientID when it names a registered facility, else this facility's.
    registered = known_issuers(session)
    keys = {
        s.uid: (
            patient_issuer(
                issuer_in_data=str_value(s.attrs, "00100021"),
                facility_issuer=facility.issuer,
                registered=registered,
            ),
            str_value(s.attrs, "00100020").strip() or f"~no-id~{s.uid}",
        )
        for s in studies
    }
    patient_keys = list(set(keys.values()))
    patients: dict[tuple[str, str], Patient] = {}
    for i in range(0, len(patient_keys), 500):
        for p in session.exec(
            select(Patient).where(
                tuple_(col(Patient.issuer), col(Patient.patient_id)).in_(patient_keys[i : i + 500])
            )
        ):
            patients[(p.issuer, p.patient_id)] = p
    fresh: dict[tuple[str, str], Patient] = {}
    for s in studies:
        if s.uid in local or keys[s.uid] in patients or keys[s.uid] in fresh:
            continue
        name = str_value(s.attrs, "00100010")
        fresh[keys[s.uid]] = Patient(
            facility_id=facility.id,
            issuer=keys[s.uid][0],
            patient_id=keys[s.uid][1],
            patient_name=name,
            name_norm=casefold_pn(name),
            name_fuzzy=fuzzy_pn(name),
            birth_date=str_value(s.attrs, "00100030")[:8],
            sex=str_value(s.attrs, "00100040")[:16],
        )
    if fresh:
        from broker.identity import service as identity_service

        # Same transaction, small sessions: linking issues ORM updates that scan every object
        # a session holds, so a page's worth of patients in one session would cost O(n^2).
        batch = list(fresh.values())
        for i in range(0, len(batch), 25):
            with Session(bind=session.connection(), expire_on_commit=False) as sub:
                sub.add_all(batch[i : i + 25])
                sub.flush()
                for p in batch[i : i + 25]:
                    identity_service.link_patient(session=sub, patient=p)
                sub.flush()
                for p in batch[i : i + 25]:
                    sub.expunge(p)
        patients.update(fresh)

    # Core statements from here on: thousands of rows per page, and ORM objects cost more to
    # build than the rows cost to write.
    study_t, series_t, loc_t = Study.__table__, Series.__table__, StudyLocation.__table__  # type: ignore[attr-defined]
    new_rows: list[dict[str, Any]] = []
    changed_rows: list[dict[str, Any]] = []
    pk_of: dict[str, int] = {}
    for s in studies:
        if s.uid in local:
            continue
        a = s.attrs
        patient = patients[keys[s.uid]]
        series = series_of.get(s.uid, [])
        study_json = _level_json(a, is_study_level)
        study_json[_T_AVAILABILITY] = {"vr": "CS", "Value": ["NEARLINE"]}
        values: dict[str, Any] = {
            "patient_pk": patient.pk,
            "patient_id": str_value(a, "00100020"),
            "issuer": patient.issuer,
            "issuer_in_data": str_value(a, "00100021").strip(),
            "patient_name": patient.patient_name,
            "name_norm": patient.name_norm,
            "name_fuzzy": patient.name_fuzzy,
            "birth_date": patient.birth_date,
            "sex": patient.sex,
            "study_date": str_value(a, "00080020")[:8],
            "study_time": normalize_time(str_value(a, "00080030"))[:32],
            "accession_number": str_value(a, "00080050")[:64],
            "study_id": str_value(a, "00200010")[:64],
            "study_description": str_value(a, "00081030")[:256],
            "referring_physician": casefold_pn(str_value(a, "00080090"))[:256],
            "modalities": _modalities(s, series),
            "num_series": len(series) or s.num_series,
            "num_instances": sum(x.num_instances for x in series) or s.num_instances,
            "study_json": orjson.dumps(study_json).decode(),
            "updated_at": _now(),
        }
        study = existing.get(s.uid)
        if study is None:
            new_rows.append({"study_uid": s.uid, "facility_id": facility.id, **values})
        elif study.facility_id == facility.id:
            assert study.pk is not None
            changed_rows.append({"b_pk": study.pk, **values})
            pk_of[s.uid] = study.pk
        # else: indexed from another facility first; this one is only a second location.
    if new_rows:
        stmt = insert(study_t).returning(study_t.c.pk, study_t.c.study_uid)
        for pk, uid in session.execute(stmt, new_rows):
            pk_of[uid] = pk
    if changed_rows:
        session.execute(update(study_t).where(study_t.c.pk == bindparam("b_pk")), changed_rows)

    remote_uids = [rs.uid for uid in pk_of for rs in series_of.get(uid, [])]
    current: dict[str, int] = {}
    if changed_rows:
        # A changed study: find its series gone at the facility.
        pks = [r["b_pk"] for r in changed_rows]
        for pk, uid in session.execute(
            select(series_t.c.pk, series_t.c.series_uid).where(series_t.c.study_pk.in_(pks))
        ):
            current[uid] = pk
    for i in range(0, len(remote_uids), 500):
        # A series the index already holds (under this or another study) is updated, never doubled.
        chunk = remote_uids[i : i + 500]
        for pk, uid in session.execute(
            select(series_t.c.pk, series_t.c.series_uid).where(series_t.c.series_uid.in_(chunk))
        ):
            current[uid] = pk
    wanted: set[str] = set()
    series_new: list[dict[str, Any]] = []
    series_changed: list[dict[str, Any]] = []
    for uid, study_pk in pk_of.items():
        for rs in series_of.get(uid, []):
            if rs.uid in wanted:
                continue
            wanted.add(rs.uid)
            a = rs.attrs
            values = {
                "study_pk": study_pk,
                "modality": str_value(a, "00080060")[:16],
                "series_number": int_value(a, "00200011"),
                "series_description": str_value(a, "0008103E")[:256],
                "body_part": str_value(a, "00180015")[:64],
                "pps_start_date": str_value(a, "00400244")[:8],
                "pps_start_time": normalize_time(str_value(a, "00400245"))[:32],
                "num_instances": rs.num_instances,
                "series_json": orjson.dumps(_level_json(a, is_series_level)).decode(),
            }
            if rs.uid in current:
                series_changed.append({"b_pk": current[rs.uid], **values})
            else:
                series_new.append({"series_uid": rs.uid, **values})
    if series_new:
        session.execute(insert(series_t), series_new)
    if series_changed:
        session.execute(update(series_t).where(series_t.c.pk == bindparam("b_pk")), series_changed)
    gone = [pk for uid, pk in current.items() if uid not in wanted]
    if gone:
        session.execute(delete(series_t).where(series_t.c.pk.in_(gone)))

    now = _now()
    loc_new: list[dict[str, Any]] = []
    loc_changed: list[dict[str, Any]] = []
    for s in studies:
        row = {
            "remote_series": s.num_series,
            "remote_instances": s.num_instances,
            "seen_job": run,
            "has_pixels": s.uid in local,
            "synced_at": now,
        }
        # `locations` holds every row of this facility for the page: a missing one is new.
        if s.uid in locations:
            loc_changed.append({"b_uid": s.uid, **row})
        else:
            loc_new.append({"study_uid": s.uid, "facility_id": facility.id, **row})
    if loc_new:
        session.execute(insert(loc_t), loc_new)
    if loc_changed:
        session.execute(
            update(loc_t).where(loc_t.c.study_uid == bindparam("b_uid"), loc_t.c.facility_id == facility.id),
            loc_changed,
        )


# -- removing what the facility no longer holds -----------------------------------------------


def _remove_gone(engine: Engine, source: Source, facility: Facility, run: int) -> int:
    with Session(engine) as session:
        missing = list(
            session.exec(
                select(StudyLocation.study_uid).where(
                    StudyLocation.facility_id == facility.id,
                    (col(StudyLocation.seen_job).is_(None)) | (col(StudyLocation.seen_job) != run),
                )
            )
        )
    if not missing:
        return 0
    # Not in the listing is not proof of deletion (a listing can miss a match, e.g. one cut or
    # reordered by the archive): ask for those studies by UID, and keep the ones still there.
    still_there = source.studies(missing)
    if still_there:
        _sync_page(engine, source, facility, run, still_there)
    present = {s.uid for s in still_there}
    uids = [u for u in missing if u not in present]
    if not uids:
        return 0
    with session_scope(engine) as session:
        for i in range(0, len(uids), 500):
            chunk = uids[i : i + 500]
            session.exec(
                delete(StudyLocation).where(  # type: ignore[call-overload]
                    col(StudyLocation.facility_id) == facility.id, col(StudyLocation.study_uid).in_(chunk)
                )
            )
            # The index rows go too, unless the broker holds the pixels or another facility the study.
            held_elsewhere = set(
                session.exec(select(StudyLocation.study_uid).where(col(StudyLocation.study_uid).in_(chunk)))
            )
            study_pks = [
                pk
                for pk, uid in session.exec(
                    select(Study.pk, Study.study_uid).where(
                        col(Study.study_uid).in_(chunk), Study.facility_id == facility.id
                    )
                )
                if uid not in held_elsewhere
            ]
            if not study_pks:
                continue
            with_pixels = set(
                session.exec(
                    select(Instance.study_pk).where(col(Instance.study_pk).in_(study_pks)).distinct()
                )
            )
            doomed = [pk for pk in study_pks if pk not in with_pixels]
            if doomed:
                session.exec(delete(Series).where(col(Series.study_pk).in_(doomed)))  # type: ignore[call-overload]
                session.exec(delete(Study).where(col(Study.pk).in_(doomed)))  # type: ignore[call-overload]
    return len(uids)


def remote_only_count(*, session: Session, facility_id: str) -> int:
    return int(
        session.exec(
            select(func.count())
            .select_from(StudyLocation)
            .where(StudyLocation.facility_id == facility_id, col(StudyLocation.has_pixels).is_(False))
        ).one()
    )
