"""Integrity: does the object store still hold, byte for byte, what the index says it holds?

`verify` walks both sides:

- the index: every instance row (of one facility, or a random sample of N) has its object, and
  the object's SHA-256 is still the one recorded at ingest. Otherwise it is *missing* or a
  *mismatch*;
- the store: every object under `dcm/` (`studies/` from earlier releases) and `conflicts/` is
  named by a row. One that is not (and is older than `min_age` seconds, so not an ingest under
  way) is an *orphan*. The orphan walk covers the whole store, so it runs only when no facility
  is given.

With `repair`: an orphan that parses as DICOM is indexed again (into the default facility, the
same way an ingest would: its key is content-addressed, so the object stays where it is), and
every missing or mismatched instance is marked in `integrity_finding` (cleared when a later
run finds it whole again), so an operator can restore it from a backup or ask the facility to
send it again. Nothing is deleted: orphans that do not parse stay for the operator (and the
reaper, which removes unindexed objects after SCANONCE_REAP_GRACE_SECONDS).

Runs from `scanonce verify`, as a job (kind "verify"), and from `POST /api/verify`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from broker.db import session_scope
from broker.index.ingest import ingest_files
from broker.index.keys import CONFLICT_PREFIX, INSTANCE_PREFIXES
from broker.index.models import Instance, InstanceConflict, IntegrityFinding
from broker.jobs import service as jobs
from broker.jobs.models import Job
from broker.security.schemas import Principal, Role
from storage import ObjectNotFound, ObjectStore

log = logging.getLogger("scanonce.verify")

VERIFY_JOB = "verify"
_PREFIXES = (*INSTANCE_PREFIXES, CONFLICT_PREFIX)
_CHUNK = 500
_THREADS = 8  # objects hashed at once (an S3 GET is mostly waiting)
_LISTED = 20  # keys kept per kind in the report (the findings table has them all)

Listener = Callable[[int, int | None, str], None]


@dataclass
class VerifyReport:
    checked: int = 0
    ok: int = 0
    missing: int = 0
    mismatch: int = 0
    orphans: int = 0
    reindexed: int = 0
    marked: int = 0
    unparseable: int = 0
    orphans_walked: bool = False
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.mismatch or (self.orphans - self.reindexed))

    def note(self, kind: str, key: str) -> None:
        listed = self.examples.setdefault(kind, [])
        if len(listed) < _LISTED:
            listed.append(key)

    def summary(self) -> str:
        text = f"{self.checked} checked: {self.ok} ok, {self.missing} missing, {self.mismatch} mismatched"
        if self.orphans_walked:
            text += f"; {self.orphans} orphaned objects"
        if self.reindexed or self.marked or self.unparseable:
            text += f"; repaired: {self.reindexed} re-indexed, {self.marked} marked"
            if self.unparseable:
                text += f", {self.unparseable} orphans not DICOM (left in place)"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "clean": self.clean, "summary": self.summary()}


def _sha256(store: ObjectStore, key: str) -> str | None:
    """The object's SHA-256, or None if it is missing."""
    digest = hashlib.sha256()
    try:
        for chunk in store.get(key):
            digest.update(chunk)
    except ObjectNotFound:
        return None
    return digest.hexdigest()


def _rows(
    engine: Engine, *, facility: str | None, sample: int | None
) -> list[tuple[int, str, str, str, str]]:
    query = sa_select(
        col(Instance.pk), col(Instance.sop_uid), col(Instance.facility_id), col(Instance.object_key),
        col(Instance.sha256),
    )  # fmt: skip
    if facility:
        query = query.where(col(Instance.facility_id) == facility)
    query = query.order_by(func.random()).limit(sample) if sample else query.order_by(col(Instance.pk))
    with Session(engine) as session:
        return [(pk or 0, sop, fac, key, sha) for pk, sop, fac, key, sha in session.execute(query).all()]


def verify(
    *,
    engine: Engine,
    store: ObjectStore,
    facility: str | None = None,
    sample: int | None = None,
    repair: bool = False,
    min_age: float = 60.0,
    default_facility: str = "local",
    listener: Listener | None = None,
) -> VerifyReport:
    report = VerifyReport()
    rows = _rows(engine, facility=facility, sample=sample)
    walk_orphans = facility is None
    total = len(rows)
    if listener:
        listener(0, total, "checking indexed instances")
    findings: list[tuple[str, str, str, str]] = []  # (kind, sop_uid, facility, key)
    whole: list[str] = []
    with ThreadPoolExecutor(_THREADS, thread_name_prefix="scanonce-verify") as pool:
        for done, ((_pk, sop, fac, key, sha), actual) in enumerate(
            zip(rows, pool.map(lambda r: _sha256(store, r[3]), rows), strict=True), start=1
        ):
            report.checked += 1
            if actual is None:
                report.missing += 1
                report.note("missing", key)
                findings.append(("missing", sop, fac, key))
            elif actual != sha:
                report.mismatch += 1
                report.note("mismatch", key)
                findings.append(("mismatch", sop, fac, key))
            else:
                report.ok += 1
                whole.append(sop)
            if listener and (done % 50 == 0 or done == total):
                listener(done, total, "checking indexed instances")
    if repair:
        report.marked = _mark(engine, findings=findings, whole=whole)
    if walk_orphans:
        report.orphans_walked = True
        _walk_orphans(
            engine=engine,
            store=store,
            report=report,
            repair=repair,
            min_age=min_age,
            facility=default_facility,
            listener=listener,
        )
    log.info("verify: %s", report.summary())
    return report


def _mark(engine: Engine, *, findings: list[tuple[str, str, str, str]], whole: list[str]) -> int:
    """Record what is missing or damaged (once per instance and kind); clear what is whole again."""
    now = datetime.now(UTC)
    marked = 0
    with session_scope(engine) as session:
        for kind, sop, fac, key in findings:
            existing = session.exec(
                select(IntegrityFinding).where(
                    IntegrityFinding.sop_uid == sop,
                    IntegrityFinding.kind == kind,
                    col(IntegrityFinding.resolved_at).is_(None),
                )
            ).first()
            if existing is None:
                session.add(
                    IntegrityFinding(kind=kind, sop_uid=sop, facility_id=fac, object_key=key, found_at=now)
                )
            else:
                existing.last_seen_at = now
            marked += 1
        for start in range(0, len(whole), _CHUNK):
            for finding in session.exec(
                select(IntegrityFinding).where(
                    col(IntegrityFinding.sop_uid).in_(whole[start : start + _CHUNK]),
                    col(IntegrityFinding.resolved_at).is_(None),
                )
            ):
                finding.resolved_at = now
    return marked


def _named(engine: Engine, keys: list[str]) -> set[str]:
    with Session(engine) as session:
        named = set(session.exec(select(col(Instance.object_key)).where(col(Instance.object_key).in_(keys))))
        named |= set(
            session.exec(
                select(col(InstanceConflict.object_key)).where(col(InstanceConflict.object_key).in_(keys))
            )
        )
    return named


def _walk_orphans(
    *,
    engine: Engine,
    store: ObjectStore,
    report: VerifyReport,
    repair: bool,
    min_age: float,
    facility: str,
    listener: Listener | None,
) -> None:
    cutoff = time.time() - min_age
    if listener:
        listener(report.checked, report.checked or None, "looking for orphaned objects")
    batch: list[str] = []

    def flush() -> None:
        for key in sorted(set(batch) - _named(engine, batch)):
            report.orphans += 1
            report.note("orphan", key)
            if repair and key.startswith(INSTANCE_PREFIXES):
                _reindex(engine=engine, store=store, key=key, facility=facility, report=report)
        batch.clear()

    for prefix in _PREFIXES:
        for info in store.list(prefix):
            if info.modified is not None and info.modified >= cutoff:
                continue  # young: an ingest may be committing its row right now
            batch.append(info.key)
            if len(batch) >= _CHUNK:
                flush()
    if batch:
        flush()


_REPAIRER = Principal(who="scanonce-verify", role=Role.admin, facility="local")


def _reindex(*, engine: Engine, store: ObjectStore, key: str, facility: str, report: VerifyReport) -> None:
    """Index an orphan again through the ordinary ingest (same checks, same content-addressed
    key, so the object is rewritten in place with identical bytes; an orphan under an earlier
    release's `studies/` key is stored again under its `dcm/` key, and the reaper removes the
    old copy once it is past its grace period)."""
    fd, path = tempfile.mkstemp(prefix="verify-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in store.get(key):
                out.write(chunk)
        principal = Principal(who=_REPAIRER.who, role=Role.admin, facility=facility)
        outcome = ingest_files(
            engine=engine, store=store, principal=principal, facility_id=facility, paths=[path]
        )[0]
    except ObjectNotFound:
        return  # removed meanwhile (the reaper): nothing to repair
    finally:
        if os.path.exists(path):
            os.unlink(path)
    if outcome.status == "stored":
        report.reindexed += 1
        report.note("reindexed", key)
    elif outcome.status == "duplicate":
        report.note("already_indexed", key)
    else:
        report.unparseable += 1
        report.note("unparseable", key)


# -- as a job ---------------------------------------------------------------------------------


def _verify_job(engine: Engine, store: Any, job: Job, progress: jobs.Progress) -> None:
    params = jobs.params_of(job)

    def listener(done: int, total: int | None, message: str) -> None:
        progress.update(done=done, total=total, message=message)

    report = verify(
        engine=engine,
        store=store,
        facility=params.get("facility") or None,
        sample=params.get("sample") or None,
        repair=bool(params.get("repair")),
        min_age=float(params.get("min_age", 60)),
        default_facility=str(params.get("default_facility") or "local"),
        listener=listener,
    )
    progress.update(message=report.summary()[:512], checkpoint={"report": report.as_dict()})


def register_jobs() -> None:
    jobs.register(VERIFY_JOB)(_verify_job)


def enqueue_verify(
    *,
    engine: Engine,
    facility: str | None,
    sample: int | None,
    repair: bool,
    min_age: float,
    default_facility: str,
) -> Job:
    return jobs.enqueue(
        engine=engine,
        kind=VERIFY_JOB,
        key=facility or "",
        params={
            "facility": facility,
            "sample": sample,
            "repair": repair,
            "min_age": min_age,
            "default_facility": default_facility,
        },
    )
