"""`scanonce facility add|list|show|update|remove`: the facility registry from the command line.

`register(app)` adds them to the main `scanonce` command.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlmodel import Session

from broker.clikit import DataDir, console, fail, print_table, state
from broker.errors import ScanOnceError
from broker.facilities import service
from broker.facilities.models import Facility
from broker.facilities.schemas import ConsentPolicy, SharingPolicy
from broker.security.schemas import Principal
from broker.security.service import system_principal

facility_app = typer.Typer(help="Facilities that federate their archives.", no_args_is_help=True)

FacilityId = Annotated[str, typer.Argument(metavar="ID", help="Facility id, e.g. stmarys.")]


def _operator(facility: str) -> Principal:
    return system_principal(who=f"cli:{os.environ.get('USER') or 'operator'}", facility=facility)


def _endpoint(f: Facility) -> tuple[str, str]:
    dimse = f"{f.ae_title}@{f.host}:{f.port}" if f.ae_title else ""
    return f.dicomweb_url or "", dimse


def _facility_table(rows: list[tuple[Facility, list[str], Any]]) -> Table:
    table = Table(title="Facilities")
    for column in ("id", "name", "issuer", "DICOMweb", "DIMSE", "calling AEs", "policy", "last sync"):
        table.add_column(column)
    for f, aes, last_sync in rows:
        web, dimse = _endpoint(f)
        last = ""
        if last_sync is not None:
            when = last_sync.last_completed_at or last_sync.last_started_at
            last = (
                f"{last_sync.last_status} {when:%Y-%m-%d %H:%M} ({last_sync.studies_at_facility} studies)"
                if when
                else ""
            )
        table.add_row(f.id, f.name, f.issuer, web, dimse, " ".join(aes), f.sharing_policy, last)
    return table


def _rows(session: Any, facilities: list[Facility]) -> list[tuple[Facility, list[str], Any]]:
    return [
        (
            f,
            [
                (f"{ae.ae_title}@{ae.network}" if ae.network else ae.ae_title)
                + (f"#{ae.certificate}" if ae.certificate else "")
                for ae in service.calling_aes(session=session, facility_id=f.id)
            ],
            service.sync_state(session=session, facility_id=f.id),
        )
        for f in facilities
    ]


def _calling(values: list[str]) -> list[service.CallingAE]:
    """TITLE, TITLE@CIDR (split at the last '@' when what follows is a network), either followed by
    #sha256:<fingerprint> or #subject:<RFC 4514 name> for the TLS client certificate bound to it."""
    out: list[service.CallingAE] = []
    for raw in values:
        value, hash_, cert = raw.partition("#")
        title, at, net = value.rpartition("@")
        if not (at and title and net[:1].isalnum() and ("." in net or ":" in net)):
            title, net = value, ""
        if hash_:
            out.append((title, net or None, cert))
        elif net:
            out.append((title, net))
        else:
            out.append(value)
    return out


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
        typer.Option(
            "--calling-ae",
            help="An AE title the facility calls from, TITLE@CIDR for the network it calls from "
            "(TITLE alone: loopback only), with #sha256:FINGERPRINT or #subject:CN=... for the TLS "
            "client certificate bound to it; repeatable.",
        ),
    ] = None,
    policy: Annotated[
        SharingPolicy, typer.Option(help="What the facility shares.")
    ] = SharingPolicy.share_all,
    consent_policy: Annotated[
        ConsentPolicy, typer.Option(help="Patients' consent model for its records: opt-out or opt-in.")
    ] = ConsentPolicy.opt_out,
    data_dir: DataDir = None,
) -> None:
    """Register a facility."""
    app_state = state(data_dir)
    try:
        with Session(app_state.engine, expire_on_commit=False) as session:
            f = service.add_facility(
                session=session,
                principal=_operator(app_state.settings.default_facility),
                facility_id=facility_id,
                issuer=issuer,
                name=name,
                dicomweb_url=dicomweb,
                ae_title=ae,
                host=host,
                port=port,
                calling_ae_titles=_calling(calling_ae or []),
                sharing_policy=policy.value,
                consent_policy=consent_policy.value,
            )
            print_table(_facility_table(_rows(session, [f])))
    except ScanOnceError as exc:
        fail(exc)


@facility_app.command("list")
def facility_list(data_dir: DataDir = None) -> None:
    """All registered facilities."""
    app_state = state(data_dir)
    with Session(app_state.engine) as session:
        print_table(_facility_table(_rows(session, service.list_facilities(session=session))))


@facility_app.command("show")
def facility_show(facility_id: FacilityId, data_dir: DataDir = None) -> None:
    """One facility, its endpoints and its last sync."""
    app_state = state(data_dir)
    try:
        with Session(app_state.engine) as session:
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
                *(detail(session, f.id) for detail in _details),
            ):
                table.add_row(label, value or "")
            print_table(table)
    except ScanOnceError as exc:
        fail(exc)


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
        list[str] | None,
        typer.Option(
            "--calling-ae",
            help="Replace the calling AE titles, TITLE[@CIDR][#sha256:FINGERPRINT|#subject:DN] (repeatable).",
        ),
    ] = None,
    policy: Annotated[SharingPolicy | None, typer.Option(help="What the facility shares.")] = None,
    consent_policy: Annotated[
        ConsentPolicy | None, typer.Option(help="Patients' consent model for its records: opt-out or opt-in.")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Change some fields of a facility."""
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
        changes["calling_ae_titles"] = [] if calling_ae == [_CLEAR] else _calling(calling_ae)
    if policy is not None:
        changes["sharing_policy"] = policy.value
    if consent_policy is not None:
        changes["consent_policy"] = consent_policy.value
    app_state = state(data_dir)
    try:
        with Session(app_state.engine, expire_on_commit=False) as session:
            f = service.update_facility(
                session=session,
                principal=_operator(app_state.settings.default_facility),
                facility_id=facility_id,
                **changes,
            )
            print_table(_facility_table(_rows(session, [f])))
    except ScanOnceError as exc:
        fail(exc)


@facility_app.command("remove")
def facility_remove(facility_id: FacilityId, data_dir: DataDir = None) -> None:
    """Unregister a facility (refused while the index holds its studies)."""
    app_state = state(data_dir)
    try:
        with Session(app_state.engine) as session:
            service.remove_facility(
                session=session,
                principal=_operator(app_state.settings.default_facility),
                facility_id=facility_id,
            )
    except ScanOnceError as exc:
        fail(exc)
    console.print(f"facility {facility_id} removed")


# Lines other domains add to `scanonce facility show` (e.g. federation: studies not fetched);
# broker.cli wires them in, since those domains sit above this one.
FacilityDetail = Callable[[Session, str], tuple[str, str]]
_details: list[FacilityDetail] = []


def add_show_detail(detail: FacilityDetail) -> None:
    _details.append(detail)


def register(app: typer.Typer) -> None:
    """Add `facility` to the main command."""
    app.add_typer(facility_app, name="facility")
