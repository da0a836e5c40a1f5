"""`scanonce import STUDY_UID --to FACILITY`: import an outside study into a facility's archive
with that facility's identifiers, in the foreground with a progress bar (`--dry-run`: print each
instance's changes and send nothing). `register(app)` adds it to the main `scanonce` command."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlmodel import Session

from broker.clikit import DataDir, console, fail, print_table, state
from broker.errors import ScanOnceError
from broker.imports import service
from broker.security.service import system_principal


def import_study(
    study_uid: Annotated[str, typer.Argument(metavar="STUDY_UID", help="Study Instance UID.")],
    to: Annotated[str, typer.Option("--to", metavar="FACILITY", help="Destination facility id.")],
    patient: Annotated[
        str,
        typer.Option("--patient", metavar="MRN", help="The destination's Patient ID (default: identity)."),
    ] = "",
    accession_policy: Annotated[
        str, typer.Option("--accession-policy", help="AccessionNumber: empty, keep (with issuer) or new.")
    ] = "keep",
    via: Annotated[
        str, typer.Option(help="dimse or dicomweb (default: as the facility is registered).")
    ] = "",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show each instance's changes; send nothing.")
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Import an outside study into a facility's PACS with its local identifiers (IHE IRWF.b)."""
    app_state = state(data_dir)
    principal = system_principal(who=f"cli:{os.environ.get('USER') or 'operator'}", facility=to)
    args = {
        "study_uid": study_uid, "facility_id": to, "patient": patient, "accession_policy": accession_policy,
        "via": via, "calling_ae": app_state.settings.ae_title,
    }  # fmt: skip
    try:
        if dry_run:
            prepared = service.prepare(engine=app_state.engine, principal=principal, **args)
            diffs = service.dry_run(
                engine=app_state.engine, store=app_state.store, prepared=prepared, study_uid=study_uid
            )
            _print_dry_run(prepared, diffs)
            return
        # Queued and claimed by this process in one transaction: it runs here at once.
        row, job = service.start_claimed(engine=app_state.engine, principal=principal, **args)
    except ScanOnceError as exc:
        fail(exc)
    assert row.id is not None
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[message]}"),
    )  # fmt: skip
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"import {row.id} to {to}", total=None, message="")

        def show(done: int, total: int | None, message: str) -> None:
            bar.update(task, completed=done, total=total, message=message)

        final = service.run_claimed(
            engine=app_state.engine, store=app_state.store, import_id=row.id, job=job, listener=show
        )
    console.print(f"import {final.id}: {final.status}: {final.message}")
    if final.status != "done":
        raise typer.Exit(1)


def configure(
    facility: Annotated[str, typer.Argument(metavar="FACILITY", help="The destination facility id.")],
    study_id: Annotated[
        str | None,
        typer.Option("--study-id", help="StudyID of imported studies: keep, empty or from-accession."),
    ] = None,
    institution_name: Annotated[
        str | None, typer.Option("--institution-name", help="Set InstitutionName ('' empties it).")
    ] = None,
    institution_address: Annotated[
        str | None, typer.Option("--institution-address", help="Set InstitutionAddress.")
    ] = None,
    department: Annotated[
        str | None, typer.Option("--department", help="Set InstitutionalDepartmentName.")
    ] = None,
    keep: Annotated[
        list[str] | None,
        typer.Option("--keep", metavar="KEYWORD", help="Keep this institution attribute as it came again."),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Configure what studies imported into FACILITY get: StudyID and the institution attributes
    (each changed value is kept in OriginalAttributesSequence). Options not given stay as they are."""
    app_state = state(data_dir)
    principal = system_principal(who=f"cli:{os.environ.get('USER') or 'operator'}", facility=facility)
    with Session(app_state.engine) as session:
        current = service.destination_config(session=session, facility_id=facility)
        institution: dict[str, str | None] = json.loads(current.institution or "{}")
        policy = study_id or current.study_id_policy
    given = {"InstitutionName": institution_name, "InstitutionAddress": institution_address,
             "InstitutionalDepartmentName": department}  # fmt: skip
    institution.update({k: v for k, v in given.items() if v is not None})
    for keyword in keep or []:
        institution[keyword] = None
    try:
        row = service.configure_destination(
            engine=app_state.engine, principal=principal, facility_id=facility, study_id_policy=policy,
            institution=institution,
        )  # fmt: skip
    except ScanOnceError as exc:
        fail(exc)
    console.print(f"imports into {facility}: StudyID {row.study_id_policy}; institution {row.institution}")


def _print_dry_run(prepared: service.Prepared, diffs: list[dict[str, object]]) -> None:
    plan = prepared.plan
    uids = (
        "renamed (the destination holds this study UID for another patient)" if plan.rename_uids else "kept"
    )
    console.print(
        f"dry run: to {plan.destination} by {prepared.via}; UIDs {uids}; delivered study UID {plan.study_uid}"
    )
    if not diffs:
        console.print(
            "the study is only indexed here: it will be fetched from its facility when the import runs"
        )
    for d in diffs:
        if d.get("error"):
            # One line however narrow the terminal: a script greps it for the UID.
            console.print(
                f"instance {d['sop_uid']}: {d['error']} (the import would fail it alone)", soft_wrap=True
            )
            continue
        table = Table(title=f"instance {d['sop_uid']}")
        for name in ("attribute", "before", "after"):
            table.add_column(name)
        for change in d["changes"]:  # type: ignore[attr-defined]
            table.add_row(change["attribute"], change["before"], change["after"])
        print_table(table)


def register(app: typer.Typer) -> None:
    """Add `import` to the main command."""
    app.command("import")(import_study)
    app.command("import-config")(configure)
