"""Durable jobs in the database.

A job is a row. Any process may claim a queued job: on PostgreSQL with `FOR UPDATE SKIP LOCKED`
so N workers never wait on each other, on SQLite with one atomic `UPDATE ... RETURNING` (SQLite
has a single writer, so that statement is the lock). A running job whose worker stopped
heartbeating is claimed again and resumes from its checkpoint.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from broker.db import session_scope
from broker.errors import NotFound
from broker.jobs.models import Job

log = logging.getLogger("scanonce.jobs")

ACTIVE = ("queued", "running")
FINISHED = ("done", "failed")
STALE_AFTER = timedelta(seconds=60)
PRUNE_EVERY = 3600.0  # seconds between two prunes by one worker loop
_PRUNE_BATCH = 1000  # rows per delete: a first prune of a year of hourly syncs holds no long lock


def _now() -> datetime:
    return datetime.now(UTC)


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def enqueue(*, engine: Engine, kind: str, key: str = "", params: dict[str, Any] | None = None) -> Job:
    """Queue a job, or return the active job of the same kind and key (one at a time per key)."""
    with session_scope(engine) as session:
        active = session.exec(
            select(Job)
            .where(Job.kind == kind, Job.key == key, col(Job.status).in_(ACTIVE))
            .order_by(col(Job.id))
        ).first()
        if active is not None:
            return active
        job = Job(kind=kind, key=key, params=json.dumps(params or {}))
        session.add(job)
        session.flush()
        session.refresh(job)
        return job


def get_job(*, session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def list_jobs(
    *, session: Session, kind: str | None = None, status: str | None = None, limit: int = 100
) -> list[Job]:
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
    stale_after: timedelta = STALE_AFTER,
) -> Job | None:
    """Take the oldest claimable job (queued, or running with a stale heartbeat); None if none.

    `job_id` claims that one job only (the CLI runs the job it just queued in the foreground).
    """
    owner = owner or default_owner()
    now = _now()
    params: dict[str, Any] = {"now": now, "stale": now - stale_after, "owner": owner}
    where = "(status = 'queued' OR (status = 'running' AND heartbeat_at < :stale))"
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


def report(
    *,
    engine: Engine,
    job_id: int,
    done: int | None = None,
    total: int | None = None,
    message: str | None = None,
    checkpoint: dict[str, Any] | None = None,
) -> None:
    """Record progress (and heartbeat). Pass the checkpoint in the same transaction as the work
    it describes when the work is in this database, so the two can never disagree."""
    values: dict[str, Any] = {"heartbeat_at": _now()}
    if done is not None:
        values["progress_done"] = done
    if total is not None:
        values["progress_total"] = total
    if message is not None:
        values["message"] = message[:512]
    if checkpoint is not None:
        values["checkpoint"] = json.dumps(checkpoint)
    with session_scope(engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        for name, value in values.items():
            setattr(job, name, value)


def finish(*, engine: Engine, job_id: int, error: str | None = None, message: str | None = None) -> None:
    with session_scope(engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        job.status = "failed" if error else "done"
        job.error = error or ""
        if message is not None:
            job.message = message[:512]
        job.finished_at = _now()
        job.heartbeat_at = job.finished_at


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
    *, engine: Engine, job_id: int, every: float = STALE_AFTER.total_seconds() / 4
) -> Iterator[None]:
    """Keep the job's heartbeat fresh while its body runs, even through a long silent step (a
    whole-archive listing), so no other worker takes it for dead."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            try:
                with engine.begin() as conn:
                    conn.execute(
                        text("UPDATE job SET heartbeat_at = :now WHERE id = :id"),
                        {"now": _now(), "id": job_id},
                    )
            except Exception:  # the next beat may succeed; a missed one only risks a reclaim
                log.warning("job %s: heartbeat failed", job_id)

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

    def update(
        self,
        *,
        done: int | None = None,
        total: int | None = None,
        message: str | None = None,
        checkpoint: dict[str, Any] | None = None,
    ) -> None:
        if done is not None:
            self.done = done
        if total is not None:
            self.total = total
        if message is not None:
            self.message = message
        report(
            engine=self.engine,
            job_id=self.job_id,
            done=done,
            total=total,
            message=message,
            checkpoint=checkpoint,
        )
        if self.listener is not None:
            self.listener(self.done, self.total, self.message)


# kind -> handler(engine, store, job, progress); domains register theirs at import.
Handler = Callable[[Engine, Any, Job, Progress], None]
_HANDLERS: dict[str, Handler] = {}


def register(kind: str) -> Callable[[Handler], Handler]:
    """Declare the handler of a job kind. Each domain calls this from its `register_jobs()`,
    which the app factory calls; registering the same handler again is harmless."""

    def deco(fn: Handler) -> Handler:
        _HANDLERS[kind] = fn
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
) -> Job:
    """Run a job this process has claimed; record done or failed. Returns the final row."""
    assert job.id is not None
    handler = _HANDLERS.get(job.kind)
    if handler is None:
        finish(engine=engine, job_id=job.id, error=f"no handler for job kind {job.kind!r}")
    else:
        progress = Progress(
            engine=engine, job_id=job.id, listener=listener, done=job.progress_done, total=job.progress_total
        )
        try:
            with heartbeat(engine=engine, job_id=job.id):
                handler(engine, store, job, progress)
        except Exception as exc:  # the job records the failure; the worker keeps going
            log.warning("job %s (%s) failed: %s", job.id, job.kind, exc)
            finish(engine=engine, job_id=job.id, error=getattr(exc, "message", None) or str(exc))
        else:
            finish(engine=engine, job_id=job.id)
    with Session(engine, expire_on_commit=False) as session:
        return get_job(session=session, job_id=job.id)


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
) -> int:
    """The worker loop: claim, run, repeat. Returns how many jobs ran (for `once`, 0 or more
    until the queue is empty). With `keep_finished`, it also prunes older finished jobs, at
    start and then at most once every PRUNE_EVERY seconds."""
    ran = 0
    owner = owner or default_owner()
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
            job = claim(engine=engine, owner=owner, kinds=kinds)
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
        run_claimed(engine=engine, store=store, job=job)
        ran += 1
    return ran
