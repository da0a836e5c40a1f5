"""`scanonce identity ...`: the review queue, manual link/unlink, explain, training, the MLLP feed.

A typer sub-app; broker/cli.py mounts it with `app.add_typer(identity_app, name="identity")`.
Every manual decision needs --who and --why (recorded with the link).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlmodel import Session

from broker.errors import ScanOnceError
from broker.settings import Settings

identity_app = typer.Typer(
    help="Patient identity (MPI): review, link, unlink, explain.", no_args_is_help=True
)
console = Console()

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="Data directory (default: $SCANONCE_DATA_DIR).")
]
Who = Annotated[str, typer.Option("--who", help="Who decides (recorded).")]
Why = Annotated[str, typer.Option("--why", help="Why (recorded; required).")]


def _engine(data_dir: Path | None):  # type: ignore[no-untyped-def]
    from broker.db import make_engine, migrate

    settings = Settings(data_dir=data_dir) if data_dir is not None else Settings()
    engine = make_engine(settings.resolved_database_url())
    migrate(engine)
    return engine


def _default_who() -> str:
    return os.environ.get("USER") or "cli"


def _fail(exc: ScanOnceError) -> None:
    console.print(f"[red]{exc.title}:[/red] {exc.message}")
    raise typer.Exit(code=1)


def _record_id(session: Session, ref: str) -> int:
    """A record by id, or by ISSUER|VALUE."""
    from broker.identity import service

    if "|" in ref:
        issuer, value = ref.split("|", 1)
        rec = service.get_record(session=session, issuer=issuer, value=value)
        if rec is None or rec.id is None:
            console.print(f"[red]no record for {ref}[/red]")
            raise typer.Exit(code=1)
        return rec.id
    if not ref.isdigit():
        console.print("[red]give a record id or ISSUER|VALUE[/red]")
        raise typer.Exit(code=2)
    return int(ref)


@identity_app.command("review")
def review(
    data_dir: DataDir = None,
    decide: Annotated[int | None, typer.Option(help="Review item id to decide.")] = None,
    link: Annotated[bool, typer.Option("--link/--reject", help="Decision for --decide.")] = False,
    who: Annotated[str | None, typer.Option("--who")] = None,
    why: Annotated[str | None, typer.Option("--why")] = None,
    limit: int = 50,
) -> None:
    """List the open review queue, or decide one item (--decide ID --link|--reject --why ...)."""
    from broker.identity import service

    with Session(_engine(data_dir), expire_on_commit=False) as session:
        try:
            if decide is not None:
                item = service.decide_review(
                    session=session,
                    review_id=decide,
                    decision="link" if link else "reject",
                    who=who or _default_who(),
                    why=why or "",
                )
                console.print(f"review {item.id}: {item.status} by {item.decided_by}")
                return
            items = service.review_queue(session=session, limit=limit)
        except ScanOnceError as exc:
            _fail(exc)
            return
    table = Table("id", "record", "candidate", "weight", "evidence")
    for it in items:
        contrib = json.loads(it.contributions)
        evidence = ", ".join(f"{k}:{v.get('level')}" for k, v in contrib.items() if isinstance(v, dict))
        table.add_row(
            str(it.id), str(it.record_id), str(it.candidate_record_id), f"{it.weight:.1f}", evidence
        )
    console.print(table if items else "review queue is empty")


@identity_app.command("link")
def link(
    record: Annotated[str, typer.Argument(help="Record id or ISSUER|VALUE.")],
    to: Annotated[str, typer.Argument(help="Record id or ISSUER|VALUE to join.")],
    why: Why,
    who: Annotated[str | None, typer.Option("--who")] = None,
    data_dir: DataDir = None,
) -> None:
    """Link a record (and its person) to another record's person."""
    from broker.identity import service

    with Session(_engine(data_dir), expire_on_commit=False) as session:
        try:
            d = service.manual_link(
                session=session,
                record_id=_record_id(session, record),
                to_record_id=_record_id(session, to),
                who=who or _default_who(),
                why=why,
            )
        except ScanOnceError as exc:
            _fail(exc)
            return
    console.print(f"record {d.record_id} -> person {d.person_id}")


@identity_app.command("unlink")
def unlink(
    record: Annotated[str, typer.Argument(help="Record id or ISSUER|VALUE.")],
    why: Why,
    who: Annotated[str | None, typer.Option("--who")] = None,
    data_dir: DataDir = None,
) -> None:
    """Split a record (or the group a merge brought in) out of its person."""
    from broker.identity import service

    with Session(_engine(data_dir), expire_on_commit=False) as session:
        try:
            d = service.unlink(
                session=session, record_id=_record_id(session, record), who=who or _default_who(), why=why
            )
        except ScanOnceError as exc:
            _fail(exc)
            return
    console.print(f"record {d.record_id} -> person {d.person_id}")


@identity_app.command("explain")
def explain(
    record: Annotated[str, typer.Argument(help="Record id or ISSUER|VALUE.")],
    data_dir: DataDir = None,
) -> None:
    """Why a record belongs to its person: link history and per-field contributions (JSON)."""
    from broker.identity import service

    with Session(_engine(data_dir)) as session:
        try:
            out = service.explain(session=session, record_id=_record_id(session, record))
        except ScanOnceError as exc:
            _fail(exc)
            return
    console.print_json(json.dumps(out))


@identity_app.command("train")
def train(data_dir: DataDir = None) -> None:
    """Re-estimate m/u from the records (EM); used for links from now on."""
    from broker.identity import service

    with Session(_engine(data_dir)) as session:
        try:
            params = service.train(session=session)
        except ScanOnceError as exc:
            _fail(exc)
            return
    console.print_json(json.dumps(params))


@identity_app.command("trust")
def trust(issuer: str, note: str = "", data_dir: DataDir = None) -> None:
    """Declare an issuer trusted (e.g. a national ID): its identifiers link deterministically."""
    from broker.identity import service

    with Session(_engine(data_dir)) as session:
        service.set_trusted_issuer(session=session, issuer=issuer, note=note)
    console.print(f"trusted issuer: {issuer}")


@identity_app.command("mllp")
def mllp(
    data_dir: DataDir = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default: $SCANONCE_HOST).")] = None,
    port: Annotated[
        int | None,
        typer.Option(help="MLLP port (default: $SCANONCE_MLLP_PORT, else 2575, HL7's registered port)."),
    ] = None,
) -> None:
    """Listen for HL7 v2 ADT (A01/A04/A08/A40) over MLLP on its own: the ITI-8 identity feed.

    `scanonce serve` already runs this listener beside HTTP and DIMSE; this command is for a
    feed-only process."""
    import logging

    from broker.identity.mllp import start_mllp, stop_mllp

    settings = Settings(data_dir=data_dir) if data_dir is not None else Settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handle = start_mllp(
        engine=_engine(data_dir),
        host=host or settings.host,
        port=(settings.mllp_port or 2575) if port is None else port,
    )
    console.print(f"MLLP listening on {handle.host}:{handle.port} (Ctrl-C stops)")
    try:
        handle.thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        stop_mllp(handle)


@identity_app.command("policy")
def set_policy(
    data_dir: DataDir = None,
    auto: Annotated[float | None, typer.Option(help="Auto-link match weight (log2 Bayes factor).")] = None,
    review: Annotated[float | None, typer.Option(help="Review-queue match weight.")] = None,
    strict: Annotated[
        bool | None,
        typer.Option("--strict/--no-strict", help="Send twin and father/son patterns to review."),
    ] = None,
) -> None:
    """Show or change the linking thresholds (a new parameter row; past links stay explainable)."""
    from broker.identity import service

    with Session(_engine(data_dir)) as session:
        try:
            if auto is None and review is None and strict is None:
                params = service.current_params(session=session)
            else:
                params = service.set_policy(session=session, auto=auto, review=review, strict=strict)
        except ScanOnceError as exc:
            _fail(exc)
            return
        a, r, st = service.policy(params)
    console.print(f"auto-link >= {a}, review >= {r}, strict={st}")


@identity_app.command("rebuild-keys")
def rebuild_keys(
    data_dir: DataDir = None,
    batch: Annotated[int, typer.Option(help="Records per transaction.")] = 1000,
) -> None:
    """Recompute every record's blocking keys (after the matching code changed them).

    `scanonce serve` queues this as a background job when the stored keys are older than the
    code's; this runs it now (or resumes an interrupted one). Safe to run twice."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from broker.identity import service

    engine = _engine(data_dir)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("blocking keys", total=None)

        def show(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            result = service.rebuild_keys_now(engine=engine, batch=batch, progress=show)
        except ScanOnceError as exc:
            _fail(exc)
            return
    console.print(f"job {result.job_id}: {service.describe_rebuild(result)}")
