"""Durable jobs in the database.

A job is a row. Any process may claim a queued job: on PostgreSQL with `FOR UPDATE SKIP LOCKED`
so N workers never wait on each other, on SQLite with one atomic `UPDATE ... RETURNING` (SQLite
has a single writer, so that statement is the lock).

A claim is a lease: it lasts `SCANONCE_JOB_LEASE_SECONDS` past the job's last heartbeat, and the
worker's heartbeat thread renews it. A job whose lease ran out (its worker was killed, its node
lost) is claimed again and resumes from its checkpoint. Each claim adds one to `attempts`, and
(owner, attempts) is the claim's fencing token: a worker whose lease was taken over cannot
heartbeat, report or finish the job any more (`LeaseLost`), so a late result never overwrites the
new owner's. A transient failure (the database, the object store or a facility away) re-queues
the job with exponential backoff (`run_after`); after `SCANONCE_JOB_MAX_ATTEMPTS` claims it fails
for good. docs/jobs.md says why this queue was kept rather than replaced.

Finished jobs are kept for `SCANONCE_JOB_RETENTION_DAYS`, then pruned by the worker loop (at most
once an hour) or `scanonce jobs prune`; the newest finished job of each kind and key is kept
whatever its age.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import delete, func, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from broker.db import session_scope
from broker.errors import BadRequest, NotFound, ScanOnceError, Unavailable
from broker.jobs.models import Job
from broker.settings import Settings
from storage import StoreUnavailable

log = logging.getLogger("scanonce.jobs")

ACTIVE = ("queued", "running")
FINISHED = ("done", "failed")
STALE_AFTER = timedelta(seconds=60)
# How often a job run outside the worker loop (a CLI's foreground sync or rebuild, which knows no
# settings) renews its lease: often enough for any SCANONCE_JOB_LEASE_SECONDS of 15 s or more.
HEARTBEAT_EVERY = 5.0
PRUNE_EVERY = 3600.0  # seconds between two prunes by one worker loop
_PRUNE_BATCH = 1000  # rows per delete: a first prune of a year of hourly syncs holds no long lock


class LeaseLost(ScanOnceError):
    """This worker's claim on a job was taken over (its lease ran out while it was silent): whatever
    it was about to record is discarded, the new owner's run is the one that counts."""

    status_code = 409
    title = "Job lease lost"


class RetryLater(ScanOnceError):
    """Raised by a handler for a failure worth another attempt later (with backoff)."""

    status_code = 503
    title = "Retry later"


class GiveUp(ScanOnceError):
    """Raised by a handler whose work ended failed for good, whatever the cause: the job fails at
    once, never queued again (another run would change what was reported as final)."""

    title = "Failed"


# Failures that say "not now" rather than "never": the job is queued again with backoff.
TRANSIENT: tuple[type[BaseException], ...] = (
    RetryLater,
    Unavailable,
    StoreUnavailable,
    OperationalError,
    ConnectionError,
    TimeoutError,
)


@dataclass(frozen=True, slots=True)
class Lease:
    """A worker's claim on a job: the fencing token every later write of that worker carries."""

    job_id: int
    owner: str
    attempt: int

    @classmethod
    def of(cls, job: Job) -> Lease:
        assert job.id is not None
        return cls(job_id=job.id, owner=job.owner, attempt=job.attempts)


@dataclass(frozen=True, slots=True)
class Policy:
    """How long a claim lasts without a heartbeat, how often a job is tried, how long between tries."""

    lease_seconds: float = STALE_AFTER.total_seconds()
    max_attempts: int = 5
    backoff_seconds: float = 30.0

    @classmethod
    def of(cls, settings: Settings) -> Policy:
        return cls(
            lease_seconds=settings.job_lease_seconds,
            max_attempts=settings.job_max_attempts,
            backoff_seconds=settings.job_retry_backoff_seconds,
        )

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.lease_seconds)

    def backoff(self, attempt: int) -> timedelta:
        """Wait before try `attempt + 1`: backoff, 2x, 4x, ... capped at 64x (a day's outage
        is retried about hourly with the default, not hammered)."""
        return timedelta(seconds=self.backoff_seconds * 2 ** min(max(attempt - 1, 0), 6))


def _now() -> datetime:
    return datetime.now(UTC)


def _fenced(lease: Lease | None) -> tuple[str, dict[str, Any]]:
    """The WHERE clause (and its parameters) that lets a write through only under `lease`."""
    if lease is None:
        return "", {}
    return (
        " AND owner = :lease_owner AND attempts = :lease_attempt AND status = 'running'",
        {"lease_owner": lease.owner, "lease_attempt": lease.attempt},
    )


def hold_lease(conn: Connection | Session, lease: Lease) -> None:
    """Inside a handler's own transaction: lock the job row and raise `LeaseLost` unless this
    worker still holds it, so the handler's writes commit only while its claim is valid (on
    PostgreSQL the row lock also keeps a reclaimer out until the transaction ends)."""
    lock = " FOR UPDATE" if _dialect(conn) == "postgresql" else ""
    row = conn.execute(
        text(
            "SELECT id FROM job WHERE id = :id AND owner = :o AND attempts = :a AND status = 'running'" + lock
        ),
        {"id": lease.job_id, "o": lease.owner, "a": lease.attempt},
    ).first()
    if row is None:
        raise LeaseLost(f"job {lease.job_id}: another worker took it over")


def _dialect(conn: Connection | Session) -> str:
    bind = conn.get_bind() if isinstance(conn, Session) else conn
    return bind.dialect.name


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def enqueue(*, engine: Engine, kind: str, key: str = "", params: dict[str, Any] | None = None) -> Job:
    """Queue a job, or return the active job of the same kind and key (one at a time per key)."""
    with session_scope(engine) as session:
        return enqueue_in(session, kind=kind, key=key, params=params)


def enqueue_in(
    session: Session, *, kind: str, key: str = "", params: dict[str, Any] | None = None, owner: str = ""
) -> Job:
    """`enqueue` in the caller's transaction: the job is queued together with the caller's own
    rows that name it, or not at all (and one commit instead of two). With `owner`, a new job is
    created already claimed by it, as `claim` would leave it (the caller runs it at once with
    `run_claimed`: no claim's transaction before it starts); an active job is returned as it is."""
    active = session.exec(
        select(Job).where(Job.kind == kind, Job.key == key, col(Job.status).in_(ACTIVE)).order_by(col(Job.id))
    ).first()
    if active is not None:
        return active
    job = Job(kind=kind, key=key, params=json.dumps(params or {}))
    if owner:
        now = _now()
        job.status, job.owner, job.attempts, job.started_at, job.heartbeat_at = "running", owner, 1, now, now
    session.add(job)
    session.flush()
    session.refresh(job)
    return job


def get_job(*, session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def retry_times(*, session: Session, job_ids: Iterable[int]) -> dict[int, datetime]:
    """When each of these jobs, queued again after a transient failure, may next run (only
    those still waiting for their backoff)."""
    ids = list(job_ids)
    if not ids:
        return {}
    now = _now()
    rows = session.exec(
        select(Job.id, Job.run_after).where(
            col(Job.id).in_(ids), Job.status == "queued", col(Job.run_after).is_not(None)
        )
    ).all()
    out: dict[int, datetime] = {}
    for job_id, run_after in rows:
        if job_id is None or run_after is None:
            continue
        at = run_after if run_after.tzinfo is not None else run_after.replace(tzinfo=UTC)
        if at > now:
            out[int(job_id)] = at
    return out


STATUSES = ("queued", "running", "done", "failed")


def list_jobs(
    *, session: Session, kind: str | None = None, status: str | None = None, limit: int = 100
) -> list[Job]:
    if status and status not in STATUSES:
        # Answered with an empty list, a typo ("fail") would read as "nothing failed".
        raise BadRequest(f"unknown job status {status[:32]!r}: one of {', '.join(STATUSES)}")
    query = select(Job)
    if kind:
        query = query.where(Job.kind == kind)
    if status:
        query = query.where(Job.status == status)
    return list(session.exec(query.order_by(col(Job.id).desc()).limit(limit)))


def claim(
    *,
    engine: Engine,
    owner: str | None = None,
    kinds: tuple[str, ...] | None = None,
    job_id: int | None = None,
    stale_after: timedelta | None = None,
    max_attempts: int | None = None,
) -> Job | None:
    """Take the oldest claimable job (queued and due, or running with an expired lease); None if none.

    `job_id` claims that one job only (the CLI runs the job it just queued in the foreground).
    `stale_after` is the lease (default `STALE_AFTER`); a job whose lease expired after
    `max_attempts` claims is failed instead (a job that kills its workers must not kill them all).
    """
    owner = owner or default_owner()
    now = _now()
    stale = now - (STALE_AFTER if stale_after is None else stale_after)
    if max_attempts is not None:
        _fail_exhausted(engine=engine, stale=stale, max_attempts=max_attempts, now=now)
    params: dict[str, Any] = {"now": now, "stale": stale, "owner": owner}
    where = (
        "((status = 'queued' AND (run_after IS NULL OR run_after <= :now))"
        " OR (status = 'running' AND heartbeat_at < :stale))"
    )
    if kinds:
        names = [f":k{i}" for i in range(len(kinds))]
        where += f" AND kind IN ({', '.join(names)})"
        params.update({f"k{i}": k for i, k in enumerate(kinds)})
    if job_id is not None:
        where += " AND id = :job_id"
        params["job_id"] = job_id
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            row = conn.execute(
                text(f"SELECT id FROM job WHERE {where} ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"), params
            ).first()
            if row is None:
                return None
            claimed = row[0]
            conn.execute(
                text(
                    "UPDATE job SET status = 'running', owner = :owner, attempts = attempts + 1, "
                    "started_at = COALESCE(started_at, :now), heartbeat_at = :now WHERE id = :id"
                ),
                {**params, "id": claimed},
            )
        else:
            # One statement: SQLite serialises writers, so no two workers can both match the row.
            row = conn.execute(
                text(
                    "UPDATE job SET status = 'running', owner = :owner, attempts = attempts + 1, "
                    "started_at = COALESCE(started_at, :now), heartbeat_at = :now "
                    f"WHERE id = (SELECT id FROM job WHERE {where} ORDER BY id LIMIT 1) RETURNING id"
                ),
                params,
            ).first()
            if row is None:
                return None
            claimed = row[0]
    with Session(engine, expire_on_commit=False) as session:
        return session.get(Job, claimed)


def _fail_exhausted(*, engine: Engine, stale: datetime, max_attempts: int, now: datetime) -> None:
    with engine.begin() as conn:
        failed = conn.execute(
            text(
                "UPDATE job SET status = 'failed', finished_at = :now, "
                "error = 'its worker stopped (killed or lost) on each of ' || attempts || ' attempts' "
                "WHERE status = 'running' AND heartbeat_at < :stale AND attempts >= :max "
                "RETURNING kind, params, error"
            ),
            {"now": now, "stale": stale, "max": max_attempts},
        ).all()
        for kind, params, error in failed:
            _tell_failed(conn, kind=kind, params=params, error=error)
    if failed:
        log.warning("failed %d jobs whose workers kept dying", len(failed))


def _tell_failed(conn: Connection, *, kind: str, params: str, error: str) -> None:
    """The job's domain told, in the transaction that fails the job for good, so that its own
    record of the work (an import's row) never stays active under a failed job."""
    hook = _ON_FAILED.get(kind)
    if hook is not None:
        data = json.loads(params or "{}")
        hook(conn, data if isinstance(data, dict) else {}, error)


def report(
    *,
    engine: Engine,
    job_id: int,
    done: int | None = None,
    total: int | None = None,
    message: str | None = None,
    checkpoint: dict[str, Any] | None = None,
    lease: Lease | None = None,
) -> None:
    """Record progress (and heartbeat). Pass the checkpoint in the same transaction as the work
    it describes when the work is in this database, so the two can never disagree. Under a
    `lease`, raises `LeaseLost` (and records nothing) if another worker took the job over."""
    values = _progress_values(done, total, message)
    if checkpoint is not None:
        values["checkpoint"] = json.dumps(checkpoint)
    _update(engine=engine, job_id=job_id, values=values, lease=lease)


def _progress_values(done: int | None, total: int | None, message: str | None) -> dict[str, Any]:
    values: dict[str, Any] = {"heartbeat_at": _now()}
    if done is not None:
        values["progress_done"] = done
    if total is not None:
        values["progress_total"] = total
    if message is not None:
        values["message"] = message[:512]
    return values


def _update(*, engine: Engine, job_id: int, values: dict[str, Any], lease: Lease | None) -> None:
    """One fenced UPDATE of the job row: NotFound if no such job, LeaseLost if `lease` no longer holds."""
    with engine.begin() as conn:
        _update_in(conn, job_id=job_id, values=values, lease=lease)


def _update_in(
    conn: Connection | Session, *, job_id: int, values: dict[str, Any], lease: Lease | None
) -> None:
    """`_update` inside the caller's transaction `conn` (a LeaseLost raised here rolls it back)."""
    fence, params = _fenced(lease)
    sets = ", ".join(f"{name} = :v_{name}" for name in values)
    params.update({f"v_{name}": value for name, value in values.items()})
    updated = conn.execute(text(f"UPDATE job SET {sets} WHERE id = :id{fence}"), {**params, "id": job_id})
    if updated.rowcount == 1:  # type: ignore[attr-defined]
        return
    if conn.execute(text("SELECT 1 FROM job WHERE id = :id"), {"id": job_id}).first() is None:
        raise NotFound(f"no job {job_id}")
    raise LeaseLost(f"job {job_id}: another worker took it over; this worker's result is discarded")


def finish(
    *,
    engine: Engine,
    job_id: int,
    error: str | None = None,
    message: str | None = None,
    lease: Lease | None = None,
) -> None:
    """Record the job done (or failed, with `error`). Under a `lease`, only while it still holds."""
    now = _now()
    values: dict[str, Any] = {
        "status": "failed" if error else "done",
        "error": error or "",
        "finished_at": now,
        "heartbeat_at": now,
    }
    if message is not None:
        values["message"] = message[:512]
    with engine.begin() as conn:
        _update_in(conn, job_id=job_id, values=values, lease=lease)
        if error:
            row = conn.execute(text("SELECT kind, params FROM job WHERE id = :id"), {"id": job_id}).one()
            kind, params = row
            _tell_failed(conn, kind=kind, params=params, error=error)


def retry_later(*, engine: Engine, lease: Lease, error: str, run_after: datetime) -> None:
    """Give the job back to the queue after a transient failure, not before `run_after`."""
    _update(
        engine=engine,
        job_id=lease.job_id,
        values={"status": "queued", "error": error, "run_after": run_after, "owner": ""},
        lease=lease,
    )


def retention(days: float) -> timedelta | None:
    """`SCANONCE_JOB_RETENTION_DAYS` as a timedelta; None (keep forever) for 0 or less."""
    return timedelta(days=days) if days > 0 else None


def prune(*, engine: Engine, older_than: timedelta, now: datetime | None = None) -> int:
    """Delete jobs that finished (done or failed) more than `older_than` ago; returns how many.

    Queued and running jobs are never touched, and the newest finished job of each (kind, key)
    stays however old: it is what a facility's page shows as its last sync. Nothing else reads
    a finished job (incremental sync compares the archive's counts with study_location, not
    with old jobs), but job ids must never be reused, since study_location.seen_job holds them:
    keeping the newest job of every key keeps the highest id, so SQLite's rowid (max + 1) and
    PostgreSQL's sequence both keep counting up."""
    cutoff = (now or _now()) - older_than
    newest = (
        select(func.max(Job.id)).where(col(Job.status).in_(FINISHED)).group_by(col(Job.kind), col(Job.key))
    )
    deleted = 0
    while True:
        with session_scope(engine) as session:
            ids = list(
                session.exec(
                    select(Job.id)
                    .where(
                        col(Job.status).in_(FINISHED),
                        func.coalesce(col(Job.finished_at), col(Job.created_at)) < cutoff,
                        col(Job.id).not_in(newest),
                    )
                    .order_by(col(Job.id))
                    .limit(_PRUNE_BATCH)
                )
            )
            if ids:
                session.exec(delete(Job).where(col(Job.id).in_(ids)))
        deleted += len(ids)
        if len(ids) < _PRUNE_BATCH:
            return deleted


@contextmanager
def heartbeat(
    *,
    engine: Engine,
    job_id: int,
    every: float = HEARTBEAT_EVERY,
    lease: Lease | None = None,
    lost: threading.Event | None = None,
) -> Iterator[None]:
    """Keep the job's heartbeat (its lease) fresh while its body runs, even through a long silent
    step (a whole-archive listing), so no other worker takes it for dead. Under a `lease`, a beat
    that finds the job taken over sets `lost` and stops beating."""
    stop = threading.Event()
    fence, fence_params = _fenced(lease)

    def beat() -> None:
        while not stop.wait(every):
            try:
                with engine.begin() as conn:
                    updated = conn.execute(
                        text(f"UPDATE job SET heartbeat_at = :now WHERE id = :id{fence}"),
                        {**fence_params, "now": _now(), "id": job_id},
                    ).rowcount
            except Exception:  # the next beat may succeed; a missed one only risks a reclaim
                log.warning("job %s: heartbeat failed", job_id)
                continue
            if lease is not None and updated == 0:
                log.warning("job %s: lease lost to another worker", job_id)
                if lost is not None:
                    lost.set()
                return

    thread = threading.Thread(target=beat, name=f"job-{job_id}-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def checkpoint_of(job: Job) -> dict[str, Any]:
    data = json.loads(job.checkpoint or "{}")
    return data if isinstance(data, dict) else {}


def params_of(job: Job) -> dict[str, Any]:
    data = json.loads(job.params or "{}")
    return data if isinstance(data, dict) else {}


# -- running jobs ---------------------------------------------------------------------------


@dataclass(slots=True)
class Progress:
    """What a handler calls to say how far it got; `listener` mirrors it (the CLI's progress bar)."""

    engine: Engine
    job_id: int
    listener: Callable[[int, int | None, str], None] | None = None
    done: int = 0
    total: int | None = None
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    lease: Lease | None = None
    lost: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # the handler recorded the job done itself (`finish_in`)

    def check(self) -> None:
        """Raise `LeaseLost` if the heartbeat found the job taken over (call between steps)."""
        if self.lost.is_set() and self.lease is not None:
            raise LeaseLost(f"job {self.job_id}: another worker took it over")

    def update(
        self,
        *,
        done: int | None = None,
        total: int | None = None,
        message: str | None = None,
        checkpoint: dict[str, Any] | None = None,
    ) -> None:
        self._remember(done, total, message)
        self.check()
        report(
            engine=self.engine,
            job_id=self.job_id,
            done=done,
            total=total,
            message=message,
            checkpoint=checkpoint,
            lease=self.lease,
        )
        self.notify()

    def update_in(
        self,
        conn: Connection | Session,
        *,
        done: int | None = None,
        total: int | None = None,
        message: str | None = None,
    ) -> None:
        """`update` as part of the caller's transaction `conn`, so the work a report describes and
        the report commit together (one transaction, not two); call `notify` once it committed."""
        self.check()
        _update_in(conn, job_id=self.job_id, values=_progress_values(done, total, message), lease=self.lease)
        self._remember(done, total, message)

    def finish_in(self, conn: Connection | Session, *, message: str | None = None) -> None:
        """Record the job done as part of the caller's transaction `conn`, the one that records
        the handler's last work (one commit where there were two); the runner then records
        nothing more for it, unless the handler raises after all (then it is failed as usual).
        Call it last, as the handler returns."""
        self.check()
        now = _now()
        values: dict[str, Any] = {"status": "done", "error": "", "finished_at": now, "heartbeat_at": now}
        if message is not None:
            values["message"] = message[:512]
        _update_in(conn, job_id=self.job_id, values=values, lease=self.lease)
        self._remember(None, None, message)
        self.finished = True

    def notify(self) -> None:
        """Tell the listener what was recorded (`update_in`'s once its transaction committed)."""
        if self.listener is not None:
            self.listener(self.done, self.total, self.message)

    def _remember(self, done: int | None, total: int | None, message: str | None) -> None:
        if done is not None:
            self.done = done
        if total is not None:
            self.total = total
        if message is not None:
            self.message = message


# kind -> handler(engine, store, job, progress); domains register theirs at import.
Handler = Callable[[Engine, Any, Job, Progress], None]
_HANDLERS: dict[str, Handler] = {}
# kind -> on_failed(conn, the job's params, its error): run in the transaction that fails a job
# of that kind for good (its workers kept dying, its handler's error is not retried, or
# `finish` with an error), whoever fails it.
OnFailed = Callable[[Connection, dict[str, Any], str], None]
_ON_FAILED: dict[str, OnFailed] = {}


def register(kind: str, *, on_failed: OnFailed | None = None) -> Callable[[Handler], Handler]:
    """Declare the handler of a job kind (and what its domain records when such a job fails for
    good: `on_failed`). Each domain calls this from its `register_jobs()`, which the app factory
    calls; registering the same handler again is harmless."""

    def deco(fn: Handler) -> Handler:
        _HANDLERS[kind] = fn
        if on_failed is not None:
            _ON_FAILED[kind] = on_failed
        return fn

    return deco


def registered_kinds() -> list[str]:
    return sorted(_HANDLERS)


def run_claimed(
    *,
    engine: Engine,
    store: Any,
    job: Job,
    listener: Callable[[int, int | None, str], None] | None = None,
    policy: Policy | None = None,
) -> Job:
    """Run a job this process has claimed; record done, failed, or queued again for a retry
    (a transient failure with attempts left). Returns the final row. If the lease was taken
    over meanwhile, nothing is recorded: the new owner's run is the one that counts."""
    assert job.id is not None
    policy = policy or Policy()
    lease = Lease.of(job)
    handler = _HANDLERS.get(job.kind)
    try:
        if handler is None:
            finish(engine=engine, job_id=job.id, error=f"no handler for job kind {job.kind!r}", lease=lease)
        else:
            _run_handler(
                engine=engine, store=store, job=job, handler=handler, listener=listener, policy=policy
            )
    except LeaseLost:
        log.warning("job %s (%s): lease lost, result discarded", job.id, job.kind)
    with Session(engine, expire_on_commit=False) as session:
        return get_job(session=session, job_id=job.id)


def _run_handler(
    *,
    engine: Engine,
    store: Any,
    job: Job,
    handler: Handler,
    listener: Callable[[int, int | None, str], None] | None,
    policy: Policy,
) -> None:
    assert job.id is not None
    lease = Lease.of(job)
    progress = Progress(
        engine=engine,
        job_id=job.id,
        listener=listener,
        done=job.progress_done,
        total=job.progress_total,
        lease=lease,
    )
    try:
        with heartbeat(
            engine=engine, job_id=job.id, every=policy.lease_seconds / 4, lease=lease, lost=progress.lost
        ):
            handler(engine, store, job, progress)
        progress.check()
    except LeaseLost:
        raise
    except Exception as exc:  # the job records the failure; the worker keeps going
        error = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        if isinstance(exc, TRANSIENT) and job.attempts < policy.max_attempts:
            run_after = _now() + policy.backoff(job.attempts)
            log.warning(
                "job %s (%s) attempt %d of %d failed, retry after %s: %s",
                job.id, job.kind, job.attempts, policy.max_attempts, run_after.isoformat(), error,
            )  # fmt: skip
            retry_later(engine=engine, lease=lease, error=error, run_after=run_after)
        else:
            log.warning("job %s (%s) failed: %s", job.id, job.kind, error)
            finish(engine=engine, job_id=job.id, error=error, lease=lease)
    else:
        if not progress.finished:
            finish(engine=engine, job_id=job.id, lease=lease)


def work(
    *,
    engine: Engine,
    store: Any,
    owner: str | None = None,
    kinds: tuple[str, ...] | None = None,
    stop: threading.Event | None = None,
    idle_wait: float = 1.0,
    once: bool = False,
    keep_finished: timedelta | None = None,
    policy: Policy | None = None,
) -> int:
    """The worker loop: claim, run, repeat. Returns how many jobs ran (for `once`, 0 or more
    until no job is due). With `keep_finished`, it also prunes older finished jobs, at
    start and then at most once every PRUNE_EVERY seconds."""
    policy = policy or Policy()
    ran = 0
    owner = owner or default_owner()
    # Only the kinds this process can run: in a fleet mid-upgrade, or beside a worker with a kind
    # of its own, a node that claimed an unknown kind would fail a job another worker could run
    # (tests/cluster runs such a worker beside the nodes).
    kinds = kinds or tuple(registered_kinds()) or None
    last_prune: float | None = None
    while stop is None or not stop.is_set():
        if keep_finished is not None and (last_prune is None or time.monotonic() - last_prune >= PRUNE_EVERY):
            last_prune = time.monotonic()
            try:
                if pruned := prune(engine=engine, older_than=keep_finished):
                    log.info("pruned %d finished jobs", pruned)
            except Exception:  # housekeeping must never stop the worker; the next hour retries
                log.exception("pruning finished jobs failed")
        try:
            job = claim(
                engine=engine,
                owner=owner,
                kinds=kinds,
                stale_after=policy.lease,
                max_attempts=policy.max_attempts,
            )
        except Exception:  # database briefly away: the worker waits and tries again
            log.exception("claiming a job failed")
            if once or stop is None:
                raise
            stop.wait(idle_wait)
            continue
        if job is None:
            if once:
                break
            if stop is not None:
                stop.wait(idle_wait)
            continue
        run_claimed(engine=engine, store=store, job=job, policy=policy)
        ran += 1
    return ran


# -- metrics --------------------------------------------------------------------------------


class QueueCollector(Collector):
    """The job queue as Prometheus gauges, read from the database when /metrics is scraped (the
    queue is shared by every node, so each reports the same, current figures)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "scanonce_jobs", "Jobs by kind and status (queued, running, failed)", labels=["kind", "status"]
        )
        age = GaugeMetricFamily(
            "scanonce_job_oldest_queued_age_seconds",
            "Seconds since the oldest queued job of each kind was queued",
            labels=["kind"],
        )
        try:
            with Session(self.engine) as session:
                rows = session.exec(
                    select(Job.kind, Job.status, func.count(), func.min(Job.created_at))
                    .where(col(Job.status).in_(("queued", "running", "failed")))
                    .group_by(col(Job.kind), col(Job.status))
                ).all()
        except Exception:  # the database is away: /metrics still answers, without these
            log.warning("job queue metrics: database unreachable")
            return
        now = _now()
        for kind, status, count, oldest in rows:
            jobs.add_metric([kind, status], count)
            if status == "queued" and oldest is not None:
                oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=UTC)
                age.add_metric([kind], max(0.0, (now - oldest).total_seconds()))
        yield jobs
        yield age
