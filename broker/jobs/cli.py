"""`scanonce worker` (run queued jobs) and `scanonce jobs prune` (delete old finished jobs now;
the worker loop also does it hourly). `register(app)` adds them to the main command."""

from __future__ import annotations

import threading
from typing import Annotated

import typer

from broker.clikit import DataDir, console, state
from broker.jobs import service as jobs
from broker.jobs.worker import run_worker

jobs_app = typer.Typer(
    help="Durable background jobs (index syncs, fetches, key rebuilds).", no_args_is_help=True
)


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
    app_state = state(data_dir)
    stop = threading.Event()
    kinds = ", ".join(jobs.registered_kinds()) or "none"
    console.print(f"worker {jobs.default_owner()} waiting for jobs ({kinds}; Ctrl-C stops it)")
    try:
        run_worker(engine=app_state.engine, store=app_state.store, settings=app_state.settings, stop=stop)
    except KeyboardInterrupt:
        stop.set()


def register(app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")
    app.command("worker")(worker)
