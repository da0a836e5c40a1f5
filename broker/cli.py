"""The `scanonce` command: serve, demo, ingest, facility, jobs, and the domains' sub-commands."""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import shutil
import socket
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from rich.table import Table

from broker import clikit
from broker.app import build_state, create_app
from broker.audit import cli as audit_cli
from broker.clikit import DataDir, console
from broker.clikit import progress as _progress
from broker.clikit import settings as _settings
from broker.demo import service as demo_service
from broker.deps import AppState
from broker.dimse import access as dimse_access
from broker.facilities import cli as facilities_cli
from broker.federation import cli as federation_cli
from broker.identity import cli as identity_cli
from broker.imports import cli as imports_cli
from broker.index import service
from broker.jobs import cli as jobs_cli
from broker.logfilters import redact_access_log
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
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    redact_access_log()
    _auth_before_exposure(settings)
    _dimse_before_exposure(settings)
    _ports_free(settings)
    application = create_app(settings, services=True)
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
        if settings.dimse_port
        else "",
        f"  HL7 MLLP:  {settings.host}:{settings.mllp_port}  (ADT identity feed)"
        if settings.mllp_port
        else "",
        f"  data:      {settings.data_dir.resolve()}",
    ):
        if line:
            console.print(line, soft_wrap=True)
    uvicorn.run(application, host=settings.host, port=settings.port, log_level=log_level.lower())


def _auth_before_exposure(settings: Settings) -> None:
    """Binding beyond loopback with authentication off would open every patient's images to the
    network: refuse, in one line that says how to proceed."""
    if settings.auth_enabled or _is_loopback(settings.host):
        return
    clikit.err_console.print(
        f"[red]Refusing to serve on {settings.host} with authentication off:[/] set "
        "SCANONCE_AUTH_ENABLED=true (the default) or bind to 127.0.0.1.",
        soft_wrap=True,
    )
    raise typer.Exit(code=clikit.EXIT_REFUSED)


def _dimse_before_exposure(settings: Settings) -> None:
    """Open DIMSE mode takes any calling AE title: refuse it on a listener beyond loopback."""
    refused = dimse_access.open_mode_refusal(settings, settings.host) if settings.dimse_port else None
    if refused is None:
        return
    clikit.err_console.print(f"[red]Refusing to serve:[/] {refused}", soft_wrap=True)
    raise typer.Exit(code=clikit.EXIT_REFUSED)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        table.columns[0].overflow = "fold"
        for name, why in failures[:200]:
            table.add_row(name, why)
        console.print(table)
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


def _register_domains() -> None:
    """Each domain contributes its own sub-commands."""
    facilities_cli.register(app)
    facilities_cli.add_show_detail(federation_cli.studies_not_fetched)
    federation_cli.register(app)
    jobs_cli.register(app)
    identity_cli.register(app)
    imports_cli.register(app)
    lookup_cli.register(app)
    web_cli.register(app)
    security_cli.register(app)
    audit_cli.register(app)


_register_domains()


if __name__ == "__main__":  # pragma: no cover
    app()
