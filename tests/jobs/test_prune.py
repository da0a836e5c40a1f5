"""Retention of finished jobs: old done/failed jobs are pruned, on both backends; queued and
running jobs, and the newest finished job of each kind and key, stay whatever their age."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from broker.jobs import service as jobs
from broker.jobs.models import Job
from tests.conftest import Backend

OLD = timedelta(days=40)
KEEP = timedelta(days=30)


def _job(engine: Engine, kind: str, key: str, *, end: str | None, age: timedelta) -> int:
    """A job of `kind` and `key` created `age` ago, finished then (end 'done'/'failed'),
    left running (end 'running') or queued (None)."""
    job = jobs.enqueue(engine=engine, kind=kind, key=key)
    assert job.id is not None
    if end is not None:
        assert jobs.claim(engine=engine, job_id=job.id) is not None
    if end in ("done", "failed"):
        jobs.finish(engine=engine, job_id=job.id, error="boom" if end == "failed" else None)
    when = datetime.now(UTC) - age
    with Session(engine) as session:
        row = session.get(Job, job.id)
        assert row is not None
        row.created_at = when
        if row.finished_at is not None:
            row.finished_at = when
        session.add(row)
        session.commit()
    return job.id


def _ids(engine: Engine) -> set[int]:
    with Session(engine) as session:
        return {i for i in session.exec(select(Job.id)) if i is not None}


def _history(engine: Engine) -> dict[str, int]:
    """Old and recent jobs of several kinds and keys; returns them by name."""
    j = {
        "sync-a-1": _job(engine, "sync", "a", end="done", age=OLD * 3),
        "sync-a-2": _job(engine, "sync", "a", end="failed", age=OLD * 2),
        "sync-a-3": _job(engine, "sync", "a", end="done", age=OLD),  # newest finished of sync/a
        "sync-b-1": _job(engine, "sync", "b", end="failed", age=OLD * 2),
        "sync-b-2": _job(engine, "sync", "b", end="done", age=timedelta(days=1)),
        "fetch-x-1": _job(engine, "fetch", "x", end="done", age=OLD),  # its only job: newest of fetch/x
        "sync-c-1": _job(engine, "sync", "c", end="done", age=OLD),
    }
    # Active jobs are never pruned, however old (a long sync, a queue nobody works off).
    j["sync-c-2"] = _job(engine, "sync", "c", end="running", age=OLD)
    j["sync-a-4"] = _job(engine, "sync", "a", end=None, age=OLD)
    return j


def test_prune_deletes_old_finished_jobs_but_keeps_active_ones_and_the_newest_per_key(engine: Engine) -> None:
    j = _history(engine)
    assert jobs.prune(engine=engine, older_than=KEEP) == 3
    assert _ids(engine) == {
        j[n] for n in ("sync-a-3", "sync-a-4", "sync-b-2", "fetch-x-1", "sync-c-1", "sync-c-2")
    }
    # Nothing left to prune: a second run deletes nothing.
    assert jobs.prune(engine=engine, older_than=KEEP) == 0
    # A recent finished job supersedes the kept one, which then goes as well.
    newer = _job(engine, "fetch", "x", end="done", age=timedelta(hours=1))
    assert jobs.prune(engine=engine, older_than=KEEP) == 1
    assert j["fetch-x-1"] not in _ids(engine) and newer in _ids(engine)
    # Ids keep counting up after a prune (sync stamps studies with its job id: never reuse one).
    assert jobs.enqueue(engine=engine, kind="sync", key="d").id > max(j.values()) and newer > max(j.values())  # type: ignore[operator]


def test_the_worker_loop_prunes_with_a_retention_and_not_without(engine: Engine) -> None:
    j = _history(engine)
    assert jobs.retention(0) is None
    jobs.work(
        engine=engine, store=None, once=True, kinds=("nothing-to-run",), keep_finished=jobs.retention(0)
    )
    assert _ids(engine) == set(j.values())
    jobs.work(
        engine=engine, store=None, once=True, kinds=("nothing-to-run",), keep_finished=jobs.retention(30)
    )
    assert {j["sync-a-1"], j["sync-a-2"], j["sync-b-1"]}.isdisjoint(_ids(engine))
    assert len(_ids(engine)) == len(j) - 3


def test_cli_jobs_prune(engine: Engine, backend: Backend, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from broker.cli import app

    j = _history(engine)
    env = {"SCANONCE_DATABASE_URL": backend.database_url, "SCANONCE_STORAGE_URL": backend.storage_url}
    runner = CliRunner()
    # --days 200: everything here is younger (at most 120 days old), nothing goes.
    out = runner.invoke(app, ["jobs", "prune", "--data-dir", str(tmp_path), "--days", "200"], env=env)
    assert out.exit_code == 0, out.output
    assert "pruned 0 finished jobs" in out.output and _ids(engine) == set(j.values())
    out = runner.invoke(app, ["jobs", "prune", "--data-dir", str(tmp_path)], env=env)  # the default 30 days
    assert out.exit_code == 0, out.output
    assert "pruned 3 finished jobs" in out.output and len(_ids(engine)) == len(j) - 3
    bad = runner.invoke(app, ["jobs", "prune", "--data-dir", str(tmp_path), "--days", "-1"], env=env)
    assert bad.exit_code != 0 and len(_ids(engine)) == len(j) - 3
