"""`scanonce web install`: fetch the pinned browser assets (OHIF Viewer, Swagger UI) the broker serves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from broker.clikit import console, fail
from broker.clikit import settings as _settings
from broker.errors import ScanOnceError
from broker.web import assets

web_app = typer.Typer(help="The pages the broker serves to a browser.", no_args_is_help=True)


@web_app.command("install")
def install(
    viewer_dir: Annotated[
        Path | None,
        typer.Option(help="Where to put them (default: $SCANONCE_VIEWER_DIR or .cache/web in the clone)."),
    ] = None,
    lock: Annotated[
        Path | None,
        typer.Option(help="Another lock file of the same form (the browser tests' tests/web/assets.lock)."),
    ] = None,
) -> None:
    """Fetch the pinned OHIF Viewer, Swagger UI and htmx from the npm registry, check their sha256 and
    unpack them (safe to run twice: an installed version is kept)."""
    root = viewer_dir or _settings(None).resolved_viewer_dir()
    try:
        for pin in (assets.pins(lock) if lock else assets.pins()).values():
            path, done = assets.install(root=root, pin=pin)
            what = "installed" if done else "already installed"
            console.print(f"{pin.name}@{pin.version} {what} in {path}", soft_wrap=True)
    except ScanOnceError as exc:
        fail(exc)


def register(app: typer.Typer) -> None:
    """Add `web` to the main command."""
    app.add_typer(web_app, name="web")
