"""`scanonce worker` (run queued jobs), `scanonce jobs list|show` (progress and failures) and
`scanonce jobs prune` (delete old finished jobs now; the worker loop also does it hourly).
`register(app)` adds them to the main command."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer
from rich.table import Table
from sqlmodel import Session

from broker.clikit import DataDir, console, fail, print_table, state
from broker.clikit import settings as clikit_settings
from broker.errors import NotFound, ScanOnceError
from broker.jobs import service as jobs
from broker.jobs.schemas import JobOut
from broker.jobs.worker import run_worker
from broker.logfilters import configure_logging

jobs_app = typer.Typer(
    help="Durable background jobs (index syncs, fetches, key rebuilds).", no_args_is_help=True
)


def _progress(job: JobOut) -> str:
    if job.progress_total:
        return f"{job.progress_done}/{job.progress_total}"
    return str(job.progress_done) if job.progress_done else ""


@jobs_app.command("list")
def list_cmd(
    data_dir: DataDir = None,
    kind: Annotated[str | None, typer.Option("--kind", help="Only jobs of this kind.")] = None,
    status: Annotated[str | None, typer.Option("--status", help=" | ".join(jobs.STATUSES))] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
) -> None:
    """Recent jobs, newest first: progress, attempts, and the last error of each."""
    app_state = state(data_dir)
    try:
        with Session(app_state.engine) as session:
            found = jobs.list_jobs(session=session, kind=kind, status=status, limit=limit)
    except ScanOnceError as exc:
        fail(exc)
    rows = [JobOut.of(j) for j in found]
    table = Table("id", "kind", "key", "status", "progress", "attempts", "owner", "error")
    for job in rows:
        table.add_row(
            str(job.id), job.kind, job.key, job.status, _progress(job), str(job.attempts), job.owner,
            job.error[:120],
        )  # fmt: skip
    print_table(table)


@jobs_app.command("show")
def show(job_id: int, data_dir: DataDir = None) -> None:
    """One job: its state, progress, lease, retries and error."""
    app_state = state(data_dir)
    try:
        with Session(app_state.engine) as session:
            job = JobOut.of(jobs.get_job(session=session, job_id=job_id))
    except NotFound as exc:
        fail(exc)
    for name, value in job.model_dump().items():
        console.print(f"{name}: {value if value is not None else ''}", highlight=False)


@jobs_app.command("prune")
def prune(
    data_dir: DataDir = None,
    days: Annotated[
        float | None,
        typer.Option(
            "--days",
            min=0,
            help="Keep jobs finished within this many days (default: $SCANONCE_JOB_RETENTION_DAYS).",
        ),
    ] = None,
) -> None:
    """Delete finished jobs older than the retention, keeping the newest of each kind and subject."""
    app_state = state(data_dir)
    keep = jobs.retention(app_state.settings.job_retention_days if days is None else days)
    if keep is None:
        console.print("retention is 0 days: finished jobs are kept forever, nothing pruned")
        return
    deleted = jobs.prune(engine=app_state.engine, older_than=keep)
    console.print(f"pruned {deleted} finished jobs older than {keep.total_seconds() / 86400:g} days")


def worker(data_dir: DataDir = None) -> None:
    """Run queued background jobs (index syncs, key rebuilds, ...) until interrupted.

    Start as many workers as you like, on any node: each job is claimed by exactly one."""
    configure_logging("INFO", clikit_settings(data_dir).log_format)
    app_state = state(data_dir, wait_for_db=True)
    stop = threading.Event()
    kinds = ", ".join(jobs.registered_kinds()) or "none"
    policy = jobs.Policy.of(app_state.settings)
    console.print(
        f"worker {jobs.default_owner()} waiting for jobs ({kinds}; lease {policy.lease_seconds:g} s, "
        f"at most {policy.max_attempts} attempts; Ctrl-C stops it)"
    )
    # SIGTERM (a container stopping) lets the job at hand finish; SIGKILL loses it for one lease.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        run_worker(engine=app_state.engine, store=app_state.store, settings=app_state.settings, stop=stop)
    except KeyboardInterrupt:
        stop.set()


def register(app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")
    app.command("worker")(worker)
