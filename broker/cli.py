"""The `scanonce` command: serve, demo, ingest, facility, jobs, and the domains' sub-commands."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import tempfile
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
import uvicorn
from rich.table import Table

from broker import clikit
from broker.app import build_state, check_start, create_app
from broker.audit import cli as audit_cli
from broker.clikit import DataDir, console, fail, print_table
from broker.clikit import progress as _progress
from broker.clikit import settings as _settings
from broker.db import check_connection, make_engine, migrate, safe_url, schema_status
from broker.demo import service as demo_service
from broker.deps import AppState
from broker.errors import ScanOnceError
from broker.facilities import cli as facilities_cli
from broker.federation import cli as federation_cli
from broker.identity import cli as identity_cli
from broker.imports import cli as imports_cli
from broker.index import cli as index_cli
from broker.index import service
from broker.jobs import cli as jobs_cli
from broker.logfilters import configure_logging, uvicorn_text_log_config
from broker.lookup import cli as lookup_cli
from broker.security import cli as security_cli
from broker.security.schemas import Principal, Role
from broker.settings import Settings
from broker.web import cli as web_cli

app = typer.Typer(
    help="ScanOnce: find the prior before you scan again.", no_args_is_help=True, add_completion=False
)
clikit.set_state_builder(build_state)


def _state(settings: Settings) -> AppState:
    return build_state(settings)


def _cap_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own malloc arena; with a thread pool serving
    requests the freed memory stays spread over dozens of them and resident. Two arenas keep
    the server's footprint flat (what MALLOC_ARENA_MAX=2 does, set before any thread starts)."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


@app.command()
def serve(
    data_dir: DataDir = None,
    host: Annotated[str | None, typer.Option(help="HTTP bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port.")] = None,
    dimse_port: Annotated[
        int | None, typer.Option(help="DIMSE port (0 disables the DIMSE listener).")
    ] = None,
    mllp_port: Annotated[
        int | None, typer.Option(help="HL7 v2 MLLP port of the ADT identity feed (0 disables it).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Run the broker: HTTP (DICOMweb, FHIR, CDS Hooks, pages, /api), DIMSE and HL7 MLLP in one process."""
    _cap_malloc_arenas()
    settings = _settings(data_dir, host=host, port=port, dimse_port=dimse_port, mllp_port=mllp_port)
    if "SCANONCE_INGEST_PROCESSES" not in os.environ:
        # A server parses on every core (parsing holds the GIL); embedded uses stay in-process.
        settings.ingest_processes = -1
    configure_logging(log_level, settings.log_format)
    try:
        check_start(
            settings=settings,
            bind_host=settings.host,
            ports_free=partial(_ports_free, settings),
            while_waiting=partial(_not_ready_meanwhile, settings),
        )
        # A schema behind: the operator runs `scanonce db upgrade`.
        application = create_app(settings, services=True)
    except ScanOnceError as exc:
        fail(exc)
    origin = f"http://{settings.host}:{settings.port}"
    # soft_wrap: a URL is never broken across lines, whatever the terminal's width.
    for line in (
        f"[bold]ScanOnce[/] on {origin}/",
        f"  lookup:    {origin}/",
        f"  admin:     {origin}/admin/facilities",
        f"  viewer:    {origin}/viewer/",
        f"  API docs:  {origin}/docs",
        f"  DICOMweb:  {origin}/dicom-web",
        f"  DIMSE:     {settings.ae_title}@{settings.host}:{settings.dimse_port}"
        + (f"  ({settings.dimse_receivers} receiver processes too)" if settings.dimse_receivers else "")
        if settings.dimse_port
        else "",
        f"  HL7 MLLP:  {settings.host}:{settings.mllp_port}  (ADT identity feed)"
        if settings.mllp_port
        else "",
        f"  data:      {settings.data_dir.resolve()}",
    ):
        if line:
            console.print(line, soft_wrap=True)
    uvicorn.run(
        application,
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        # JSON: uvicorn's own lines go through the root handler too (one format for collectors).
        log_config=None if settings.log_format == "json" else uvicorn_text_log_config(),
    )


def _not_ready_app(reason: str) -> Any:
    """What the HTTP port answers while the node waits for its database at start: alive
    (/healthz 200, so an orchestrator does not kill it for the database's sake), not ready
    (/readyz and everything else 503 with Retry-After, so a balancer sends nothing here)."""

    async def app(scope: dict[str, Any], _receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        alive = scope.get("path") == "/healthz"
        # /readyz's body as the started node answers it (broker.app.Readiness), store unknown yet.
        body = b"ok" if alive else orjson.dumps({"status": "not ready", "database": reason})
        kind = b"text/plain; charset=utf-8" if alive else b"application/json"
        headers = [(b"content-type", kind), (b"retry-after", b"5")]
        await send({"type": "http.response.start", "status": 200 if alive else 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


@contextmanager
def _not_ready_meanwhile(settings: Settings) -> Iterator[None]:
    """While the node waits for its database at start, its HTTP port answers alive but not ready
    (`_not_ready_app`), so that neither an orchestrator nor a balancer mistakes it for dead or up."""
    config = uvicorn.Config(
        _not_ready_app("unreachable (SCANONCE_DATABASE_URL)"),
        host=settings.host,
        port=settings.port,
        lifespan="off",
        log_level="warning",
        log_config=None if settings.log_format == "json" else uvicorn_text_log_config(),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="scanonce-not-ready", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(10)


def _ports_free(settings: Settings) -> None:
    """One line naming a taken port and the option that changes it, rather than a traceback
    after the banner (each listener would otherwise fail on its own, deep in start-up)."""
    listeners = (
        ("HTTP", settings.port, "--port or SCANONCE_PORT"),
        ("DIMSE", settings.dimse_port, "--dimse-port or SCANONCE_DIMSE_PORT (0: off)"),
        ("HL7 MLLP", settings.mllp_port, "--mllp-port or SCANONCE_MLLP_PORT (0: off)"),
    )
    for what, port, option in listeners:
        if not port:
            continue
        try:
            family, kind, proto, _name, address = socket.getaddrinfo(
                settings.host, port, type=socket.SOCK_STREAM
            )[0]
            with socket.socket(family, kind, proto) as sock:
                # As the servers bind: a port in TIME_WAIT after a restart is free to them.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
        except OSError as exc:
            reason = (
                "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            )
            clikit.err_console.print(
                f"[red]Port {port} ({what}) on {settings.host} {reason}:[/] choose another with {option}.",
                soft_wrap=True,
            )
            raise typer.Exit(code=clikit.EXIT_REFUSED) from None


def _iter_inputs(paths: list[Path], tmp: Path) -> Iterator[tuple[str, str]]:
    """(display name, local file path) for every file, folder member and zip member."""
    for path in paths:
        if path.is_dir():
            for root, _dirs, files in os.walk(path):
                for name in sorted(files):
                    full = Path(root) / name
                    yield str(full), str(full)
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        continue
                    target = tmp / f"zip-{abs(hash((str(path), info.filename)))}"
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    yield f"{path}!{info.filename}", str(target)
        elif path.exists():
            yield str(path), str(path)
        else:
            yield str(path), ""


def _count_inputs(paths: list[Path]) -> int:
    n = 0
    for path in paths:
        if path.is_dir():
            n += sum(len(files) for _r, _d, files in os.walk(path))
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                n += sum(1 for i in zf.infolist() if not i.is_dir())
        else:
            n += 1
    return n


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files, folders or zip files.")],
    facility: Annotated[str | None, typer.Option(help="Facility the data comes from.")] = None,
    data_dir: DataDir = None,
    batch: Annotated[int, typer.Option(help="Instances per transaction.")] = 64,
) -> None:
    """Store and index DICOM files, with a progress bar and a summary of what failed and why."""
    settings = _settings(data_dir)
    state = _state(settings)
    facility_id = facility or settings.default_facility
    principal = Principal(who="cli", role=Role.admin, facility=facility_id)
    total = _count_inputs(paths)
    counts: Counter[str] = Counter()
    failures: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="scanonce-ingest-") as tmp, _progress() as progress:
        task = progress.add_task("Ingesting", total=total)
        pending: list[tuple[str, str]] = []

        def flush() -> None:
            files = [p for _n, p in pending if p]
            outcomes = iter(
                service.ingest_files(
                    engine=state.engine,
                    store=state.store,
                    principal=principal,
                    facility_id=facility_id,
                    paths=files,
                )
            )
            for name, path in pending:
                if not path:
                    counts["failed"] += 1
                    failures.append((name, "no such file"))
                    continue
                outcome = next(outcomes)
                counts[outcome.status] += 1
                if outcome.status == "failed":
                    failures.append((name, f"0x{outcome.failure_reason or 0:04X} {outcome.message}"))
            progress.advance(task, len(pending))
            pending.clear()

        for item in _iter_inputs(paths, Path(tmp)):
            pending.append(item)
            if len(pending) >= batch:
                flush()
        if pending:
            flush()
    console.print(
        f"stored {counts['stored']}, already present {counts['duplicate']}, failed {counts['failed']}"
    )
    if failures:
        table = Table("file", "why it failed", title="Failures")
        for name, why in failures[:200]:
            table.add_row(name, why)
        print_table(table)
        if len(failures) > 200:
            console.print(f"... and {len(failures) - 200} more")
        raise typer.Exit(code=1 if counts["stored"] + counts["duplicate"] == 0 else 0)


@app.command()
def demo(
    data_dir: DataDir = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data (same seed, same data).")] = 42,
    patients: Annotated[int, typer.Option(help="How many synthetic patients.")] = 40,
) -> None:
    """Generate deterministic synthetic studies for several facilities and load them (safe to run twice)."""
    settings = _settings(data_dir)
    state = _state(settings)
    with _progress() as bar:
        task = bar.add_task("Loading demo data", total=None)

        def show(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        counts = demo_service.load_demo(
            engine=state.engine, store=state.store, seed=seed, patients=patients, progress=show
        )
    console.print(
        f"demo data (seed {seed}): {counts['stored']} stored, {counts['duplicate']} already present, "
        f"{counts['failed']} failed"
    )
    if settings.auth_enabled:
        console.print("bearer tokens for the demo's callers (valid 7 days; `Authorization: Bearer <token>`):")
        for role, subject, token in security_cli.demo_tokens(settings):
            console.print(f"  {role:<12} {subject}", soft_wrap=True)
            # On a line of its own, unstyled, so that it can be copied or cut out whole.
            print(f"    {token}")


db_app = typer.Typer(help="The database schema: upgrade it, or see where it stands.", no_args_is_help=True)


def _db_engine(data_dir: Path | None) -> tuple[Settings, Any]:
    settings = _settings(data_dir)
    try:
        settings.ensure_data_dir()
        engine = make_engine(
            settings.resolved_database_url(), connect_timeout=settings.db_connect_timeout_seconds
        )
        check_connection(engine)
    except ScanOnceError as exc:
        fail(exc)
    return settings, engine


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDir = None) -> None:
    """Apply the migrations this version has and the database lacks (all domains' branches).

    Safe to run twice (the second run has nothing to do) and from several places at once: on
    PostgreSQL an advisory lock lets one run migrate while the others wait, then find nothing
    left. Migrations only add (expand) while older nodes still serve."""
    settings, engine = _db_engine(data_dir)
    try:
        before = migrate(engine)
        after = schema_status(engine)
    finally:
        engine.dispose()
    where = safe_url(settings.resolved_database_url())
    if not before.pending:
        console.print(
            f"{where}: already at the newest schema ({', '.join(after.current)}); nothing to do",
            soft_wrap=True,
        )
        return
    console.print(
        f"{where}: applied {len(before.pending)} migration(s): {', '.join(before.pending)}; "
        f"now at {', '.join(after.current)}",
        soft_wrap=True,
    )


@db_app.command("status")
def db_status(data_dir: DataDir = None) -> None:
    """Where the schema stands: the revisions applied and those pending. Exits 1 while any is pending."""
    settings, engine = _db_engine(data_dir)
    try:
        status = schema_status(engine)
    finally:
        engine.dispose()
    console.print(f"database: {safe_url(settings.resolved_database_url())}", soft_wrap=True)
    console.print(f"current:  {', '.join(status.current) or '(empty: no migration applied)'}", soft_wrap=True)
    console.print(f"newest:   {', '.join(status.heads)}", soft_wrap=True)
    if status.up_to_date:
        console.print("up to date")
        return
    console.print(f"pending:  {', '.join(status.pending)}", soft_wrap=True)
    console.print("run `scanonce db upgrade` to apply them")
    raise typer.Exit(code=1)


def _register_domains() -> None:
    """Each domain contributes its own sub-commands."""
    app.add_typer(db_app, name="db")
    facilities_cli.register(app)
    facilities_cli.add_show_detail(federation_cli.studies_not_fetched)
    federation_cli.register(app)
    jobs_cli.register(app)
    index_cli.register(app)
    identity_cli.register(app)
    imports_cli.register(app)
    lookup_cli.register(app)
    web_cli.register(app)
    security_cli.register(app)
    audit_cli.register(app)


_register_domains()


if __name__ == "__main__":  # pragma: no cover
    app()
