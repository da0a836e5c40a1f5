"""The plumbing every `scanonce` sub-command shares, declared once: the data-dir option, the
consoles, one way to fail, one progress bar, and one way to build the application state.

The rules: a refused operation (a `ScanOnceError` below 500: bad input, not found, conflict)
prints its title and message on stderr and exits 1; a usage error exits 2 (typer's own rule for
bad options, kept for ours); a failure of something the broker depends on (5xx) exits 1 too, since
to a script it is equally "not done". Domain CLI modules import this module and nothing above
their own layer; `broker.cli` wires in how to build the state (`set_state_builder`), because that
needs the app factory, which sits above every domain.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from broker.errors import ScanOnceError
from broker.settings import Settings, load

if TYPE_CHECKING:
    from broker.deps import AppState

console = Console()
err_console = Console(stderr=True)

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="Data directory (default: $SCANONCE_DATA_DIR or ./data).")
]

EXIT_REFUSED = 1
EXIT_USAGE = 2

_builder: Callable[..., AppState] | None = None


def set_state_builder(builder: Callable[..., AppState]) -> None:
    global _builder
    _builder = builder


def settings(data_dir: Path | None, **overrides: object) -> Settings:
    """SCANONCE_* settings, with the options given on the command line on top; one that is wrong
    is reported, naming it, and exits 1."""
    values: dict[str, object] = {k: v for k, v in overrides.items() if v is not None}
    if data_dir is not None:
        values["data_dir"] = data_dir
    try:
        return load(**values)
    except ScanOnceError as exc:
        fail(exc)


def state(
    data_dir: Path | None = None, *, from_settings: Settings | None = None, wait_for_db: bool = False
) -> AppState:
    """The same state `scanonce serve` builds (migrated index, object store, job kinds). A database
    that cannot be reached, or whose schema is behind, is reported (naming the setting or the
    command to run) and exits 1; with `wait_for_db` (long-running commands) it is retried."""
    if _builder is None:  # pragma: no cover - a domain CLI used without broker.cli
        raise RuntimeError("broker.cli has not wired in the state builder")
    try:
        return _builder(from_settings or settings(data_dir), wait_for_db=wait_for_db)
    except ScanOnceError as exc:
        fail(exc)


def fail(exc: ScanOnceError) -> NoReturn:
    """Report a refused operation on stderr, on one line however long (a log or a script reads
    it whole; a terminal wraps it), and exit 1."""
    err_console.print(f"[red]{exc.title}:[/] {escape(exc.message)}", soft_wrap=True)
    raise typer.Exit(code=EXIT_REFUSED)


def usage_error(message: str) -> NoReturn:
    err_console.print(f"[red]Usage error:[/] {message}")
    raise typer.Exit(code=EXIT_USAGE)


def print_table(table: Table) -> None:
    """A table is never cut: on a terminal its cells fold within the terminal's width; into a
    pipe or a file it is printed at its full width (rich would assume 80 columns there)."""
    for column in table.columns:
        column.overflow = "fold"
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update(width=100_000), table).maximum
    # A console of its own: print(width=) can only narrow the console's assumed 80 columns.
    Console(file=console.file, width=max(natural, console.width)).print(table)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
