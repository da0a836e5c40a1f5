"""`scanonce sync FACILITY` and `scanonce fetch STUDY_UID`: index sync and prefetch from the
command line. `register(app)` adds them to the main `scanonce` command."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlmodel import Session

from broker.clikit import DataDir, console, fail, state
from broker.errors import ScanOnceError
from broker.federation import service


def sync(
    facility_id: Annotated[str, typer.Argument(metavar="FACILITY", help="Facility id.")],
    data_dir: DataDir = None,
) -> None:
    """Index a facility archive's studies now (incremental; pixels stay at the facility)."""
    app_state = state(data_dir)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[message]}"),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"sync {facility_id}", total=None, message="")

        def show(done: int, total: int | None, message: str) -> None:
            bar.update(task, completed=done, total=total, message=message)

        try:
            result = service.sync_facility(
                engine=app_state.engine,
                store=app_state.store,
                facility_id=facility_id,
                progress=show,
                calling_ae=app_state.settings.ae_title,
            )
        except ScanOnceError as exc:
            fail(exc)
    rate = result.studies_seen / result.seconds if result.seconds > 0 else 0.0
    console.print(
        f"job {result.job_id}: {result.studies_seen} studies at {facility_id}, "
        f"{result.studies_written} new or changed, {result.studies_removed} removed "
        f"in {result.seconds:.1f}s ({rate:.0f} studies/s)"
    )


def fetch(
    study_uid: Annotated[str, typer.Argument(metavar="STUDY_UID", help="Study Instance UID.")],
    data_dir: DataDir = None,
) -> None:
    """Prefetch a study held only at a facility, so it is served from the broker."""
    app_state = state(data_dir)
    try:
        with console.status(f"fetching {study_uid}"):
            service.ensure_local(
                engine=app_state.engine,
                store=app_state.store,
                study_uid=study_uid,
                calling_ae=app_state.settings.ae_title,
            )
    except ScanOnceError as exc:
        fail(exc)
    console.print(f"study {study_uid} is held by the broker")


def studies_not_fetched(session: Session, facility_id: str) -> tuple[str, str]:
    """A line of `scanonce facility show`."""
    return "studies not fetched", str(service.remote_only_count(session=session, facility_id=facility_id))


def register(app: typer.Typer) -> None:
    """Add `sync` and `fetch` to the main command."""
    app.command("sync")(sync)
    app.command("fetch")(fetch)
