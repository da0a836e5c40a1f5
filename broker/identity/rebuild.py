"""Rebuilding the blocking keys when `matching.block_keys` changes (a new `KEYS_VERSION`): in
batches, resumable, beside live linking, as the durable job `identity-keys` that startup queues
(`ensure_keys_current`) or the CLI runs (`rebuild_keys_now`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import bindparam, delete, func, update
from sqlalchemy import select as sa_select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import CursorResult, Engine
from sqlmodel import Session, col, select

from broker.db import core_table
from broker.errors import BadRequest, Conflict
from broker.identity import autotrain, matching
from broker.identity.locks import serialize_linking
from broker.identity.models import BlockKey, IdentityRecord, IdentitySetting
from broker.identity.records import RECORD_COLUMNS, demo_of
from broker.identity.schemas import RebuildResult
from broker.jobs import service as jobs
from broker.jobs.models import Job

log = logging.getLogger("scanonce.identity")

KEYS_JOB = "identity-keys"
_KEYS_VERSION = "keys_version"
_KEYS_CURSOR = "keys_rebuild"
# Records per batch: a batch holds the linking lock while it writes, and links wait that long
# at most (0.16-0.26 s measured for 1,000 records getting ~3.7 new keys each; docs/identity.md).
REBUILD_BATCH = 1000


def keys_version(*, session: Session) -> int:
    """The `matching.block_keys` version the stored keys were computed with (0: before versions)."""
    row = session.get(IdentitySetting, _KEYS_VERSION)
    return int(row.value) if row is not None and row.value.isdigit() else 0


def _put_setting(*, session: Session, name: str, value: str) -> None:
    # UPDATE first: on SQLite a write statement takes the database's write lock, so the reads
    # that follow in this transaction cannot be overtaken by another writer's commit.
    done = cast(
        CursorResult[Any],
        session.execute(update(IdentitySetting).where(col(IdentitySetting.name) == name).values(value=value)),
    )
    if not done.rowcount:
        session.execute(core_table(IdentitySetting).insert().values(name=name, value=value))


def _rebuild_batch(
    *, session: Session, after: int, batch: int
) -> tuple[int, int, int, int, int, float] | None:
    """Recompute the keys of the next `batch` records after id `after`, writing only the
    difference; the cursor moves in the same transaction. None when no record is left.
    Returns (last id, records, records changed, keys added, keys removed, seconds locked)."""
    # Read and compute first, without the linking lock: that is most of the work, and links
    # waiting on the lock would wait for it.
    rows = session.execute(
        sa_select(*RECORD_COLUMNS, col(IdentityRecord.updated_at))
        .where(col(IdentityRecord.id) > after)
        .order_by(col(IdentityRecord.id))
        .limit(batch)
    ).all()
    if not rows:
        session.rollback()
        return None
    lo, hi = rows[0].id, rows[-1].id
    stored: dict[int, set[str]] = {}
    for key, rid in session.execute(
        sa_select(col(BlockKey.key), col(BlockKey.record_id)).where(col(BlockKey.record_id).between(lo, hi))
    ).all():
        stored.setdefault(rid, set()).add(key)
    session.rollback()
    want = {r.id: matching.block_keys(demo_of(r)) for r in rows}
    read_at = {r.id: r.updated_at for r in rows}

    locked = time.monotonic()
    serialize_linking(session=session)
    _put_setting(  # first write: on SQLite it takes the write lock before the next read
        session=session, name=_KEYS_CURSOR, value=json.dumps({"v": matching.KEYS_VERSION, "after": after})
    )
    # A record updated since it was read got its keys from its new demographics when it was
    # relinked: leave it (under the lock nothing else changes keys).
    now_at = dict(
        session.execute(
            sa_select(col(IdentityRecord.id), col(IdentityRecord.updated_at)).where(
                col(IdentityRecord.id).between(lo, hi)
            )
        ).all()
    )
    keep = {rid for rid, at in read_at.items() if now_at.get(rid) == at}
    # Only the difference is written: a version that adds key kinds inserts the new keys and
    # leaves the rest (a third of the writes of delete-all-and-insert).
    stale = [{"k": k, "r": rid} for rid in keep for k in stored.get(rid, set()) - want[rid]]
    missing = [{"key": k, "record_id": rid} for rid in keep for k in want[rid] - stored.get(rid, set())]
    table = core_table(BlockKey)
    if stale:
        session.connection().execute(
            table.delete().where(table.c.key == bindparam("k"), table.c.record_id == bindparam("r")), stale
        )
    if missing:
        # A key already there (another rebuild run at the same time) is as good as ours.
        insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        session.connection().execute(insert(table).on_conflict_do_nothing(), missing)
    _put_setting(
        session=session, name=_KEYS_CURSOR, value=json.dumps({"v": matching.KEYS_VERSION, "after": hi})
    )
    session.commit()
    changed = {row["r"] for row in stale} | {row["record_id"] for row in missing}
    return hi, len(rows), len(changed), len(missing), len(stale), time.monotonic() - locked


def rebuild_keys(
    *,
    session: Session,
    batch: int = REBUILD_BATCH,
    progress: Callable[[int, int], None] | None = None,
) -> RebuildResult:
    """Recompute every record's blocking keys from its stored demographics, `batch` records per
    transaction, then record the keys version. Commits each batch.

    Idempotent (a record whose keys are already right is not written) and restartable: the
    cursor is stored with each batch, so an interrupted rebuild of this keys version resumes
    after the last committed batch. Linking may go on meanwhile: a batch reads and computes
    without the linking lock and holds it only to write (a record relinked in between keeps
    the keys its relink gave it). `progress(done, total)` after each batch.
    """
    if batch < 1:
        raise BadRequest("batch must be at least 1")
    started = time.monotonic()
    after = 0
    row = session.get(IdentitySetting, _KEYS_CURSOR)
    if row is not None:
        note = json.loads(row.value or "{}")
        if note.get("v") == matching.KEYS_VERSION:
            after = int(note.get("after") or 0)
    total = session.execute(sa_select(func.count()).select_from(IdentityRecord)).scalar_one()
    done = session.execute(
        sa_select(func.count()).select_from(IdentityRecord).where(col(IdentityRecord.id) <= after)
    ).scalar_one()
    session.rollback()  # end the read transaction: each batch is its own
    if progress is not None:
        progress(done, total)
    records = changed = added = removed = 0
    longest_lock = 0.0
    while True:
        step = _rebuild_batch(session=session, after=after, batch=batch)
        if step is None:
            break
        after, n, c, a, r, held = step
        records, changed, added, removed = records + n, changed + c, added + a, removed + r
        longest_lock = max(longest_lock, held)
        done += n
        if progress is not None:
            progress(done, max(total, done))
    _put_setting(session=session, name=_KEYS_VERSION, value=str(matching.KEYS_VERSION))
    session.execute(delete(IdentitySetting).where(col(IdentitySetting.name) == _KEYS_CURSOR))
    session.commit()
    return RebuildResult(
        records=records,
        changed=changed,
        keys_added=added,
        keys_removed=removed,
        seconds=time.monotonic() - started,
        longest_lock_seconds=longest_lock,
    )


def ensure_keys_current(*, engine: Engine) -> Job | None:
    """At startup: queue a rebuild of the blocking keys if they are older than the code's
    (`matching.KEYS_VERSION`). One query when they are current.

    A durable job rather than a rebuild inside startup: a million records take minutes, and
    the broker should serve meanwhile (records linked meanwhile already get the new keys; old
    ones are found by the keys they share with the old version until their batch is done).
    An index with no records is current at once."""
    with Session(engine) as session:
        if keys_version(session=session) >= matching.KEYS_VERSION:
            return None
        if session.exec(select(IdentityRecord.id).limit(1)).first() is None:
            _put_setting(session=session, name=_KEYS_VERSION, value=str(matching.KEYS_VERSION))
            session.commit()
            return None
    log.info("identity blocking keys are older than version %d: rebuild queued", matching.KEYS_VERSION)
    return jobs.enqueue(engine=engine, kind=KEYS_JOB, key=str(matching.KEYS_VERSION))


def rebuild_keys_now(
    *,
    engine: Engine,
    batch: int = REBUILD_BATCH,
    progress: Callable[[int, int], None] | None = None,
) -> RebuildResult:
    """Run the rebuild in this thread as the keys job (the CLI): the queued one if startup
    queued it; Conflict if another process is running it."""
    job = jobs.enqueue(engine=engine, kind=KEYS_JOB, key=str(matching.KEYS_VERSION), params={"batch": batch})
    assert job.id is not None
    claimed = jobs.claim(engine=engine, job_id=job.id)
    if claimed is None:
        raise Conflict(f"a blocking-key rebuild is already running (job {job.id})")
    try:
        with jobs.heartbeat(engine=engine, job_id=job.id), Session(engine) as session:
            result = rebuild_keys(
                session=session, batch=batch, progress=_job_progress(engine, job.id, progress)
            )
    except Exception as exc:
        jobs.finish(engine=engine, job_id=job.id, error=getattr(exc, "message", None) or type(exc).__name__)
        raise
    jobs.finish(engine=engine, job_id=job.id, message=describe_rebuild(result))
    result.job_id = job.id
    return result


def describe_rebuild(result: RebuildResult) -> str:
    return (
        f"{result.records} records, {result.changed} with changed keys "
        f"(+{result.keys_added} -{result.keys_removed} keys) in {result.seconds:.1f}s"
    )


def _job_progress(
    engine: Engine, job_id: int, listener: Callable[[int, int], None] | None
) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        jobs.report(engine=engine, job_id=job_id, done=done, total=total)
        if listener is not None:
            listener(done, total)

    return report


def _rebuild_keys_job(engine: Engine, _store: Any, job: Job, progress: jobs.Progress) -> None:
    batch = int(jobs.params_of(job).get("batch") or REBUILD_BATCH)
    with Session(engine) as session:
        result = rebuild_keys(
            session=session, batch=batch, progress=lambda done, total: progress.update(done=done, total=total)
        )
    progress.update(message=describe_rebuild(result))


def register_jobs() -> None:
    """Identity's job kinds: the app factory and `scanonce worker` call this once."""
    jobs.register(KEYS_JOB)(_rebuild_keys_job)
    autotrain.register_jobs()
