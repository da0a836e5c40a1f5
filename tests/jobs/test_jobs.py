"""Durable jobs: one active job per key, each job claimed by exactly one worker (SKIP LOCKED on
PostgreSQL, one atomic UPDATE on SQLite), failures recorded, dead workers' jobs reclaimed."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from broker.app import build_state, create_app
from broker.db import Prepared, core_table, session_scope
from broker.identity.models import IdentityRecord, Person
from broker.jobs import service as jobs
from broker.jobs.models import Job
from broker.settings import Settings
from tests.support import auth_headers


def test_one_active_job_per_kind_and_key(engine: Engine) -> None:
    a = jobs.enqueue(engine=engine, kind="sync", key="stmarys", params={"facility_id": "stmarys"})
    assert jobs.enqueue(engine=engine, kind="sync", key="stmarys").id == a.id
    b = jobs.enqueue(engine=engine, kind="sync", key="county")
    assert b.id != a.id
    claimed = jobs.claim(engine=engine, job_id=a.id)
    assert claimed is not None and claimed.status == "running"
    assert a.id is not None
    jobs.finish(engine=engine, job_id=a.id)
    # Once done, the same key may be queued again.
    assert jobs.enqueue(engine=engine, kind="sync", key="stmarys").id not in (a.id, b.id)


def test_concurrent_workers_never_claim_the_same_job(engine: Engine) -> None:
    ids = {jobs.enqueue(engine=engine, kind="work", key=str(i)).id or 0 for i in range(30)}
    claims: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        mine: list[int] = []
        try:
            while (job := jobs.claim(engine=engine, owner=name)) is not None:
                assert job.id is not None
                mine.append(job.id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        claims[name] = mine

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    claimed = [job_id for mine in claims.values() for job_id in mine]
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    with Session(engine) as session:
        rows = [session.get(Job, i) for i in ids]
        assert {(r.status, r.attempts) for r in rows if r} == {("running", 1)}
        assert {r.owner for r in rows if r} <= set(claims)


def test_handlers_run_and_failures_are_recorded(engine: Engine, settings: Settings) -> None:
    seen: list[dict[str, Any]] = []

    @jobs.register("test-echo")
    def echo(_engine: Engine, _store: Any, job: Job, progress: jobs.Progress) -> None:
        seen.append(jobs.params_of(job))
        progress.update(done=3, total=3, message="all three", checkpoint={"step": 3})

    @jobs.register("test-boom")
    def boom(_engine: Engine, _store: Any, _job: Job, progress: jobs.Progress) -> None:
        progress.update(done=1, total=2)
        raise RuntimeError("the archive said no")

    ok = jobs.enqueue(engine=engine, kind="test-echo", params={"n": 1})
    bad = jobs.enqueue(engine=engine, kind="test-boom")
    unknown = jobs.enqueue(engine=engine, kind="test-nobody")
    assert (
        jobs.work(engine=engine, store=None, once=True, kinds=("test-echo", "test-boom", "test-nobody")) == 3
    )
    assert seen == [{"n": 1}]

    client = TestClient(create_app(state=build_state(settings)), headers=auth_headers())
    done = client.get(f"/api/jobs/{ok.id}").json()
    assert (done["status"], done["progress_done"], done["progress_total"], done["message"]) == (
        "done", 3, 3, "all three",
    )  # fmt: skip
    failed = client.get(f"/api/jobs/{bad.id}").json()
    assert (failed["status"], failed["error"], failed["progress_done"]) == (
        "failed",
        "the archive said no",
        1,
    )
    assert "no handler" in client.get(f"/api/jobs/{unknown.id}").json()["error"]
    assert client.get("/api/jobs/999999").status_code == 404
    assert [j["id"] for j in client.get("/api/jobs", params={"status": "failed"}).json()] == [
        unknown.id,
        bad.id,
    ]
    typo = client.get("/api/jobs", params={"status": "fail"})
    assert typo.status_code == 400 and "failed" in typo.json()["detail"]


def test_a_dead_workers_job_is_claimed_again_with_its_checkpoint(engine: Engine) -> None:
    job = jobs.enqueue(engine=engine, kind="long", key="k")
    assert job.id is not None
    first = jobs.claim(engine=engine, owner="dies")
    assert first is not None and first.id == job.id
    jobs.report(engine=engine, job_id=job.id, done=5, checkpoint={"offset": 5})
    # Fresh heartbeat: nobody else takes it.
    assert jobs.claim(engine=engine, owner="other") is None
    # The heartbeat goes stale (the worker died): the next worker resumes it.
    again = jobs.claim(engine=engine, owner="other", stale_after=timedelta(0))
    assert again is not None and again.id == job.id
    assert (again.attempts, again.owner, again.progress_done) == (2, "other", 5)
    assert jobs.checkpoint_of(again) == {"offset": 5}


def test_a_long_silent_step_keeps_its_job_alive(engine: Engine) -> None:
    import time

    job = jobs.enqueue(engine=engine, kind="long", key="silent")
    assert job.id is not None
    assert jobs.claim(engine=engine, owner="busy") is not None
    with jobs.heartbeat(engine=engine, job_id=job.id, every=0.05):
        time.sleep(1.0)  # a whole-archive listing, with no progress to report
        # Stale after 0.5 s without a beat: the beats keep it claimed by its worker.
        assert jobs.claim(engine=engine, owner="thief", stale_after=timedelta(seconds=0.5)) is None
    time.sleep(0.8)
    assert jobs.claim(engine=engine, owner="thief", stale_after=timedelta(seconds=0.5)) is not None


def test_a_worker_leaves_a_kind_it_cannot_run_to_a_worker_that_can(engine: Engine) -> None:
    """A fleet mid-upgrade: a job of a kind this process never registered stays queued for a
    worker that knows it, rather than being claimed here and failed with "no handler"."""
    elsewhere = jobs.enqueue(engine=engine, kind="test-only-elsewhere")
    ran = jobs.work(engine=engine, store=None, once=True)
    with Session(engine) as session:
        row = session.get(Job, elsewhere.id)
        assert row is not None
        assert (row.status, row.attempts, row.error) == ("queued", 0, "")
    assert ran == 0 or "test-only-elsewhere" not in jobs.registered_kinds()


# A patient identifier and name as a job's database work would bind them.
_MRN, _FAMILY = "MRN-ZYLBERSZTEJN-4711", "ZYLBERSZTEJN"


def test_a_database_error_keeps_patient_data_out_of_logs_and_the_stored_error(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLAlchemy quotes a failed statement's parameters in its error text, and PostgreSQL adds
    the clashing key (DETAIL: Key (...)=(...)) or the value it could not read: neither may reach
    the worker's log or the job's stored error, which operators and the jobs API show."""

    @jobs.register("test-clash")
    def clash(engine_: Engine, _store: Any, _job: Job, _progress: jobs.Progress) -> None:
        with Session(engine_) as session:
            person = Person()
            session.add(person)
            session.flush()
            assert person.id is not None
            for _ in range(2):  # the second row repeats the first's (issuer, value)
                session.add(IdentityRecord(issuer="HOSP", value=_MRN, family=_FAMILY, person_id=person.id))
                session.flush()

    @jobs.register("test-clash-prepared")
    def clash_prepared(engine_: Engine, _store: Any, _job: Job, _progress: jobs.Progress) -> None:
        # The ingest writer's path: the statement run through the driver (`Prepared`).
        record = IdentityRecord(issuer="HOSP", value=_MRN, family=_FAMILY, person_id=1)
        row = record.model_dump(exclude={"id"})
        insert = Prepared(core_table(IdentityRecord).insert().inline(), column_keys=list(row))
        with session_scope(engine_) as session:
            insert.run(session, [row, row])

    @jobs.register("test-unreadable")
    def unreadable(engine_: Engine, _store: Any, _job: Job, _progress: jobs.Progress) -> None:
        # A patient ID read as a number: PostgreSQL quotes the value (here with a quote in it) back.
        with Session(engine_) as session:
            session.execute(text("SELECT CAST(:v AS integer)"), {"v": f'{_MRN}"{_FAMILY}'}).all()
            raise RuntimeError("SQLite compares without complaint; the PostgreSQL run is the check")

    clashing = jobs.enqueue(engine=engine, kind="test-clash")
    prepared = jobs.enqueue(engine=engine, kind="test-clash-prepared")
    unread = jobs.enqueue(engine=engine, kind="test-unreadable")
    kinds = ("test-clash", "test-clash-prepared", "test-unreadable")
    with caplog.at_level(logging.DEBUG):
        jobs.work(engine=engine, store=None, once=True, kinds=kinds)
    with Session(engine) as session:
        rows = [session.get(Job, job.id) for job in (clashing, prepared, unread)]
        errors = [row.error for row in rows if row]
    assert len(errors) == 3 and all(errors)
    for error in errors[:2]:  # still says what failed
        assert "uq_identity_record_issuer_value" in error or "UNIQUE constraint failed" in error
    # Nor in a traceback of the error, which prints the driver's own error too (its cause).
    with pytest.raises(IntegrityError) as raised:
        clash(engine, None, clashing, jobs.Progress(engine=engine, job_id=clashing.id or 0))
    logging.getLogger("scanonce.test").error("the clash", exc_info=raised.value)
    for secret in (_MRN, _FAMILY):
        assert secret not in caplog.text
        assert not [e for e in errors if secret in e]
