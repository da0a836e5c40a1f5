"""`scanonce identity ...`: the review queue, manual link/unlink, explain, training, the MLLP feed.

A typer sub-app; `register(app)` adds it to the main `scanonce` command.
Every manual decision needs --why; --who (default: $USER) names who decides and is recorded
with the link. Commands act as an admin of the default facility. Refused operations print on
stderr and exit 1, usage errors exit 2 (broker.clikit).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Annotated

import typer
from rich.table import Table
from sqlmodel import Session

from broker.clikit import DataDir, console, fail, print_table, progress, state, usage_error
from broker.errors import NotFound, ScanOnceError
from broker.identity import service
from broker.identity.adt import feed_principal
from broker.identity.mllp import start_mllp, stop_mllp
from broker.security.schemas import Principal, Role
from broker.settings import Settings

identity_app = typer.Typer(
    help="Patient identity (MPI): review, link, unlink, explain.", no_args_is_help=True
)

Who = Annotated[str | None, typer.Option("--who", help="Who decides (recorded; default: $USER).")]
Why = Annotated[str, typer.Option("--why", help="Why (recorded; required).")]


def _principal(settings: Settings, who: str | None) -> Principal:
    """Who a command acts as: the operator named by --who, as an admin of the default facility."""
    return Principal(
        who=who or os.environ.get("USER") or "cli", role=Role.admin, facility=settings.default_facility
    )


def _record_id(session: Session, ref: str) -> int:
    """A record by id, or by ISSUER|VALUE."""
    if "|" in ref:
        issuer, value = ref.split("|", 1)
        rec = service.get_record(session=session, issuer=issuer, value=value)
        if rec is None or rec.id is None:
            fail(NotFound(f"no record for {ref}"))
        return rec.id
    if not ref.isdigit():
        usage_error("give a record id or ISSUER|VALUE")
    return int(ref)


@identity_app.command("review")
def review(
    data_dir: DataDir = None,
    decide: Annotated[int | None, typer.Option(help="Review item id to decide.")] = None,
    link: Annotated[bool, typer.Option("--link/--reject", help="Decision for --decide.")] = False,
    who: Who = None,
    why: Annotated[str | None, typer.Option("--why")] = None,
    limit: int = 50,
) -> None:
    """List the open review queue, or decide one item (--decide ID --link|--reject --why ...)."""
    app_state = state(data_dir)
    with Session(app_state.engine, expire_on_commit=False) as session:
        try:
            if decide is not None:
                item = service.decide_review(
                    session=session,
                    principal=_principal(app_state.settings, who),
                    review_id=decide,
                    decision="link" if link else "reject",
                    why=why or "",
                )
                console.print(f"review {item.id}: {item.status} by {item.decided_by}")
                return
            items = service.review_queue(session=session, limit=limit)
        except ScanOnceError as exc:
            fail(exc)
    table = Table("id", "record", "candidate", "weight", "evidence")
    for it in items:
        contrib = json.loads(it.contributions)
        evidence = ", ".join(f"{k}:{v.get('level')}" for k, v in contrib.items() if isinstance(v, dict))
        table.add_row(
            str(it.id), str(it.record_id), str(it.candidate_record_id), f"{it.weight:.1f}", evidence
        )
    if items:
        print_table(table)
    else:
        console.print("review queue is empty")


@identity_app.command("link")
def link(
    record: Annotated[str, typer.Argument(help="Record id or ISSUER|VALUE.")],
    to: Annotated[str, typer.Argument(help="Record id or ISSUER|VALUE to join.")],
    why: Why,
    who: Who = None,
    data_dir: DataDir = None,
) -> None:
    """Link a record (and its person) to another record's person."""
    app_state = state(data_dir)
    with Session(app_state.engine, expire_on_commit=False) as session:
        try:
            d = service.manual_link(
                session=session,
                principal=_principal(app_state.settings, who),
                record_id=_record_id(session, record),
                to_record_id=_record_id(session, to),
                why=why,
            )
        except ScanOnceError as exc:
            fail(exc)
    console.print(f"record {d.record_id} -> person {d.person_id}")


@identity_app.command("unlink")
def unlink(
    record: Annotated[str, typer.Argument(help="Record id or ISSUER|VALUE.")],
    why: Why,
    who: Who = None,
    data_dir: DataDir = None,
) -> None:
    """Split a record (or the group a merge brought in) out of its person."""
    app_state = state(data_dir)
    with Session(app_state.engine, expire_on_commit=False) as session:
        try:
            d = service.unlink(
                session=session,
                principal=_principal(app_state.settings, who),
                record_id=_record_id(session, record),
                why=why,
            )
        except ScanOnceError as exc:
            fail(exc)
    console.print(f"record {d.record_id} -> person {d.person_id}")


@identity_app.command("explain")
def explain(
    record: Annotated[str, typer.Argument(help="Record id or ISSUER|VALUE.")],
    data_dir: DataDir = None,
) -> None:
    """Why a record belongs to its person: link history and per-field contributions (JSON)."""
    with Session(state(data_dir).engine) as session:
        try:
            out = service.explain(session=session, record_id=_record_id(session, record))
        except ScanOnceError as exc:
            fail(exc)
    console.print_json(json.dumps(out))


@identity_app.command("train")
def train(who: Who = None, data_dir: DataDir = None) -> None:
    """Re-estimate m/u from the records (EM); used for links from now on."""
    app_state = state(data_dir)
    with Session(app_state.engine) as session:
        try:
            params = service.train(session=session, principal=_principal(app_state.settings, who))
        except ScanOnceError as exc:
            fail(exc)
    console.print_json(json.dumps(params))


@identity_app.command("relink-names")
def relink_names(data_dir: DataDir = None) -> None:
    """Relink the records stored without a name whose patient has one now.

    Before names in other scripts counted (Cyrillic, Greek, Han, Hangul, kana), such a name
    normalised to nothing: run this once after upgrading so those records are linked on their
    names. Records of feeds (FHIR, HL7) are not touched: they are relinked by their next message."""
    app_state = state(data_dir)
    with Session(app_state.engine) as session:
        try:
            count = service.relink_named(session=session)
        except ScanOnceError as exc:
            fail(exc)
    console.print(f"{count} record(s) relinked on their names")


@identity_app.command("refresh-addresses")
def refresh_addresses(data_dir: DataDir = None) -> None:
    """Recompute the addresses of records stored before addresses in other scripts counted.

    Before, a Cyrillic, Greek, Han, Arabic ... address normalised to its digits alone and Ø, Ł, Đ,
    ß were dropped: run this once after upgrading so those records are compared on their whole
    address (read again from their patient's newest study). Records with an ASCII address are
    not touched; records of feeds (FHIR, HL7) are refreshed by their next message."""
    app_state = state(data_dir)
    with Session(app_state.engine) as session:
        try:
            count = service.refresh_addresses(session=session)
        except ScanOnceError as exc:
            fail(exc)
    console.print(f"{count} record(s) relinked on their addresses")


@identity_app.command("trust")
def trust(issuer: str, note: str = "", who: Who = None, data_dir: DataDir = None) -> None:
    """Declare an issuer trusted (e.g. a national ID): its identifiers link deterministically."""
    app_state = state(data_dir)
    with Session(app_state.engine) as session:
        try:
            service.set_trusted_issuer(
                session=session, principal=_principal(app_state.settings, who), issuer=issuer, note=note
            )
        except ScanOnceError as exc:
            fail(exc)
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
    app_state = state(data_dir)
    settings = app_state.settings
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handle = start_mllp(
        engine=app_state.engine,
        principal=feed_principal(facility=settings.default_facility),
        host=host or settings.host,
        port=(settings.mllp_port or 2575) if port is None else port,
        processing_ids=settings.mllp_processing_ids,
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
    who: Who = None,
) -> None:
    """Show or change the linking thresholds (a new parameter row; past links stay explainable)."""
    app_state = state(data_dir)
    with Session(app_state.engine) as session:
        try:
            if auto is None and review is None and strict is None:
                params = service.current_params(session=session)
            else:
                params = service.set_policy(
                    session=session,
                    principal=_principal(app_state.settings, who),
                    auto=auto,
                    review=review,
                    strict=strict,
                )
        except ScanOnceError as exc:
            fail(exc)
    a, r, st = service.policy(params)
    console.print(f"auto-link >= {a}, review >= {r}, strict={st}")


@identity_app.command("rebuild-keys")
def rebuild_keys(
    data_dir: DataDir = None,
    batch: Annotated[int, typer.Option(help="Records per transaction.")] = service.REBUILD_BATCH,
) -> None:
    """Recompute every record's blocking keys (after the matching code changed them).

    `scanonce serve` queues this as a background job when the stored keys are older than the
    code's; this runs it now (or resumes an interrupted one). Safe to run twice."""
    engine = state(data_dir).engine
    with progress() as bar:
        task = bar.add_task("blocking keys", total=None)

        def show(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            result = service.rebuild_keys_now(engine=engine, batch=batch, progress=show)
        except ScanOnceError as exc:
            fail(exc)
    console.print(f"job {result.job_id}: {service.describe_rebuild(result)}")


def register(app: typer.Typer) -> None:
    """Add `identity` to the main command."""
    app.add_typer(identity_app, name="identity")
