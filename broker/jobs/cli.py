"""`scanonce jobs prune`: delete old finished jobs now (the worker loop also does it hourly)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

jobs_app = typer.Typer(
    help="Durable background jobs (index syncs, fetches, key rebuilds).", no_args_is_help=True
)

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="Data directory (default: $SCANONCE_DATA_DIR or ./data).")
]


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
    from broker.app import build_state
    from broker.jobs import service as jobs
    from broker.settings import Settings

    state = build_state(Settings(data_dir=data_dir) if data_dir is not None else Settings())
    keep = jobs.retention(state.settings.job_retention_days if days is None else days)
    if keep is None:
        console.print("retention is 0 days: finished jobs are kept forever, nothing pruned")
        return
    deleted = jobs.prune(engine=state.engine, older_than=keep)
    console.print(f"pruned {deleted} finished jobs older than {keep.total_seconds() / 86400:g} days")
