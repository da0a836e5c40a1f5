"""Import of an outside study into a facility's archive with that facility's identifiers.

`start_import` validates everything it can before anything is stored (the study is indexed, the
destination is registered and has an endpoint, the destination has a record of the person, the
destination can be asked whether it holds the study), decides the reconciliation once for the
whole study (`reconcile.Plan`) and queues a durable job. The job fetches the study if the broker
only indexes it (federation's remote retrieve), then coerces and sends instance by instance in
small batches, two at a time on connections kept for the whole run, recording each instance's
outcome batch by batch: a job reclaimed after a restart sends only what is still pending. It
ends by asking the destination what arrived.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import bindparam, insert, update
from sqlalchemy import select as select_columns
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, col, select

from broker.consent import service as consent
from broker.db import Prepared as Statement
from broker.db import session_scope
from broker.errors import BadRequest, NotFound, Unavailable
from broker.facilities import service as facilities
from broker.facilities.models import Facility
from broker.identity import service as identity
from broker.identity.schemas import Identifier
from broker.imports import delivery, reconcile
from broker.imports.models import ImportDestination, ImportInstance, ImportJob
from broker.index import service as index
from broker.jobs import service as jobs
from broker.jobs.models import Job
from broker.security.schemas import Principal
from broker.security.service import authorize
from storage import StoreUnavailable

log = logging.getLogger("scanonce.imports")

IMPORT_JOB = "import"
_T = TypeVar("_T")
# A batch sent: (row, its outcome) and the rows whose source could not be read (why).
Sent_ = tuple[list[tuple["_Pending", delivery.Outcome]], list[tuple["_Pending", str]]]
# The same, each instance named by its source SOP Instance UID (a batch may be sent before its
# rows are read: see `_run`).
Shipped_ = tuple[list[tuple[str, delivery.Outcome]], list[tuple[str, str]]]
# A batch coerced: for each instance, what to send, or None and why its source could not be read.
Coerced_ = list[tuple[delivery.File | None, str]]
ACCESSION_POLICIES = ("empty", "keep", "new")
_ACTIVE = ("queued", "running")  # an import's statuses while its job may still run it
# Instances per association / STOW-RS request: few round trips, little lost on a crash. (Profiled:
# about a third of the C-STORE time is opening one association per batch; 64 did not measure
# faster than 16 on the loaded bench machine, so 16 stays. `bench/imports.py --batch N` tries it.)
BATCH = 16
# Instances in a run's first batch (at most BATCH): its coercion is the last step before the first
# request leaves, where the plain client's first request leaves at once.
FIRST_BATCH = 4
# Batches sent at once, each on its own association / HTTP connection. An archive stores one
# instance at a time per association (Orthanc: write the file, index it) and spends most of a
# C-STORE's time there; with two, one connection is busy on the wire and in our coercion while
# the archive stores on the other. Measured (bench/imports.py, Orthanc 1.10.1): the C-STORE
# transport alone, 1 association 0.81-0.90x storescu, 2 associations 1.6-1.9x. Two is modest
# for an archive (dcm4chee and Orthanc accept several per AE by default).
SENDERS = 2
# Longest a coercion or a record waits for no request body to be in writing (`_Writing`): about
# one body of 16 CT slices on loopback (8 MB, 5-20 ms measured), so it only ever defers them.
QUIET_WAIT = 0.03
RETRIES = 4  # attempts per batch when the destination cannot be reached
BACKOFF = 0.5  # seconds before the first retry, doubled each time


def register_jobs() -> None:
    jobs.register(IMPORT_JOB, on_failed=_job_failed)(_import_job)


def _job_failed(conn: Connection, params: dict[str, Any], error: str) -> None:
    """The import's job failed for good (its worker died on every attempt, an error no retry
    changes): the import ends failed with it, in the same transaction, rather than staying
    active and keeping the study from being imported again. An import that already ended (its
    own verification failed it) keeps its own message."""
    conn.execute(
        update(ImportJob)
        .where(col(ImportJob.id) == int(params.get("import_id") or 0), col(ImportJob.status).in_(_ACTIVE))
        .values(status="failed", message=_given_up(error), finished_at=datetime.now(UTC))
    )


def _given_up(error: str) -> str:
    return f"its job failed: {error}; nothing more is sent (start a new import to retry)"


class Fetcher(Protocol):
    """Brings a study the broker only indexes into its storage (federation's remote retrieve,
    a package of the same layer: `app` wires it in)."""

    def __call__(self, *, engine: Engine, store: Any, study_uid: str, calling_ae: str) -> None: ...


_fetcher: Fetcher | None = None


def set_fetcher(fetcher: Fetcher) -> None:
    global _fetcher
    _fetcher = fetcher


# -- planning (once per study) ---------------------------------------------------------------


@dataclass(slots=True)
class Prepared:
    plan: reconcile.Plan
    source_facility: str
    destination: Facility
    via: str
    remote_only: bool
    # The destination held no study of this UID when planning asked (its study-level query).
    unheld: bool = False


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """Where a facility's archive answers, copied out of its row for another thread (an ORM
    object is its session's, which this thread goes on using)."""

    id: str
    dicomweb_url: str | None
    ae_title: str | None
    host: str | None
    port: int | None


def _has_endpoint(facility: Facility, via: str) -> bool:
    try:
        delivery.via_of(facility, via)
    except Unavailable:
        return False
    return True


def _destination_record(session: Session, *, view: Any, destination: Facility, patient: str) -> Any:
    """The destination's own record of the study's person (identity service), or of `patient`."""
    if patient:
        rec = identity.get_record(session=session, issuer=destination.issuer, value=patient)
        if rec is None:
            raise BadRequest(
                f"facility {destination.id!r} has no patient record {patient!r} known to the broker: "
                "nothing was imported (register the patient there first)"
            )
        return rec
    person = view.person_id or identity.person_of(
        session=session, identifier=Identifier(issuer=view.issuer, value=view.patient_id)
    )
    if person is not None:
        for ident in identity.person_identifiers(session=session, person_id=person):
            if ident.issuer == destination.issuer:
                rec = identity.get_record(session=session, issuer=ident.issuer, value=ident.value)
                if rec is not None and rec.merged_into is None:
                    return rec
    raise BadRequest(
        f"facility {destination.id!r} has no record of this study's patient: nothing was imported "
        "(give the local patient identifier explicitly, or link the patient first)"
    )


def _name(rec: Any) -> str:
    return "^".join((rec.family, rec.given, rec.middle)).rstrip("^")


def prepare(
    *,
    engine: Engine,
    principal: Principal,
    study_uid: str,
    facility_id: str,
    patient: str = "",
    accession_policy: str = "keep",
    via: str = "",
    calling_ae: str = "SCANONCE",
) -> Prepared:
    """Everything decided before anything is stored; raises BadRequest/NotFound/Unavailable."""
    if accession_policy not in ACCESSION_POLICIES:
        raise BadRequest(f"accession policy must be one of {', '.join(ACCESSION_POLICIES)}")
    if via not in ("", "dimse", "dicomweb"):
        raise BadRequest("via must be dimse or dicomweb (or empty: as the facility is registered)")
    authorize(principal, action="imports.write", facility=facility_id)
    # Whether the destination holds the study UID (and for whom) is asked first, while the rest
    # is read here (it was the longest step of planning, after the reads): its answer (or its
    # 503) counts only once everything here has passed, and a refusal here does not wait for it
    # (nor changes: an unknown destination, or one without the endpoint, is not asked, and is
    # refused in the order of the checks below).
    asking = ThreadPoolExecutor(1, thread_name_prefix="import-plan")
    try:
        with Session(engine) as session:
            holders: Future[set[tuple[str, str]]] | None = None
            early = session.get(Facility, facility_id)
            if early is not None and _has_endpoint(early, via):
                holders = asking.submit(
                    delivery.study_patients,
                    facility=_Endpoint(early.id, early.dicomweb_url, early.ae_title, early.host, early.port),
                    via=delivery.via_of(early, via),
                    study_uid=study_uid,
                    calling_ae=calling_ae,
                )
            views = index.studies_by_uid(session=session, study_uids=[study_uid])
            # A study the caller may not see (the person's consent, purpose of use) is refused as one
            # the index does not hold: the refusal does not reveal that it exists.
            views, _withheld = consent.filter_studies(session=session, principal=principal, studies=views)
            if not views:
                raise NotFound(f"no study {study_uid} in the broker's index")
            view = views[0]
            destination = facilities.get_facility(session=session, facility_id=facility_id)
            if destination.id == view.facility_id:
                raise BadRequest(f"the study already comes from facility {facility_id!r}")
            how = delivery.via_of(destination, via)
            session.expunge(destination)
            if holders is None:
                holders = asking.submit(
                    delivery.study_patients,
                    facility=destination,
                    via=how,
                    study_uid=study_uid,
                    calling_ae=calling_ae,
                )
            rec = _destination_record(session, view=view, destination=destination, patient=patient)
            remote_only = index.is_remote_only(session=session, study_uid=study_uid)
            config = destination_config(session=session, facility_id=destination.id)
            held = holders.result()
    finally:
        asking.shutdown(wait=False)
    target = {
        "PatientID": rec.value,
        "IssuerOfPatientID": destination.issuer,
        "PatientName": _name(rec),
        "PatientBirthDate": rec.birth_date,
        "PatientSex": rec.sex,
    }
    # The study's UIDs stay unless the destination holds the study UID for someone else.
    rename = any(pid != rec.value for pid, _ in held)
    accession: str | None = None
    if accession_policy == "empty":
        accession = ""
    elif accession_policy == "new":
        accession = reconcile.new_accession(destination=destination.id, study_uid=study_uid)
    plan = reconcile.Plan(
        destination=destination.id,
        source_issuer=view.issuer,
        source_patient_id=view.patient_id,
        patient=target,
        accession_policy=accession_policy,
        accession=accession,
        rename_uids=rename,
        study_uid=reconcile.new_uid(destination=destination.id, uid=study_uid) if rename else study_uid,
        study_id_policy=config.study_id_policy,
        institution=json.loads(config.institution or "{}"),
    )
    return Prepared(plan, view.facility_id, destination, how, remote_only, unheld=not held)


def dry_run(
    *, engine: Engine, store: Any, prepared: Prepared, study_uid: str, limit: int = 1000
) -> list[dict[str, Any]]:
    """Each instance's diff as it would be sent, from the headers the broker holds (nothing
    is sent, nothing stored). A study only indexed here shows the study-level plan only."""
    if prepared.remote_only:
        return []
    with Session(engine) as session:
        refs = index.find_instances(session=session, study_uid=study_uid)
    plan = prepared.plan
    plan.known_uids = _known_uids(refs, study_uid)
    out: list[dict[str, Any]] = []
    for ref in refs[:limit]:
        try:
            diff = reconcile.apply(_read(store, ref.object_key, headers_only=True), plan)
        except StoreUnavailable:
            raise  # the store away is a 503 for the whole dry run, not this instance's fault
        except Exception as exc:
            # As the import would: this instance fails alone, named by its UID; the error's type
            # only, as its text may quote the file's values (patient data).
            why = f"cannot be read or coerced: {type(exc).__name__}"
            out.append({"sop_uid": ref.sop_uid, "changes": [], "error": why})
            continue
        out.append({
            "sop_uid": ref.sop_uid,
            "changes": [{"attribute": k, "before": b, "after": a} for k, b, a in diff],
            "error": "",
        })  # fmt: skip
    return out


def _known_uids(refs: list[Any], study_uid: str) -> list[str]:
    return [study_uid, *{r.series_uid for r in refs}, *(r.sop_uid for r in refs)]


def _read(store: Any, key: str, *, headers_only: bool = False) -> Dataset:
    local = store.open_local(key)
    if local is not None:
        return dcmread(local, stop_before_pixels=headers_only)
    with tempfile.TemporaryFile() as tmp:
        for chunk in store.get(key):
            tmp.write(chunk)
        tmp.seek(0)
        return dcmread(tmp, stop_before_pixels=headers_only)


def _spliced(store: Any, key: str, coercer: reconcile.Coercer) -> delivery.Spliced | None:
    """The stored object `key` coerced as a splice of its own file (None: not a local file, or
    not one the splice applies to)."""
    local = store.open_local(key)
    if local is None:
        return None
    with open(local, "rb") as src:
        parts = coercer.splice(src)
    return delivery.Spliced(local, tuple(parts)) if parts is not None else None


def _coerce(store: Any, key: str, path: str, coercer: reconcile.Coercer) -> None:
    """The stored object `key`, coerced, written to `path`."""
    with open(path, "wb") as out:
        local = store.open_local(key)
        if local is not None:
            with open(local, "rb") as src:
                coercer.coerce_file(src, out)
            return
        with tempfile.TemporaryFile() as tmp:
            for chunk in store.get(key):
                tmp.write(chunk)
            tmp.seek(0)
            coercer.coerce_file(tmp, out)


# -- the destination's configuration (StudyID, institution) ----------------------------------------


def destination_config(*, session: Session, facility_id: str) -> ImportDestination:
    """The import configuration of a destination (a default one, not stored, when none is)."""
    return session.get(ImportDestination, facility_id) or ImportDestination(facility_id=facility_id)


def configure_destination(
    *,
    engine: Engine,
    principal: Principal,
    facility_id: str,
    study_id_policy: str,
    institution: dict[str, str | None],
) -> ImportDestination:
    """Set how studies imported into `facility_id` get StudyID and the institution attributes.
    `institution` maps a keyword to the value to set ("" empties it) or None to keep it."""
    if study_id_policy not in reconcile.STUDY_ID_POLICIES:
        raise BadRequest(f"StudyID policy must be one of {', '.join(reconcile.STUDY_ID_POLICIES)}")
    unknown = sorted(set(institution) - set(reconcile.INSTITUTION_KEYWORDS))
    if unknown:
        raise BadRequest(
            f"unknown institution attribute {unknown[0]!r}: "
            f"one of {', '.join(reconcile.INSTITUTION_KEYWORDS)}"
        )
    # InstitutionName and InstitutionalDepartmentName are LO (64), InstitutionAddress ST (1024).
    for keyword, value in institution.items():
        limit = 1024 if keyword == "InstitutionAddress" else 64
        if value is not None and (len(value) > limit or "\\" in value):
            raise BadRequest(f"{keyword} must be at most {limit} characters, without a backslash")
    authorize(principal, action="admin", facility=facility_id)
    with session_scope(engine) as session:
        facilities.get_facility(session=session, facility_id=facility_id)  # NotFound first
        row = session.get(ImportDestination, facility_id) or ImportDestination(facility_id=facility_id)
        row.study_id_policy = study_id_policy
        row.institution = json.dumps({k: v for k, v in sorted(institution.items()) if v is not None})
        row.updated_by = principal.who
        row.updated_at = datetime.now(UTC)
        session.add(row)
        session.flush()
        session.expunge(row)
    return row


# -- the import job ------------------------------------------------------------------------------


def retry_times(*, session: Session, rows: Iterable[ImportJob]) -> dict[int, datetime]:
    """Import id -> when its job, queued again after a transient failure, next runs (active
    imports whose job waits for its backoff only)."""
    waiting = {
        r.job_id: r.id for r in rows if r.status in _ACTIVE and r.job_id is not None and r.id is not None
    }
    times = jobs.retry_times(session=session, job_ids=waiting)
    return {waiting[job_id]: at for job_id, at in times.items()}


def start_import(
    *,
    engine: Engine,
    principal: Principal,
    study_uid: str,
    facility_id: str,
    patient: str = "",
    accession_policy: str = "keep",
    via: str = "",
    calling_ae: str = "SCANONCE",
) -> ImportJob:
    """Queue the import (all checks first: bad input stores nothing). The same study to the
    same facility while an import of it is active returns that import."""
    row, _ = _start(
        engine=engine, principal=principal, study_uid=study_uid, facility_id=facility_id,
        patient=patient, accession_policy=accession_policy, via=via, calling_ae=calling_ae, owner="",
    )  # fmt: skip
    return row


def start_claimed(
    *,
    engine: Engine,
    principal: Principal,
    study_uid: str,
    facility_id: str,
    patient: str = "",
    accession_policy: str = "keep",
    via: str = "",
    calling_ae: str = "SCANONCE",
) -> tuple[ImportJob, Job | None]:
    """`start_import` for a run in this process at once (`scanonce import`): the import's job is
    created already claimed by this process, in the transaction that queues the import, and
    returned for `run_claimed`. Measured: the separate claim (the import's id read back, the
    claim's own commit) was 7-13 ms of the 25-35 ms before the first batch was sent. An import of
    the study already active is returned with its job claimed as `run_now` claims it (None:
    another worker holds it)."""
    row, job = _start(
        engine=engine, principal=principal, study_uid=study_uid, facility_id=facility_id,
        patient=patient, accession_policy=accession_policy, via=via, calling_ae=calling_ae,
        owner=jobs.default_owner(),
    )  # fmt: skip
    if job is None and row.job_id is not None:  # an active import: claimed as run_now would
        job = jobs.claim(engine=engine, job_id=row.job_id)
    return row, job


def _start(
    *, engine: Engine, principal: Principal, study_uid: str, facility_id: str, patient: str,
    accession_policy: str, via: str, calling_ae: str, owner: str,
) -> tuple[ImportJob, Job | None]:  # fmt: skip
    """The import queued (its job claimed by `owner` if one is given) and its new job; an active
    import of the same study to the same facility instead, and None."""
    prepared = prepare(
        engine=engine, principal=principal, study_uid=study_uid, facility_id=facility_id,
        patient=patient, accession_policy=accession_policy, via=via, calling_ae=calling_ae,
    )  # fmt: skip
    with session_scope(engine) as session:
        for active in session.exec(
            select(ImportJob).where(
                ImportJob.study_uid == study_uid,
                ImportJob.facility_id == facility_id,
                col(ImportJob.status).in_(_ACTIVE),
            )
        ).all():
            job = session.get(Job, active.job_id) if active.job_id is not None else None
            if job is not None and job.status not in jobs.FINISHED:
                session.expunge(active)
                return active, None
            # Its job ended without the import being told (a row left by an earlier version, or
            # a job gone): nothing will run it any more, so it no longer blocks the study.
            ended = f"{job.status}{': ' + job.error if job.error else ''}" if job is not None else "gone"
            active.status, active.message = "failed", _given_up(f"it ended ({ended})")
            active.finished_at = datetime.now(UTC)
            session.add(active)
        row = ImportJob(
            study_uid=study_uid,
            facility_id=facility_id,
            source_facility_id=prepared.source_facility,
            patient=patient,
            accession_policy=accession_policy,
            via=prepared.via,
            plan=json.dumps(prepared.plan.to_json()),
            created_by=principal.who,
        )
        session.add(row)
        session.flush()
        assert row.id is not None
        # The import and its job in one transaction: never an import without its job, and one
        # commit (each is a disk flush) where there were three.
        params: dict[str, Any] = {"import_id": row.id, "calling_ae": calling_ae}
        if owner and prepared.unheld:
            # Run at once by this process: its first attempt takes planning's answer (the
            # destination holds nothing of the study) for the run's own question, which it asks
            # before the first batch leaves. A later attempt (after a crash) asks again.
            params["unheld"] = True
        job = jobs.enqueue_in(session, kind=IMPORT_JOB, key=str(row.id), params=params, owner=owner)
        row.job_id = job.id
        session.flush()
        session.expunge(row)
        session.expunge(job)
    return row, job


def get_import(*, session: Session, import_id: int) -> ImportJob:
    row = session.get(ImportJob, import_id)
    if row is None:
        raise NotFound(f"no import {import_id}")
    return row


def list_imports(*, session: Session, limit: int = 100) -> list[ImportJob]:
    return list(session.exec(select(ImportJob).order_by(col(ImportJob.id).desc()).limit(limit)))


def instances_of(*, session: Session, import_id: int) -> list[ImportInstance]:
    return list(
        session.exec(
            select(ImportInstance)
            .where(ImportInstance.import_id == import_id)
            .order_by(col(ImportInstance.id))
        )
    )


def cancel_import(*, engine: Engine, principal: Principal, import_id: int) -> ImportJob:
    """Stop an import: a queued one never starts; a running one starts no new batch (those in
    flight finish and are recorded)."""
    with session_scope(engine) as session:
        row = get_import(session=session, import_id=import_id)
        authorize(principal, action="imports.write", facility=row.facility_id)
        if row.status in ("done", "failed", "cancelled"):
            raise BadRequest(f"import {import_id} has already finished ({row.status})")
        row.cancel_requested = True
        if row.status == "queued":
            row.status = "cancelled"
            row.message = "cancelled before it started"
            row.finished_at = datetime.now(UTC)
        job_id, status = row.job_id, row.status
        session.flush()
        session.expunge(row)
    if status == "cancelled" and job_id is not None:
        with Session(engine) as session:
            job = session.get(Job, job_id)
            queued = job is not None and job.status == "queued"
        if queued:
            jobs.finish(engine=engine, job_id=job_id, message="cancelled")
    return row


def run_now(
    *,
    engine: Engine,
    store: Any,
    import_id: int,
    listener: Callable[[int, int | None, str], None] | None = None,
) -> ImportJob:
    """Run a queued import in this process (the CLI's foreground run, with a progress bar)."""
    with Session(engine) as session:
        job_id = get_import(session=session, import_id=import_id).job_id
    job = jobs.claim(engine=engine, job_id=job_id) if job_id is not None else None
    return run_claimed(engine=engine, store=store, import_id=import_id, job=job, listener=listener)


def run_claimed(
    *,
    engine: Engine,
    store: Any,
    import_id: int,
    job: Job | None,
    listener: Callable[[int, int | None, str], None] | None = None,
) -> ImportJob:
    """Run an import whose job this process claimed (`start_claimed`; None: not claimed here,
    nothing is run) and return the import as it ended."""
    if job is not None:
        jobs.run_claimed(engine=engine, store=store, job=job, listener=listener)
    with Session(engine, expire_on_commit=False) as session:
        return get_import(session=session, import_id=import_id)


def _set(engine: Engine, import_id: int, **values: Any) -> None:
    with session_scope(engine) as session:
        session.execute(update(ImportJob).where(col(ImportJob.id) == import_id).values(**values))


def _import_job(engine: Engine, store: Any, job: Job, progress: jobs.Progress) -> None:
    params = jobs.params_of(job)
    import_id = int(params["import_id"])
    calling_ae = str(params.get("calling_ae") or "SCANONCE")
    with Session(engine) as session:
        row = get_import(session=session, import_id=import_id)
        if row.status in ("cancelled", "done"):
            return
        if row.status == "failed":
            # A failed import stays failed: its job run again (queued by hand, or by an earlier
            # version's retry) must not resume it; a new import is the way to retry.
            raise jobs.GiveUp(f"import {import_id} has already ended failed: {row.message}")
        destination = facilities.get_facility(session=session, facility_id=row.facility_id)
        session.expunge(destination)
        plan_data, study_uid, via = json.loads(row.plan), row.study_uid, row.via
    # Planning, a moment ago in this process, found the destination holding nothing of the study.
    unheld = bool(params.get("unheld")) and job.attempts == 1
    # `running` is recorded with the instance rows (`_rows_to_send`): one commit fewer before the
    # first batch is sent; a study first fetched from its facility is `running` meanwhile.
    # The import is not failed here on an error: the job runner decides whether the job is
    # tried again (a transient failure with attempts left: the import stays running, to be
    # resumed) or fails for good, which fails the import with it (`_job_failed`). Failing it
    # here and resuming it later made a failed import change state afterwards.
    try:
        _run(
            engine, store, import_id, study_uid, plan_data, destination, via, calling_ae, progress,
            unheld=unheld,
        )  # fmt: skip
    except jobs.TRANSIENT as exc:
        why = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        # Best effort (the database may be what failed): the job's own error says it anyway.
        with contextlib.suppress(Exception), session_scope(engine) as session:
            session.execute(
                update(ImportJob)
                .where(col(ImportJob.id) == import_id, col(ImportJob.status).in_(_ACTIVE))
                .values(message=f"interrupted, to be resumed unless its job gives up: {why}"[:512])
            )
        raise


def _run(
    engine: Engine, store: Any, import_id: int, study_uid: str, plan_data: dict[str, Any],
    destination: Facility, via: str, calling_ae: str, progress: jobs.Progress, *, unheld: bool = False,
) -> None:  # fmt: skip
    # Whether the destination holds nothing of the study yet, asked while the study's instances
    # are read and their rows written; the first batch is sent only once it is answered, so the
    # answer is about the destination before this run sent anything. `unheld`: planning's answer,
    # just before this run in the same process, is that (no query, none waited for).
    with ThreadPoolExecutor(1, thread_name_prefix="import-ask") as asking:
        holds_nothing: Future[bool]
        if unheld:
            holds_nothing = Future()
            holds_nothing.set_result(True)
        else:
            holds_nothing = asking.submit(
                _holds_nothing, destination, via, str(plan_data["study_uid"]), calling_ae
            )
        with Session(engine) as session:
            remote = index.is_remote_only(session=session, study_uid=study_uid)
            refs = [] if remote else index.find_instances(session=session, study_uid=study_uid)
        if remote:
            _set(engine, import_id, status="running", message="")
            progress.update(message="fetching the study from its facility")
            if _fetcher is None:
                raise Unavailable(
                    "the study is held only at its facility and no remote retrieve is configured"
                )
            _fetcher(engine=engine, store=store, study_uid=study_uid, calling_ae=calling_ae)
            with Session(engine) as session:
                refs = index.find_instances(session=session, study_uid=study_uid)
        if not refs:
            raise NotFound(f"the broker holds no instance of study {study_uid}")
        plan = reconcile.Plan.from_json(plan_data, _known_uids(refs, study_uid))
        coercer = reconcile.Coercer(plan)
        by_sop = {r.sop_uid: r for r in refs}
        total = len(by_sop)

        def delivered(uid: str) -> str:
            return reconcile.new_uid(destination=plan.destination, uid=uid) if plan.rename_uids else uid

        series_of = {delivered(r.sop_uid): delivered(r.series_uid) for r in refs}
        names = itertools.count()
        with (
            tempfile.TemporaryDirectory(prefix="scanonce-import-") as tmp,
            _Senders(destination, via, calling_ae) as senders,
            ThreadPoolExecutor(1, thread_name_prefix="import-coerce") as coercing,
            ThreadPoolExecutor(SENDERS, thread_name_prefix="import-send") as pool,
            ThreadPoolExecutor(1, thread_name_prefix="import-record") as recorder,
        ):

            def coerce(sources: list[str]) -> list[tuple[delivery.File | None, str]]:
                """Each source instance coerced: (what to send, "") or (None, why it cannot be)."""
                writing.wait_quiet()
                out: list[tuple[delivery.File | None, str]] = []
                for source in sources:
                    key = by_sop[source].object_key
                    path = os.path.join(tmp, f"{next(names)}.dcm")
                    try:
                        # STOW-RS streams a spliced instance from its stored file: nothing written.
                        spliced = _spliced(store, key, coercer) if via == "dicomweb" else None
                        if spliced is None:
                            _coerce(store, key, path, coercer)
                    except StoreUnavailable:
                        # The broker's store is down, not this instance unreadable: the run ends
                        # here and its job is tried again later (the instances still pending are
                        # sent then), rather than every instance failing as if refused.
                        raise
                    except Exception as exc:  # one unreadable instance fails alone, named in its row
                        out.append((None, f"cannot be read or coerced: {type(exc).__name__}"))
                        continue
                    out.append((spliced or path, ""))
                return out

            def send(sources: list[str], coerced: Future[Coerced_]) -> Shipped_:
                files: list[tuple[delivery.File, str]] = []
                unreadable = []
                for source, (file, why) in zip(sources, coerced.result(), strict=True):
                    if file is None:
                        unreadable.append((source, why))
                    else:
                        files.append((file, source))
                # In writing from here (its batch is coerced): until its body is written.
                written = writing.start() if via == "dicomweb" and files else None
                try:
                    outcomes = (
                        _send_with_retries(senders.mine(), [(f, delivered(s)) for f, s in files], written)
                        if files
                        else []
                    )
                finally:
                    if written is not None:
                        written()  # a body never written in full (a failure) ends here
                    _unlink(f for f, _ in files)
                return [(s, o) for (_, s), o in zip(files, outcomes, strict=True)], unreadable

            # The instance rows: every row by its source SOP Instance UID once they are read (and
            # written, for a first run), and the progress from which the records count.
            row_of: dict[str, _Pending] = {}
            statuses: dict[int, tuple[str, str]] = {}
            done = 0
            cancelled = False

            def rows() -> list[_Pending]:
                nonlocal done, cancelled
                pending, every, cancelled = _rows_to_send(engine, import_id, refs, delivered, progress)
                row_of.update((r.source_sop_uid, r) for r in every)
                statuses.update((r.id, (r.sop_uid, r.status)) for r in every)
                done = total - len(pending)
                progress.notify()
                return pending

            # SENDERS threads each send batch after batch on its own connection, and one more
            # coerces up to SENDERS batches ahead, so that a connection has its next batch ready
            # (the archive is kept as busy as by a plain client at that concurrency). A batch is
            # recorded by one more thread, in the order they finish, while its connection already
            # sends the next one (a connection waiting for its batch's record, 5-40 ms, was idle
            # each batch). A batch is taken only with one of SENDERS + 1 slots, freed when its
            # record commits: at most SENDERS + 1 batches are ever sent and not recorded, what a
            # crash may send again. At most 2 x SENDERS batches of files on disk, none in memory.
            # A cancel (read with each record) stops new batches; those in flight finish and are
            # recorded. After any failure nothing more is recorded, as after a crash.
            #
            # By STOW-RS a coercion or a record waits (bounded) for no request body to be in
            # writing (`_Writing`): it then runs while the archive stores what it was sent.
            #
            # A run that has recorded nothing yet (a first run, as a rule: the job's progress is
            # committed with each record) has every instance to send, in the order of `refs`: it
            # starts sending without waiting for its instance rows to be written, which is the
            # recording thread's first task, so every record comes after it (a crash before it
            # commits leaves no row, and the next run sends the study again: within the bound
            # above, as no batch is recorded). A resumed run reads its rows first and sends
            # those still pending or failed.
            slots = threading.Semaphore(SENDERS + 1)
            writing = _Writing()
            lock = threading.Lock()
            stop = threading.Event()
            failures: list[BaseException] = []

            def guarded(task: Callable[[], object], *, release: bool = False) -> None:
                """A recording thread task: after a failure nothing more is recorded. `release`:
                the task frees a slot, whether it ran or not."""
                try:
                    if not stop.is_set():
                        task()
                    elif release:
                        slots.release()
                except BaseException as exc:
                    failures.append(exc)
                    stop.set()

            if progress.done == 0:
                order = list(by_sop)

                def first_rows() -> None:
                    """The rows, once the first body is written: their CPU slowed the first
                    batch's coercion, the last step before the first request."""
                    if via == "dicomweb":
                        writing.wait_first()
                    rows()

                recorder.submit(guarded, first_rows)
            else:
                order = [r.source_sop_uid for r in rows()]
            ahead: deque[tuple[list[str], Future[Coerced_]]] = deque()
            batches = _batches(order, BATCH, min(FIRST_BATCH, BATCH))
            # Each connection's last batch, once no batch is left to take: recorded with the
            # verification, in its transaction (the import's last commits were the records of the
            # last batches, then the verification's), keeping its slot until then.
            final: list[Shipped_] = []
            exhausted = False

            def top_up() -> None:
                nonlocal exhausted
                while len(ahead) < SENDERS:
                    batch = next(batches, None)
                    if batch is None:
                        exhausted = True
                        return
                    ahead.append((batch, coercing.submit(coerce, batch)))

            def rows_of(shipped: Shipped_) -> Sent_:
                return [(row_of[s], o) for s, o in shipped[0]], [(row_of[s], why) for s, why in shipped[1]]

            def remember(sent: Sent_) -> None:
                for inst, o in sent[0]:
                    statuses[inst.id] = (inst.sop_uid, o.status)
                for inst, _ in sent[1]:
                    statuses[inst.id] = (inst.sop_uid, "failed")

            def record(shipped: Shipped_) -> None:
                nonlocal done, cancelled
                try:
                    writing.wait_quiet()
                    sent = rows_of(shipped)
                    n = len(sent[0]) + len(sent[1])
                    cancel = _record(engine, *sent, progress=progress, done=done + n)
                    done += n
                    cancelled = cancelled or cancel
                    remember(sent)
                    progress.notify()
                finally:
                    slots.release()  # skipped after a failure too: a sending loop may wait for it

            def sending() -> None:
                while True:
                    if not slots.acquire(blocking=False):
                        with writing.waited_for():  # a record may not wait for quiet now
                            slots.acquire()
                    with lock:
                        if stop.is_set() or cancelled or not ahead:
                            slots.release()
                            return
                        batch, coerced = ahead.popleft()
                        top_up()
                    try:
                        shipped = send(batch, coerced)
                    except BaseException as exc:
                        failures.append(exc)
                        stop.set()
                        slots.release()
                        return
                    with lock:
                        if exhausted and not ahead:  # nothing left to take: this loop is done
                            final.append(shipped)
                            return
                    recorder.submit(guarded, functools.partial(record, shipped), release=True)

            with lock:
                top_up()
            fresh = holds_nothing.result()
            loops = [pool.submit(sending) for _ in range(SENDERS)]
            try:
                for loop in loops:
                    loop.result()
                # Every batch is answered: what the destination holds is asked while the last
                # records commit (it does not depend on them).
                counts = (
                    asking.submit(
                        delivery.series_counts,
                        facility=destination,
                        via=via,
                        study_uid=plan.study_uid,
                        calling_ae=calling_ae,
                    )  # fmt: skip
                    if fresh and not stop.is_set()
                    else None
                )
                recorder.shutdown(wait=True)
            except BaseException:
                stop.set()
                raise
            finally:
                for _, future in ahead:
                    _drop(future)
            if failures:
                raise failures[0]
            if cancelled:
                for shipped in final:  # what was on the wire when the cancel was read
                    sent = rows_of(shipped)
                    n = len(sent[0]) + len(sent[1])
                    _record(engine, *sent, progress=progress, done=done + n)
                    done += n
                _finish(engine, import_id, status="cancelled", message="cancelled")
                progress.update(message="cancelled")
                return
            last = [rows_of(shipped) for shipped in final]
            for sent in last:
                remember(sent)
            ended_failed, message = _verify(
                engine, import_id, plan, destination, via, calling_ae, statuses=statuses, counts=counts,
                series_of=series_of, progress=progress, final=last,
            )  # fmt: skip
        progress.notify()
        if ended_failed:
            # Final (the import is recorded failed): the job fails with the same message, not
            # queued again to resend and change what was reported.
            raise jobs.GiveUp(message)


def _unlink(files: Iterable[delivery.File | None]) -> None:
    for file in files:
        if isinstance(file, str):
            os.unlink(file)


def _drop(coerced: Future[Coerced_]) -> None:
    """A batch coerced but not to be sent: its temporary files removed."""
    if not coerced.cancel():
        # A file already gone, or a batch that failed whole: the directory goes with the run.
        with contextlib.suppress(Exception):
            _unlink(f for f, _ in coerced.result())


@dataclass(frozen=True, slots=True)
class _Pending:
    """An instance row to send, as the run needs it (read as plain columns: loading the ORM
    objects of a study's rows cost more than the statement)."""

    id: int
    import_id: int
    source_sop_uid: str
    sop_uid: str
    attempts: int
    status: str  # pending, or failed in an earlier run


def _rows_to_send(
    engine: Engine, import_id: int, refs: list[Any], delivered: Callable[[str], str], progress: jobs.Progress
) -> tuple[list[_Pending], list[_Pending], bool]:
    """The import's instance rows still to send (pending, or failed in an earlier run), each
    instance's row written first if it has none yet, with the total and the progress report, in
    one transaction; every row (the run keeps their statuses up to date as it records, and the
    verification reads them there, not from the database); and whether a cancel was asked."""
    columns = (
        select_columns(
            col(ImportInstance.id), col(ImportInstance.source_sop_uid), col(ImportInstance.sop_uid),
            col(ImportInstance.status), col(ImportInstance.attempts),
        )
        .where(col(ImportInstance.import_id) == import_id)
        .order_by(col(ImportInstance.id))
    )  # fmt: skip
    with session_scope(engine) as session:
        rows = session.execute(columns).all()
        have = {r.source_sop_uid for r in rows}
        now = datetime.now(UTC)
        new = [
            {"import_id": import_id, "source_sop_uid": r.sop_uid, "sop_uid": delivered(r.sop_uid),
             "status": "pending", "code": None, "detail": "", "attempts": 0, "updated_at": now}
            for r in refs
            if r.sop_uid not in have
        ]  # fmt: skip
        if new:  # one executemany, not an ORM object per instance
            session.execute(insert(_ROWS), new)
            rows = session.execute(columns).all()
        total = len({r.sop_uid for r in refs})
        cancelled = session.execute(
            update(ImportJob)
            .where(col(ImportJob.id) == import_id)
            .values(total=total, status="running", message="")
            .returning(col(ImportJob.cancel_requested))
        ).scalar_one()
        every = [_Pending(r.id, import_id, r.source_sop_uid, r.sop_uid, r.attempts, r.status) for r in rows]
        pending = [r for r in every if r.status in ("pending", "failed")]
        progress.update_in(session, done=total - len(pending), total=total, message="sending")
    return pending, every, bool(cancelled)


@dataclass(frozen=True, slots=True)
class _Status:
    id: int
    sop_uid: str
    status: str


class _Writing:
    """The run's STOW-RS requests writing their body now. Coercing and recording are Python
    holding the GIL: run beside a request's writes they made each write wait for the GIL (a
    timeline of each request, see docs/imports.md), so they wait, at most `QUIET_WAIT`, until no
    body is being written (while the archive stores what it was sent). A record does not wait
    while a connection waits for the slot it frees."""

    def __init__(self) -> None:
        self._n = self._written = self._waiting = 0
        self._changed = threading.Condition()

    def start(self) -> Callable[[], None]:
        """A request starts writing; returns what ends it (idempotent: `delivery.Sender.send`
        calls it when the body is written, the caller again after the request, in case not)."""
        with self._changed:
            self._n += 1
        ended = False

        def end() -> None:
            nonlocal ended
            with self._changed:
                if not ended:
                    ended = True
                    self._n -= 1
                    self._written += 1
                    self._changed.notify_all()

        return end

    def wait_quiet(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._n == 0 or self._waiting > 0, QUIET_WAIT)

    @contextlib.contextmanager
    def waited_for(self) -> Iterator[None]:
        """A connection waits for a slot (freed by a record): nothing waits for quiet meanwhile."""
        with self._changed:
            self._waiting += 1
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self._waiting -= 1

    def wait_first(self) -> None:
        """Until a first body is written and none is being written (at most 3 x `QUIET_WAIT`)."""
        with self._changed:
            self._changed.wait_for(lambda: self._written and self._n == 0, 3 * QUIET_WAIT)


class _Senders:
    """One `delivery.Sender` per sending thread (its own association or HTTP connection, kept for
    the whole run), all closed at the end."""

    def __init__(self, destination: Facility, via: str, calling_ae: str) -> None:
        self._destination, self._via, self._calling_ae = destination, via, calling_ae
        self._local = threading.local()
        self._all: list[delivery.Sender] = []
        self._lock = threading.Lock()

    def __enter__(self) -> _Senders:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            for sender in self._all:
                sender.close()

    def mine(self) -> delivery.Sender:
        sender: delivery.Sender | None = getattr(self._local, "sender", None)
        if sender is None:
            sender = self._local.sender = delivery.Sender(
                facility=self._destination, via=self._via, calling_ae=self._calling_ae
            )
            with self._lock:
                self._all.append(sender)
        return sender


def _batches(items: list[_T], n: int, first: int | None = None) -> Iterator[list[_T]]:
    """`items` in batches of `n`, the first of `first` (if given)."""
    start = 0
    if first is not None and items:
        yield items[:first]
        start = first
    for i in range(start, len(items), n):
        yield items[i : i + n]


def _finish(engine: Engine, import_id: int, *, status: str, message: str) -> None:
    _set(engine, import_id, status=status, message=message, finished_at=datetime.now(UTC))


def _send_with_retries(
    sender: delivery.Sender,
    files: list[tuple[delivery.File, str]],
    written: Callable[[], None] | None = None,
) -> list[delivery.Outcome]:
    """(file, SOP Instance UID as delivered) sent, retried while the destination cannot be reached
    (`written`: given to each attempt's `delivery.Sender.send`; only its first call counts)."""
    wait = BACKOFF
    for attempt in range(1, RETRIES + 1):
        try:
            return sender.send(files, written=written)
        except Unavailable as exc:
            if attempt == RETRIES:
                return [delivery.Outcome(sop, "failed", None, exc.message[:512]) for _, sop in files]
            log.warning("import delivery to %s failed (attempt %d), retrying", sender.facility.id, attempt)
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


# One instance row's outcome, by primary key: a Core statement run as one executemany (the ORM's
# bulk UPDATE took three times its CPU, 13 times per 200 instances, measured).
_ROWS = ImportInstance.__table__  # type: ignore[attr-defined]
_RECORD_ROW = (
    update(_ROWS)
    .where(_ROWS.c.id == bindparam("row_id"))
    .values(
        status=bindparam("new_status"), code=bindparam("new_code"), detail=bindparam("new_detail"),
        attempts=bindparam("new_attempts"), updated_at=bindparam("new_at"),
    )
)  # fmt: skip
# A batch's record, run through the driver (`db.Prepared`): SQLAlchemy's own statement execution
# and an ORM session per record were most of a record's CPU (measured, see docs/imports.md).
_RECORD_ROWS = Statement(_RECORD_ROW)
_JOBS = ImportJob.__table__  # type: ignore[attr-defined]
_RECORD_COUNTS = Statement(
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("import_id"))
    .values(sent=_JOBS.c.sent + bindparam("add_sent"), failed=_JOBS.c.failed + bindparam("add_failed"))
    .returning(_JOBS.c.cancel_requested)
)


def _record(
    engine: Engine,
    outcomes: list[tuple[_Pending, delivery.Outcome]],
    unreadable: list[tuple[_Pending, str]],
    *,
    progress: jobs.Progress,
    done: int,
) -> bool:
    """Each instance's outcome, the import's counts and the job's progress report, in one
    transaction: one bulk UPDATE by primary key, the counts moved by what this batch changed
    (they are committed with the rows they count, so they start right on a resumed run), so the
    cost per batch does not grow with the study (re-reading every instance row per batch made a
    2000-instance import quadratic). Returns whether a cancel was asked (read in the same
    statement). Raises `LeaseLost`, recording nothing, when another worker took the job over."""
    changes = _changes(outcomes, unreadable)
    import_id = (outcomes[0][0] if outcomes else unreadable[0][0]).import_id
    sent = sum(o.status in ("sent", "warning") for _, o in outcomes)
    failed = len(outcomes) - sent + len(unreadable)
    failed -= sum(inst.status == "failed" for inst, _ in (*outcomes, *unreadable))  # retried here
    with engine.begin() as conn:
        _RECORD_ROWS.run(conn, changes)
        (cancel,) = _RECORD_COUNTS.all(conn, {"import_id": import_id, "add_sent": sent, "add_failed": failed})
        progress.update_in(conn, done=done, message="sending")
        return bool(cancel[0])


def _changes(
    outcomes: list[tuple[_Pending, delivery.Outcome]], unreadable: list[tuple[_Pending, str]]
) -> list[dict[str, Any]]:
    """A batch's instance rows as `_RECORD_ROW` sets them."""
    now = datetime.now(UTC)
    return [
        {"row_id": inst.id, "new_status": o.status, "new_code": o.code, "new_detail": o.detail[:512],
         "new_attempts": inst.attempts + 1, "new_at": now}
        for inst, o in outcomes
    ] + [
        {"row_id": inst.id, "new_status": "failed", "new_code": None, "new_detail": why,
         "new_attempts": inst.attempts + 1, "new_at": now}
        for inst, why in unreadable
    ]  # fmt: skip


def _holds_nothing(destination: Facility, via: str, study_uid: str, calling_ae: str) -> bool:
    """Whether the destination holds no instance of the study (before this run sends any)."""
    try:
        return (
            delivery.series_counts(facility=destination, via=via, study_uid=study_uid, calling_ae=calling_ae)
            == {}
        )
    except Unavailable:
        return False  # unknown: the verification lists every instance


def _verify(
    engine: Engine, import_id: int, plan: reconcile.Plan, destination: Facility, via: str, calling_ae: str,
    *, statuses: dict[int, tuple[str, str]], counts: Future[dict[str, int] | None] | None,
    series_of: dict[str, str], progress: jobs.Progress, final: list[Sent_],
) -> tuple[bool, str]:  # fmt: skip
    """Ask the destination what it holds; an instance sent but not there is reported failed.
    The import is then finished (done or failed, with its counts and message) in the same
    transaction as the job's progress report. Returns (whether it ended failed, the message).
    A destination that cannot be asked leaves the import unverified and failed, every outcome
    the run holds recorded.
    `statuses` is every instance row's (SOP Instance UID as delivered, status) by id, as the
    run recorded them, `final` batches sent and not recorded yet (recorded here). When nothing
    failed, the job is recorded done in the same transaction too.

    When it held nothing of the study before this run sent anything, the run asked the archive
    for its count per series once the last batch was answered (`counts`), which it answers from
    its index: each series holding exactly the instances delivered to it proves they all
    arrived. Otherwise, or when the counts differ, every instance it holds is listed (Orthanc
    reads each file to answer that)."""
    rows = [_Status(id_, sop, status) for id_, (sop, status) in statuses.items()]
    sent = [r.sop_uid for r in rows if r.status in ("sent", "warning")]
    held: set[str] | None = None
    with contextlib.suppress(Unavailable):  # the counts unanswered: the listing asks again
        if counts is not None and counts.result() == Counter(series_of.get(sop, "") for sop in sent):
            held = set(sent)
    unasked = ""
    if held is None:
        try:
            held = delivery.held_instances(
                facility=destination, via=via, study_uid=plan.study_uid, calling_ae=calling_ae
            )
        except Unavailable as exc:
            # The outcomes the run holds are recorded all the same (below), and the import ends
            # failed, unverified: nothing acknowledged is reported missing on no evidence.
            unasked, held = exc.message, set()
    missing = (
        [] if unasked else [r.id for r in rows if r.status in ("sent", "warning") and r.sop_uid not in held]
    )
    total = len(rows)
    failed = sum(r.status == "failed" for r in rows) + len(missing)
    verified: int | None = None if unasked else sum(r.sop_uid in held for r in rows)
    if unasked:
        message = (
            f"{total - failed} of {total} instances delivered, not verified: facility {destination.id!r} "
            f"could not be asked what it holds ({unasked}); start a new import to verify"
        )
    else:
        message = f"{total - failed} of {total} instances delivered, {verified} found at the destination"
    if failed:  # what did not arrive (each refusal is on its instance)
        message += f"; {failed} not accepted by facility {destination.id!r} (see each instance)"
    ended_failed = bool(failed or unasked)
    with session_scope(engine) as session:
        for batch in final:
            session.execute(_RECORD_ROW, _changes(*batch))
        if missing:
            session.execute(
                update(ImportInstance)
                .where(col(ImportInstance.id).in_(missing))
                .values(status="failed", detail="acknowledged but not found at the destination afterwards")
            )
        session.execute(
            update(ImportJob)
            .where(col(ImportJob.id) == import_id)
            .values(
                verified=verified, sent=len(sent) - len(missing),
                failed=failed, status="failed" if ended_failed else "done", message=message,
                finished_at=datetime.now(UTC),
            )
        )  # fmt: skip
        progress.update_in(
            session, done=sum(status != "pending" for _, status in statuses.values()), message=message
        )
        if not ended_failed:
            progress.finish_in(session, message=message)
    return ended_failed, message


# -- "Compare in viewer": today's local study beside the outside prior --------------------------


def compare_studies(*, session: Session, study_uid: str, facility_id: str, local_uid: str = "") -> list[str]:
    """[today's local study, the outside prior], the order OHIF's compare hanging protocol wants
    (current first). Today's is `local_uid` when the page names one, else the most recent study
    the broker indexes at `facility_id` of the same person (or, unlinked, the same patient)."""
    views = index.studies_by_uid(session=session, study_uids=[study_uid])
    if not views:
        raise NotFound(f"no study {study_uid} in the broker's index")
    prior = views[0]
    if local_uid:
        if local_uid == study_uid:
            raise BadRequest("a study cannot be compared with itself")
        if not index.studies_by_uid(session=session, study_uids=[local_uid]):
            raise NotFound(f"no study {local_uid} in the broker's index")
        return [local_uid, study_uid]
    facilities.get_facility(session=session, facility_id=facility_id)  # NotFound names it
    person = prior.person_id or identity.person_of(
        session=session, identifier=Identifier(issuer=prior.issuer, value=prior.patient_id)
    )
    if person is not None:
        patients = index.patients_of_persons(session=session, person_ids=[person])
    else:
        patients = index.patients_by_pk(session=session, patient_pks=[prior.patient_pk])
    local = [
        v
        for v in index.studies_of_patients(session=session, patients=patients)
        if v.facility_id == facility_id and v.study_uid != study_uid
    ]
    if not local:
        raise NotFound(f"facility {facility_id!r} has no study of this patient in the broker to compare with")

    def when(v: Any) -> tuple[str, str, int]:
        time_ = ((v.study_json.get("00080030") or {}).get("Value") or [""])[0]
        return (v.study_date or "", str(time_), v.study_pk)

    return [max(local, key=when).study_uid, study_uid]
