"""`scanonce verify`: the integrity check of index and object store (broker/index/verify.py).
`register(app)` adds it to the main command."""

from __future__ import annotations

from typing import Annotated

import typer

from broker.clikit import DataDir, console, fail, progress, state
from broker.index import verify as index_verify
from broker.settings import unreachable_store
from storage import StoreUnavailable


def verify(
    data_dir: DataDir = None,
    facility: Annotated[
        str | None, typer.Option("--facility", help="Check this facility's instances only (no orphan walk).")
    ] = None,
    sample: Annotated[
        int | None, typer.Option("--sample", min=1, help="Check a random sample of this many instances.")
    ] = None,
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Re-index orphans that parse; mark missing and changed instances."),
    ] = False,
    min_age: Annotated[
        float, typer.Option("--min-age", min=0, help="Seconds: younger objects are never called orphans.")
    ] = 60,
    as_job: Annotated[
        bool, typer.Option("--job", help="Queue it for a worker instead of running it here.")
    ] = False,
) -> None:
    """Walk index and object store: instances whose object is missing or whose SHA-256 changed,
    and objects no instance names (orphans). Exits 1 unless all is well (after --repair: while
    something is missing or changed, or an orphan could not be indexed again)."""
    st = state(data_dir)
    if as_job:
        job = index_verify.enqueue_verify(
            engine=st.engine,
            facility=facility,
            sample=sample,
            repair=repair,
            min_age=min_age,
            default_facility=st.settings.default_facility,
        )
        console.print(f"queued job {job.id}: `scanonce jobs show {job.id}` follows it")
        return
    try:
        with progress() as bar:
            task = bar.add_task("verifying", total=None)

            def show(done: int, total: int | None, message: str) -> None:
                bar.update(task, completed=done, total=total, description=message)

            report = index_verify.verify(
                engine=st.engine,
                store=st.store,
                facility=facility,
                sample=sample,
                repair=repair,
                min_age=min_age,
                default_facility=st.settings.default_facility,
                listener=show,
            )
    except StoreUnavailable as exc:  # nothing verified: not "all is well", and not a traceback
        fail(unreachable_store(st.store.url, exc.message))
    console.print(report.summary(), soft_wrap=True)
    for kind, keys in sorted(report.examples.items()):
        for key in keys:
            console.print(f"  {kind}: {key}", soft_wrap=True, highlight=False)
    unresolved = (
        report.missing or report.mismatch or (report.orphans - report.reindexed if repair else report.orphans)
    )
    if unresolved:
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
