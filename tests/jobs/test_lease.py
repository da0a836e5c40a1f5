"""Jobs at scale: a claim is a lease renewed by heartbeats; a worker whose lease was taken over
cannot record anything (LeaseLost); transient failures are retried with backoff up to a maximum;
two workers never run one job at once; a worker killed with SIGKILL mid-job loses the job to
another worker after the lease, which finishes it once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from broker.app import build_state, create_app
from broker.errors import Unavailable
from broker.jobs import service as jobs
from broker.jobs.models import Job
from broker.settings import Settings
from tests.support import auth_headers

ROOT = Path(__file__).resolve().parents[2]


def _job(engine: Engine, job_id: int | None) -> Job:
    with Session(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_a_worker_whose_lease_was_taken_cannot_record_its_result(engine: Engine) -> None:
    job = jobs.enqueue(engine=engine, kind="fenced", key="k")
    first = jobs.claim(engine=engine, owner="slow")
    assert first is not None
    slow = jobs.Lease.of(first)
    # The slow worker goes silent past its lease: another takes the job over.
    second = jobs.claim(engine=engine, owner="fast", stale_after=timedelta(0))
    assert second is not None and second.id == job.id
    fast = jobs.Lease.of(second)
    assert fast.attempt == 2

    with pytest.raises(jobs.LeaseLost):
        jobs.report(engine=engine, job_id=slow.job_id, done=99, checkpoint={"late": True}, lease=slow)
    with pytest.raises(jobs.LeaseLost):
        jobs.finish(engine=engine, job_id=slow.job_id, error="late failure", lease=slow)
    with pytest.raises(jobs.LeaseLost), Session(engine) as session:
        jobs.hold_lease(session, slow)
    row = _job(engine, job.id)
    assert (row.status, row.owner, row.progress_done, row.error) == ("running", "fast", 0, "")
    assert jobs.checkpoint_of(row) == {}

    jobs.report(engine=engine, job_id=fast.job_id, done=1, lease=fast)
    jobs.finish(engine=engine, job_id=fast.job_id, lease=fast)
    assert _job(engine, job.id).status == "done"
    with pytest.raises(jobs.NotFound):
        jobs.finish(engine=engine, job_id=987654, lease=fast)


def test_a_taken_over_run_records_nothing(engine: Engine) -> None:
    """The worker loop's own path: the handler returns after its job was taken over."""

    @jobs.register("test-overtaken")
    def overtaken(engine: Engine, _store: Any, job: Job, progress: jobs.Progress) -> None:
        progress.update(done=1, total=2)
        assert jobs.claim(engine=engine, owner="thief", stale_after=timedelta(0)) is not None
        # The thief holds it now: this run's later progress and its success are both refused.
        with pytest.raises(jobs.LeaseLost):
            progress.update(done=2)

    job = jobs.enqueue(engine=engine, kind="test-overtaken")
    claimed = jobs.claim(engine=engine, owner="victim", job_id=job.id)
    assert claimed is not None
    final = jobs.run_claimed(engine=engine, store=None, job=claimed)
    assert (final.status, final.owner, final.progress_done, final.attempts) == ("running", "thief", 1, 2)


def test_transient_failures_are_retried_with_backoff_then_fail(engine: Engine) -> None:
    calls: list[int] = []

    @jobs.register("test-flaky")
    def flaky(_engine: Engine, _store: Any, job: Job, _progress: jobs.Progress) -> None:
        calls.append(job.attempts)
        raise Unavailable("the archive is away")

    policy = jobs.Policy(lease_seconds=60, max_attempts=3, backoff_seconds=100)
    job = jobs.enqueue(engine=engine, kind="test-flaky", key="f")
    before = datetime.now(UTC)
    assert jobs.work(engine=engine, store=None, once=True, kinds=("test-flaky",), policy=policy) == 1
    row = _job(engine, job.id)
    assert (row.status, row.attempts, row.error, row.finished_at) == (
        "queued",
        1,
        "the archive is away",
        None,
    )
    assert row.run_after is not None
    first_wait = row.run_after.replace(tzinfo=UTC) - before
    assert timedelta(seconds=99) <= first_wait <= timedelta(seconds=110)
    # Not due yet: a worker passes it by.
    assert jobs.work(engine=engine, store=None, once=True, kinds=("test-flaky",), policy=policy) == 0

    def make_due() -> None:
        with engine.begin() as conn:
            conn.execute(text("UPDATE job SET run_after = :t WHERE id = :id"), {"t": before, "id": job.id})

    make_due()
    before = datetime.now(UTC)
    assert jobs.work(engine=engine, store=None, once=True, kinds=("test-flaky",), policy=policy) == 1
    row = _job(engine, job.id)
    assert row.status == "queued" and row.run_after is not None
    second_wait = row.run_after.replace(tzinfo=UTC) - before
    assert timedelta(seconds=199) <= second_wait <= timedelta(seconds=210)  # doubled
    make_due()
    assert jobs.work(engine=engine, store=None, once=True, kinds=("test-flaky",), policy=policy) == 1
    row = _job(engine, job.id)
    assert (row.status, row.attempts, row.error) == ("failed", 3, "the archive is away")
    assert calls == [1, 2, 3]


def test_a_permanent_failure_is_not_retried(engine: Engine) -> None:
    @jobs.register("test-broken")
    def broken(_engine: Engine, _store: Any, _job: Job, _progress: jobs.Progress) -> None:
        raise ValueError("this study has no such series")

    job = jobs.enqueue(engine=engine, kind="test-broken")
    jobs.work(
        engine=engine, store=None, once=True, kinds=("test-broken",), policy=jobs.Policy(max_attempts=5)
    )
    row = _job(engine, job.id)
    assert (row.status, row.attempts, row.error) == ("failed", 1, "this study has no such series")


def test_a_job_whose_workers_keep_dying_fails_after_max_attempts(engine: Engine) -> None:
    job = jobs.enqueue(engine=engine, kind="poison")
    for n in range(3):
        claimed = jobs.claim(engine=engine, owner=f"w{n}", stale_after=timedelta(0), max_attempts=3)
        assert claimed is not None and claimed.attempts == n + 1
    # Third lease expired too: the next claim fails it rather than handing it out a fourth time.
    assert jobs.claim(engine=engine, owner="w3", stale_after=timedelta(0), max_attempts=3) is None
    row = _job(engine, job.id)
    assert (row.status, row.attempts) == ("failed", 3)
    assert "stopped" in row.error and "3 attempts" in row.error


def test_two_workers_never_run_one_job_at_once(engine: Engine) -> None:
    """Jobs that outlast the lease many times over stay with their worker (the heartbeat renews
    the lease); each runs exactly once and never alongside itself."""
    spans: dict[int, list[tuple[str, float, float]]] = {}
    lock = threading.Lock()

    @jobs.register("test-long")
    def long(_engine: Engine, _store: Any, job: Job, _progress: jobs.Progress) -> None:
        start = time.monotonic()
        time.sleep(1.0)  # four leases long
        with lock:
            spans.setdefault(job.id or 0, []).append((job.owner, start, time.monotonic()))

    ids = [jobs.enqueue(engine=engine, kind="test-long", key=str(i)).id for i in range(4)]
    policy = jobs.Policy(lease_seconds=0.25, max_attempts=5, backoff_seconds=0)
    stop = threading.Event()
    workers = [
        threading.Thread(
            target=jobs.work,
            kwargs={
                "engine": engine,
                "store": None,
                "owner": f"w{i}",
                "kinds": ("test-long",),
                "stop": stop,
                "idle_wait": 0.05,
                "policy": policy,
            },
        )  # fmt: skip
        for i in range(2)
    ]
    for w in workers:
        w.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with Session(engine) as session:
                if all((j := session.get(Job, i)) is not None and j.status == "done" for i in ids):
                    break
            time.sleep(0.1)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert sorted(spans) == sorted(i for i in ids if i is not None)
    assert all(len(runs) == 1 for runs in spans.values()), spans
    for job_id in ids:
        assert _job(engine, job_id).attempts == 1
    assert {owner for runs in spans.values() for owner, _, _ in runs} <= {"w0", "w1"}


def _worker(settings: Settings, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "jobs" / "steps_worker.py"), "worker"],
        cwd=ROOT,
        env={
            **os.environ,
            "SCANONCE_DATA_DIR": str(settings.data_dir),
            "SCANONCE_DATABASE_URL": settings.resolved_database_url(),
            "SCANONCE_STORAGE_URL": settings.resolved_storage_url(),
            "SCANONCE_SYNC_INTERVAL_SECONDS": "0",
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _wait_for(predicate: Any, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_worker_killed_mid_job_loses_it_after_the_lease_and_it_finishes_once(
    backend: Any, settings: Settings, tmp_path: Path
) -> None:
    # Production's case (workers are separate processes on PostgreSQL; on SQLite the worker is a
    # thread of the one `scanonce serve`); the claim and fencing SQL of both is tested above.
    if backend.name != "postgres-s3":
        pytest.skip("separate worker processes run on PostgreSQL")
    state = build_state(settings)
    engine = state.engine
    log = tmp_path / "steps.log"
    job = jobs.enqueue(engine=engine, kind="test-steps", params={"log": str(log), "steps": 5, "hang_at": 3})
    env = {"SCANONCE_JOB_LEASE_SECONDS": "1.5", "SCANONCE_JOB_MAX_ATTEMPTS": "3"}
    first = _worker(settings, env)
    try:
        _wait_for(lambda: log.exists() and "1 hang" in log.read_text(), "the first worker to reach step 3")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
        assert first.returncode == -signal.SIGKILL
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(30)
    row = _job(engine, job.id)
    assert (row.status, row.attempts, row.progress_done) == ("running", 1, 3)

    # Another worker (this process, with the same lease) takes the job over once the lease has run
    # out: before that, the dead worker's claim still holds.
    import tests.jobs.steps_worker  # noqa: F401 - registers the test-steps kind here too

    policy = jobs.Policy(lease_seconds=1.5, max_attempts=3, backoff_seconds=0)
    _wait_for(
        lambda: jobs.work(engine=engine, store=state.store, once=True, kinds=("test-steps",), policy=policy),
        "the job to be taken over",
    )
    row = _job(engine, job.id)
    assert (row.status, row.attempts, row.progress_done, row.progress_total) == ("done", 2, 5, 5)
    # Steps 0-2 ran once (the checkpoint), 3-4 on the second attempt, and the job finished once.
    assert log.read_text().splitlines() == ["1 0", "1 1", "1 2", "1 hang", "2 3", "2 4", "2 done"]

    client = TestClient(create_app(state=state), headers=auth_headers())
    shown = client.get(f"/api/jobs/{job.id}").json()
    assert (shown["status"], shown["attempts"], shown["progress_done"]) == ("done", 2, 5)
    assert shown["owner"] == jobs.default_owner()  # this process's worker finished it
    assert f":{first.pid}:" not in shown["owner"]
    engine.dispose()


def test_jobs_cli_lists_and_shows_progress_and_failures(settings: Settings) -> None:
    from typer.testing import CliRunner

    from broker.cli import app as cli

    state = build_state(settings)

    @jobs.register("test-cli-fails")
    def fails(_engine: Engine, _store: Any, _job: Job, progress: jobs.Progress) -> None:
        progress.update(done=2, total=7, message="two of seven")
        raise ValueError("the archive refused the listing")

    failed = jobs.enqueue(engine=state.engine, kind="test-cli-fails", key="county")
    queued = jobs.enqueue(engine=state.engine, kind="test-cli-waits", key="stmarys")
    jobs.work(engine=state.engine, store=None, once=True, kinds=("test-cli-fails",))
    env = {
        "SCANONCE_DATA_DIR": str(settings.data_dir),
        "SCANONCE_DATABASE_URL": settings.resolved_database_url(),
        "SCANONCE_STORAGE_URL": settings.resolved_storage_url(),
    }
    runner = CliRunner()
    listed = runner.invoke(cli, ["jobs", "list", "--status", "failed"], env=env)
    assert listed.exit_code == 0, listed.output
    text = " ".join(listed.output.split())
    assert "test-cli-fails" in text and "2/7" in text and "the archive refused the listing" in text
    assert "test-cli-waits" not in text
    everything = runner.invoke(cli, ["jobs", "list"], env=env)
    assert "test-cli-waits" in everything.output and "queued" in everything.output

    shown = runner.invoke(cli, ["jobs", "show", str(failed.id)], env=env)
    assert shown.exit_code == 0
    for line in (
        "status: failed",
        "attempts: 1",
        "progress_done: 2",
        "error: the archive refused the listing",
    ):
        assert line in shown.output
    assert runner.invoke(cli, ["jobs", "show", str(queued.id)], env=env).exit_code == 0
    missing = runner.invoke(cli, ["jobs", "show", "987654"], env=env)
    assert missing.exit_code == 1 and "no job 987654" in missing.output
    # A misspelt status ("fail" for "failed") is refused naming the real ones, not answered with
    # an empty table that reads as "nothing failed".
    typo = runner.invoke(cli, ["jobs", "list", "--status", "fail"], env=env)
    assert typo.exit_code != 0 and "failed" in typo.output and "test-cli-fails" not in typo.output
    state.engine.dispose()


def test_a_worker_stopped_with_sigterm_finishes_the_job_at_hand_then_exits(
    backend: Any, settings: Settings, tmp_path: Path
) -> None:
    """docs/jobs.md: `scanonce worker` stops after the job at hand on SIGTERM (what a container
    runtime sends), so a rolling restart loses no job's work to a lease."""
    if backend.name != "postgres-s3":
        pytest.skip("separate worker processes run on PostgreSQL")
    state = build_state(settings)
    log = tmp_path / "steps.log"
    job = jobs.enqueue(
        engine=state.engine,
        kind="test-steps",
        params={"log": str(log), "steps": 4, "hang_at": 99, "pause": 0.5},
    )
    worker = _worker(settings, {})
    try:
        _wait_for(lambda: log.exists() and "1 0" in log.read_text(), "the worker to start the job")
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(60)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(30)
    assert worker.returncode == 0, worker.stderr.read().decode() if worker.stderr else ""
    assert log.read_text().splitlines() == ["1 0", "1 1", "1 2", "1 3", "1 done"]
    row = _job(state.engine, job.id)
    assert (row.status, row.attempts) == ("done", 1)
    state.engine.dispose()
