"""`scanonce facility ...`, `scanonce sync FACILITY`, `scanonce fetch STUDY_UID`, `scanonce worker`.

`register(app)` adds them to the main `scanonce` command.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from broker.errors import ScanOnceError
from broker.federation.schemas import SharingPolicy

if TYPE_CHECKING:
    from broker.deps import AppState
    from broker.federation.models import Facility

console = Console()
err_console = Console(stderr=True)

facility_app = typer.Typer(help="Facilities that federate their archives.", no_args_is_help=True)

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="Data directory (default: $SCANONCE_DATA_DIR or ./data).")
]
FacilityId = Annotated[str, typer.Argument(metavar="ID", help="Facility id, e.g. stmarys.")]


def _state(data_dir: Path | None) -> AppState:
    from broker.app import build_state
    from broker.settings import Settings

    return build_state(Settings(data_dir=data_dir) if data_dir is not None else Settings())


def _fail(exc: ScanOnceError) -> typer.Exit:
    err_console.print(f"[red]{exc.title}:[/] {exc.message}")
    return typer.Exit(code=1 if exc.status_code < 500 else 2)


def _endpoint(f: Facility) -> tuple[str, str]:
    dimse = f"{f.ae_title}@{f.host}:{f.port}" if f.ae_title else ""
    return f.dicomweb_url or "", dimse


def _facility_table(rows: list[tuple[Facility, list[str], Any]]) -> Table:
    table = Table(title="Facilities")
    for column in ("id", "name", "issuer", "DICOMweb", "DIMSE", "calling AEs", "policy", "last sync"):
        table.add_column(column)
    for f, aes, state in rows:
        web, dimse = _endpoint(f)
        last = ""
        if state is not None:
            when = state.last_completed_at or state.last_started_at
            last = (
                f"{state.last_status} {when:%Y-%m-%d %H:%M} ({state.studies_at_facility} studies)"
                if when
                else ""
            )
        table.add_row(f.id, f.name, f.issuer, web, dimse, " ".join(aes), f.sharing_policy, last)
    return table


def _rows(session: Any, facilities: list[Facility]) -> list[tuple[Facility, list[str], Any]]:
    from broker.federation import service

    return [
        (
            f,
            service.calling_ae_titles(session=session, facility_id=f.id),
            service.sync_state(session=session, facility_id=f.id),
        )
        for f in facilities
    ]


@facility_app.command("add")
def facility_add(
    facility_id: FacilityId,
    issuer: Annotated[str, typer.Option(help="Issuer of Patient ID qualifying this facility's patient IDs.")],
    name: Annotated[str, typer.Option(help="Display name.")] = "",
    dicomweb: Annotated[str | None, typer.Option(help="Base URL of the archive's DICOMweb service.")] = None,
    ae: Annotated[str | None, typer.Option(help="The archive's AE title (with --host and --port).")] = None,
    host: Annotated[str | None, typer.Option(help="The archive's DIMSE host.")] = None,
    port: Annotated[int | None, typer.Option(help="The archive's DIMSE port.")] = None,
    calling_ae: Annotated[
        list[str] | None,
        typer.Option("--calling-ae", help="An AE title the facility calls from (repeatable)."),
    ] = None,
    policy: Annotated[
        SharingPolicy, typer.Option(help="What the facility shares.")
    ] = SharingPolicy.share_all,
    data_dir: DataDir = None,
) -> None:
    """Register a facility."""
    from sqlmodel import Session

    from broker.federation import service

    state = _state(data_dir)
    try:
        with Session(state.engine, expire_on_commit=False) as session:
            f = service.add_facility(
                session=session,
                facility_id=facility_id,
                issuer=issuer,
                name=name,
                dicomweb_url=dicomweb,
                ae_title=ae,
                host=host,
                port=port,
                calling_ae_titles=calling_ae or (),
                sharing_policy=policy.value,
            )
            console.print(_facility_table(_rows(session, [f])))
    except ScanOnceError as exc:
        raise _fail(exc) from exc


@facility_app.command("list")
def facility_list(data_dir: DataDir = None) -> None:
    """All registered facilities."""
    from sqlmodel import Session

    from broker.federation import service

    state = _state(data_dir)
    with Session(state.engine) as session:
        console.print(_facility_table(_rows(session, service.list_facilities(session=session))))


@facility_app.command("show")
def facility_show(facility_id: FacilityId, data_dir: DataDir = None) -> None:
    """One facility, its endpoints and its last sync."""
    from sqlmodel import Session

    from broker.federation import service
    from broker.federation.sync import remote_only_count

    state = _state(data_dir)
    try:
        with Session(state.engine) as session:
            f = service.get_facility(session=session, facility_id=facility_id)
            [(f, aes, sync)] = _rows(session, [f])
            web, dimse = _endpoint(f)
            table = Table(title=f"Facility {f.id}", show_header=False)
            table.add_column("field", style="bold")
            table.add_column("value")
            for label, value in (
                ("name", f.name),
                ("issuer", f.issuer),
                ("DICOMweb", web),
                ("DIMSE", dimse),
                ("calling AEs", " ".join(aes)),
                ("sharing policy", f.sharing_policy),
                ("last sync", f"{sync.last_status} (job {sync.last_job_id})" if sync else "never"),
                (
                    "last sync completed",
                    f"{sync.last_completed_at:%Y-%m-%d %H:%M:%S}" if sync and sync.last_completed_at else "",
                ),
                ("last sync error", sync.last_error if sync else ""),
                ("studies at facility", str(sync.studies_at_facility) if sync else ""),
                ("studies not fetched", str(remote_only_count(session=session, facility_id=f.id))),
            ):
                table.add_row(label, value or "")
            console.print(table)
    except ScanOnceError as exc:
        raise _fail(exc) from exc


_CLEAR = "-"


@facility_app.command("update")
def facility_update(
    facility_id: FacilityId,
    issuer: Annotated[str | None, typer.Option(help="New issuer of Patient ID.")] = None,
    name: Annotated[str | None, typer.Option(help="New display name.")] = None,
    dicomweb: Annotated[str | None, typer.Option(help=f"DICOMweb base URL ('{_CLEAR}' clears it).")] = None,
    ae: Annotated[
        str | None, typer.Option(help=f"Archive AE title ('{_CLEAR}' clears the DIMSE endpoint).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Archive DIMSE host.")] = None,
    port: Annotated[int | None, typer.Option(help="Archive DIMSE port.")] = None,
    calling_ae: Annotated[
        list[str] | None, typer.Option("--calling-ae", help="Replace the calling AE titles (repeatable).")
    ] = None,
    policy: Annotated[SharingPolicy | None, typer.Option(help="What the facility shares.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Change some fields of a facility."""
    from sqlmodel import Session

    from broker.federation import service

    changes: dict[str, Any] = {}
    for key, value in (("issuer", issuer), ("name", name), ("host", host), ("port", port)):
        if value is not None:
            changes[key] = value
    if dicomweb is not None:
        changes["dicomweb_url"] = None if dicomweb == _CLEAR else dicomweb
    if ae == _CLEAR:
        changes.update(ae_title=None, host=None, port=None)
    elif ae is not None:
        changes["ae_title"] = ae
    if calling_ae is not None:
        changes["calling_ae_titles"] = [] if calling_ae == [_CLEAR] else calling_ae
    if policy is not None:
        changes["sharing_policy"] = policy.value
    state = _state(data_dir)
    try:
        with Session(state.engine, expire_on_commit=False) as session:
            f = service.update_facility(session=session, facility_id=facility_id, **changes)
            console.print(_facility_table(_rows(session, [f])))
    except ScanOnceError as exc:
        raise _fail(exc) from exc


@facility_app.command("remove")
def facility_remove(facility_id: FacilityId, data_dir: DataDir = None) -> None:
    """Unregister a facility (refused while the index holds its studies)."""
    from sqlmodel import Session

    from broker.federation import service

    state = _state(data_dir)
    try:
        with Session(state.engine) as session:
            service.remove_facility(session=session, facility_id=facility_id)
    except ScanOnceError as exc:
        raise _fail(exc) from exc
    console.print(f"facility {facility_id} removed")


def sync(
    facility_id: Annotated[str, typer.Argument(metavar="FACILITY", help="Facility id.")],
    data_dir: DataDir = None,
) -> None:
    """Index a facility archive's studies now (incremental; pixels stay at the facility)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from broker.federation import service

    state = _state(data_dir)
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
                engine=state.engine,
                store=state.store,
                facility_id=facility_id,
                progress=show,
                calling_ae=state.settings.ae_title,
            )
        except ScanOnceError as exc:
            raise _fail(exc) from exc
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
    from broker.federation import service

    state = _state(data_dir)
    try:
        with console.status(f"fetching {study_uid}"):
            service.ensure_local(
                engine=state.engine,
                store=state.store,
                study_uid=study_uid,
                calling_ae=state.settings.ae_title,
            )
    except ScanOnceError as exc:
        raise _fail(exc) from exc
    console.print(f"study {study_uid} is held by the broker")


def worker(data_dir: DataDir = None) -> None:
    """Run queued background jobs (index syncs, ...) until interrupted. Start as many workers as
    you like, on any node: each job is claimed by exactly one."""
    import threading

    import broker.federation.sync  # noqa: F401 - registers the "sync" job handler
    from broker.jobs import service as jobs

    state = _state(data_dir)
    stop = threading.Event()
    console.print(f"worker {jobs.default_owner()} waiting for jobs (Ctrl-C stops it)")
    try:
        jobs.work(
            engine=state.engine,
            store=state.store,
            stop=stop,
            keep_finished=jobs.retention(state.settings.job_retention_days),
        )
    except KeyboardInterrupt:
        stop.set()


def register(app: typer.Typer) -> None:
    """Add `facility`, `sync`, `fetch` and `worker` to the main command."""
    app.add_typer(facility_app, name="facility")
    app.command("sync")(sync)
    app.command("fetch")(fetch)
    app.command("worker")(worker)
