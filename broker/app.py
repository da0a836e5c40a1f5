"""FastAPI app factory: state, routers, error handlers."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from broker.db import make_engine, migrate
from broker.deps import AppState
from broker.errors import ScanOnceError
from broker.federation import service as federation_service
from broker.settings import Settings, get_settings
from storage import open_store

log = logging.getLogger("scanonce")


def build_state(settings: Settings) -> AppState:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url())
    migrate(engine)
    from broker.identity.service import ensure_keys_current

    # Blocking keys from an older matching version: a durable job rebuilds them (one query if not).
    ensure_keys_current(engine=engine)
    federation_service.ensure_default_facility(engine=engine, settings=settings)
    store = open_store(settings.resolved_storage_url())
    from broker.index.ingest import configure_parsing

    processes = settings.ingest_processes
    # "One per core" counts this process, which serves HTTP and writes the index, as one.
    auto = max(1, (os.cpu_count() or 1) - 1)
    configure_parsing(processes=auto if processes < 0 else processes)
    return AppState(settings=settings, engine=engine, store=store)


@asynccontextmanager
async def _services(app: FastAPI) -> AsyncIterator[None]:
    """The long-running parts of `scanonce serve` besides HTTP: the DIMSE and MLLP listeners and
    the background threads."""
    state: AppState = app.state.scanonce
    handle = None
    if state.settings.dimse_port:
        from broker.dimse.scp import start_scp

        handle = start_scp(state=state)
    mllp = None
    if state.settings.mllp_port:
        from broker.identity.mllp import start_mllp

        mllp = start_mllp(engine=state.engine, host=state.settings.host, port=state.settings.mllp_port)
    import threading

    from broker.federation.background import start_background

    stop = threading.Event()  # the job worker, the periodic index sync, the reaper
    start_background(engine=state.engine, store=state.store, settings=state.settings, stop=stop)
    from broker.index.reaper import reap_periodically

    # Crash residue of an earlier run (spool files, objects without a row): at start-up, then
    # periodically, in the background (listing a large bucket takes a while).
    threading.Thread(
        target=reap_periodically,
        kwargs={
            "engine": state.engine,
            "store": state.store,
            "data_dir": state.settings.data_dir,
            "grace_seconds": state.settings.reap_grace_seconds,
            "interval_seconds": state.settings.reap_interval_seconds,
            "stop": stop,
        },
        name="scanonce-reaper",
        daemon=True,
    ).start()
    try:
        yield
    finally:
        stop.set()
        if mllp is not None:
            from broker.identity.mllp import stop_mllp

            stop_mllp(mllp)
        if handle is not None:
            from broker.dimse.scp import stop_scp

            stop_scp(handle)


def _lifespan(*, services: bool) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifetime: the parse worker pool always (started before the first request,
    shut down cleanly at the end), the network services under `scanonce serve`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from broker.index.ingest import start_parsing, stop_parsing

        await asyncio.to_thread(start_parsing)
        try:
            if services:
                async with _services(app):
                    yield
            else:
                yield
        finally:
            await asyncio.to_thread(stop_parsing)

    return lifespan


def create_app(
    settings: Settings | None = None, state: AppState | None = None, *, services: bool = False
) -> FastAPI:
    """The HTTP app. `services=True` (what `scanonce serve` does) also runs the DIMSE SCP and the
    HL7 MLLP listener for the app's lifetime; tests and embedders start what they need themselves."""
    settings = settings or (state.settings if state else get_settings())
    app = FastAPI(
        title="ScanOnce",
        version="0.1.0",
        description="Inter-facility image-sharing broker: find the prior before you scan again.",
        lifespan=_lifespan(services=services),
    )
    app.state.scanonce = state or build_state(settings)

    @app.exception_handler(ScanOnceError)
    async def _scanonce_error(_request: Request, exc: ScanOnceError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"error": exc.title, "detail": exc.message})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            status_code=400, content={"error": "Bad request", "detail": str(exc.errors())[:2000]}
        )

    @app.get("/healthz", response_class=PlainTextResponse, include_in_schema=False)
    def healthz() -> str:
        return "ok"

    @app.get("/readyz", response_class=PlainTextResponse, include_in_schema=False)
    def readyz() -> str:
        from sqlalchemy import text

        with app.state.scanonce.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ready"

    _include_routers(app)
    return app


def _include_routers(app: FastAPI) -> None:
    """Each domain's router is mounted here; one line per router."""
    from broker.dicomweb.routes import facility_router as dicomweb_facility_router
    from broker.dicomweb.routes import router as dicomweb_router
    from broker.federation.routes import router as federation_router
    from broker.identity.routes import router as identity_router
    from broker.jobs.routes import router as jobs_router

    app.include_router(federation_router)
    app.include_router(jobs_router)
    app.include_router(identity_router)
    app.include_router(dicomweb_router)
    app.include_router(dicomweb_facility_router)


def app_from_env() -> FastAPI:
    """App factory for process managers (`uvicorn --factory broker.app:app_from_env`, and each
    HTTP worker of `scanonce serve --workers N`): settings from SCANONCE_* variables."""
    return create_app(Settings())
