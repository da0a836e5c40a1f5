"""`scanonce audit verify|list|head`: check the hash chain, read events, print the head to write
down elsewhere (an anchor that a rewrite of the whole chain cannot match)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session

from broker.audit import service
from broker.audit.service import AuditQuery
from broker.clikit import DataDir, console, fail, print_table, usage_error
from broker.clikit import settings as _settings
from broker.db import check_connection, make_engine, require_current_schema
from broker.errors import NotFound, ScanOnceError

audit_app = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")


def _engine(data_dir: Path | None) -> Engine:
    """The database, only read: an auditor's tool (perhaps under a read-only role, perhaps on a
    copy kept as evidence) never creates or migrates a database, whatever
    SCANONCE_MIGRATE_ON_START says for nodes starting: a schema that is behind names `scanonce db
    upgrade`, a SQLite index that is not there says so (connecting would create an empty one),
    and an unreachable database is one line naming it."""
    settings = _settings(data_dir)
    url = settings.resolved_database_url()
    parsed = make_url(url)
    database = parsed.database or ""
    if (
        parsed.get_backend_name() == "sqlite"
        and database not in ("", ":memory:")
        and not Path(database).is_file()
    ):
        fail(NotFound(f"no index at {database}: nothing has been recorded there yet"))
    engine = make_engine(url, connect_timeout=settings.db_connect_timeout_seconds)
    try:
        check_connection(engine)
        require_current_schema(engine)
    except ScanOnceError as exc:
        engine.dispose()
        fail(exc)
    return engine


@audit_app.command("verify")
def verify(
    data_dir: DataDir = None,
    expect_head: Annotated[
        str | None, typer.Option(help="SEQ:HASH printed earlier by `scanonce audit head` (an anchor)")
    ] = None,
) -> None:
    """Walk the chain from its first row; exit 1 naming the first broken row."""
    anchor = None
    if expect_head:
        seq, _, digest = expect_head.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise usage_error("--expect-head is SEQ:HASH (as `scanonce audit head` prints it)")
        anchor = (int(seq), digest.lower())
    result = service.verify(engine=_engine(data_dir), expect_head=anchor)
    if result.ok:
        console.print(
            f"audit trail intact: {result.checked} events, head {result.head_seq}:{result.head_hash}"
        )
        return
    console.print(f"audit trail BROKEN at row {result.broken_seq}: {result.problem}", markup=False)
    console.print(f"({result.checked} events verified before it)")
    raise typer.Exit(1)


@audit_app.command("head")
def head(data_dir: DataDir = None) -> None:
    """Print the chain head as SEQ:HASH (write it down elsewhere; `verify --expect-head` checks it)."""
    seq, digest = service.head(engine=_engine(data_dir))
    console.print(f"{seq}:{digest}", markup=False)


@audit_app.command("list")
def list_events(
    data_dir: DataDir = None,
    patient: Annotated[str | None, typer.Option(help="Patient ID, or issuer|Patient ID")] = None,
    agent: Annotated[str | None, typer.Option(help="who acted")] = None,
    subtype: Annotated[str | None, typer.Option(help="query, read, retrieve, store, ...")] = None,
    since: Annotated[str | None, typer.Option(help="YYYY-MM-DD or an ISO date-time")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 50,
) -> None:
    """The newest events, newest first."""
    query = AuditQuery(patient=patient, agent=agent, subtype=subtype, dates=(f"ge{since}",) if since else ())
    with Session(_engine(data_dir)) as session:
        _total, rows = service.search(session=session, query=query, limit=limit)
    table = Table("seq", "recorded", "action", "subtype", "outcome", "who", "role", "patient", "study", "via")
    for r in rows:
        patient_text = f"{r['patient_issuer']}|{r['patient_id']}" if r["patient_issuer"] else r["patient_id"]
        table.add_row(
            str(r["seq"]),
            r["recorded"],
            r["action"],
            r["subtype"],
            r["outcome"],
            r["agent_who"],
            r["agent_role"],
            patient_text,
            r["study_uid"],
            r["source_interface"],
        )
    print_table(table)
