"""`scanonce lookup`: the priors of a patient for a planned exam, as a table (relevant first, with
reasons, dose and the window warning); `--json` prints the API's answer. Acts as an admin of the
default facility."""

from __future__ import annotations

import os
from datetime import date
from typing import Annotated

import typer
from rich.table import Table
from sqlmodel import Session

from broker.clikit import DataDir, console, fail, print_table, state, usage_error
from broker.errors import ScanOnceError
from broker.lookup import service
from broker.lookup.schemas import PriorsAnswer
from broker.security.schemas import Principal, Role


def _msv(value: float | None) -> str:
    return "" if value is None else f"{value:.2f} mSv"


def render(answer: PriorsAnswer) -> None:
    """The answer as a clinician reads it: the warning, then one row per study."""
    if not answer.patient_found:
        console.print("No patient with this identifier is known to the broker.")
        return
    if answer.warning:
        console.print(f"[bold red]WARNING[/]: {answer.warning}")
    table = Table(title=f"Priors ({answer.setting}, window {answer.window_days} days)")
    for col in ("", "date", "days", "facility", "modality", "description", "why", "dose", "where", "link"):
        table.add_column(col)
    for p in answer.priors:
        mark = "IN WINDOW" if p.in_window else ("relevant" if p.relevant else "")
        dose = ""
        if p.dose is not None:
            parts = [
                f"DLP {p.dose.dlp_mgy_cm:.0f} mGy.cm" if p.dose.dlp_mgy_cm is not None else "",
                f"CTDIvol {p.dose.ctdivol_mgy:.1f} mGy" if p.dose.ctdivol_mgy is not None else "",
                f"DAP {p.dose.dap_gy_cm2:.3f} Gy.cm2" if p.dose.dap_gy_cm2 is not None else "",
                f"E {_msv(p.dose.effective_dose_msv)}" if p.dose.effective_dose_msv is not None else "",
            ]
            dose = ", ".join(x for x in parts if x)
        why = p.rule if not p.relevant else "; ".join(p.reasons[1:3])
        table.add_row(
            mark,
            str(p.study_date or ""),
            "" if p.age_days is None else str(p.age_days),
            p.facility,
            p.modality,
            p.description,
            why,
            dose,
            p.availability,
            p.link,
        )
    print_table(table)
    if answer.cumulative_12_months is not None:
        c = answer.cumulative_12_months
        more = "" if c.complete else f" ({c.studies_without_estimate} studies without an estimate)"
        console.print(f"Cumulative effective dose, last 12 months: {_msv(c.effective_dose_msv)}{more}")
    if answer.repeat_cost is not None:
        r = answer.repeat_cost
        console.print(f"A repeat would cost: {_msv(r.effective_dose_msv) or 'unknown'} ({r.detail})")
    for note in answer.notes + (answer.planned.notes if answer.planned else []):
        console.print(f"note: {note}")


def lookup(
    data_dir: DataDir = None,
    facility: Annotated[str | None, typer.Option(help="Facility id of the MRN.")] = None,
    mrn: Annotated[str | None, typer.Option(help="The patient's ID at that facility.")] = None,
    identifier: Annotated[str | None, typer.Option(help="system|value, system a facility's issuer.")] = None,
    exam: Annotated[str | None, typer.Option(help='The planned exam, e.g. "CT ABDOMEN PELVIS".')] = None,
    code: Annotated[str | None, typer.Option(help="Procedure code of the planned exam.")] = None,
    system: Annotated[str | None, typer.Option(help="The code's system.")] = None,
    modality: Annotated[str | None, typer.Option()] = None,
    bodypart: Annotated[str | None, typer.Option(help="BodyPartExamined term.")] = None,
    setting: Annotated[str, typer.Option(help="trauma, ed, inpatient or outpatient.")] = "outpatient",
    now: Annotated[str | None, typer.Option(help="Judge as of this date (YYYY-MM-DD).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON answer.")] = False,
) -> None:
    """Has this patient had a relevant exam anywhere? Priors for a planned exam, relevant first."""
    try:
        today = date.fromisoformat(now) if now else None
    except ValueError:
        usage_error("--now must be a date, YYYY-MM-DD")
    st = state(data_dir)
    principal = Principal(
        who=os.environ.get("USER") or "cli", role=Role.admin, facility=st.settings.default_facility
    )
    try:
        with Session(st.engine) as session:
            answer = service.find_priors(
                session=session,
                principal=principal,
                facility=facility,
                mrn=mrn,
                identifier=identifier,
                exam=exam,
                code=code,
                code_system=system,
                modality=modality,
                body_part=bodypart,
                setting=setting,
                now=today,
            )
    except ScanOnceError as exc:
        fail(exc)
    if as_json:
        console.print_json(answer.model_dump_json())
    else:
        render(answer)


def register(app: typer.Typer) -> None:
    """Add `lookup` to the main command."""
    app.command("lookup")(lookup)
