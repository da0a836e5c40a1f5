"""FastAPI app factory: builds the state, wires each domain's implementations in, mounts the
routers and maps the one error hierarchy to responses.

The top layer: it may import every package. Lower layers never import it; where they need
something from a higher layer (ingest asks identity to link a patient; a read of a study held
only at its facility asks federation to fetch it), they declare a Protocol and this module hands
them the implementation through `AppState`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sqlalchemy import text
from sqlalchemy.exc import DataError, InterfaceError, OperationalError, PendingRollbackError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker.audit import service as audit_service
from broker.audit.http import AuditMiddleware
from broker.audit.routes import router as audit_router
from broker.cds.routes import router as cds_router
from broker.consent import service as consent_service
from broker.consent.routes import router as consent_router
from broker.db import (
    DatabaseUnreachable,
    check_connection,
    make_engine,
    migrate,
    require_current_schema,
    wait_for_database,
)
from broker.deps import AppState
from broker.dicomweb.routes import facility_router as dicomweb_facility_router
from broker.dicomweb.routes import router as dicomweb_router
from broker.dimse import access as dimse_access
from broker.dimse.handoff import WriterServer, is_single_writer
from broker.dimse.receivers import ReceiverSupervisor
from broker.dimse.receivers import shared_counts as receiver_counts
from broker.dimse.scp import index_batcher, start_scp, stop_scp
from broker.errors import BadRequest, InvalidSetting, RefusedToServe, ScanOnceError, Unavailable
from broker.facilities import service as facilities_service
from broker.facilities.routes import router as facilities_router
from broker.federation import service as federation_service
from broker.federation.routes import router as federation_router
from broker.federation.schedule import start_scheduler
from broker.fhir.routes import operation_outcome
from broker.fhir.routes import router as fhir_router
from broker.identity import service as identity_service
from broker.identity.adt import feed_principal
from broker.identity.mllp import start_mllp, stop_mllp
from broker.identity.routes import router as identity_router
from broker.imports import service as imports_service
from broker.imports.routes import router as imports_router
from broker.index import service as index_service
from broker.index import verify as index_verify
from broker.index.ingest import configure_parsing, start_parsing, stop_parsing
from broker.index.reaper import reap_periodically
from broker.index.routes import router as verify_router
from broker.jobs import service as jobs_service
from broker.jobs.routes import router as jobs_router
from broker.jobs.worker import start_worker_thread
from broker.logfilters import adopt_uvicorn_logging
from broker.lookup.routes import router as lookup_router
from broker.metrics import DB_ERRORS, DEPENDENCY_UP, STORAGE_ERRORS, ObservabilityMiddleware, render
from broker.security import network as outbound
from broker.security import tls as dimse_tls
from broker.security.http import AuthGuard
from broker.security.routes import router as security_router
from broker.security.tokens import Verifier, load_or_create_signing_key
from broker.settings import Settings, get_settings, unreachable_store
from broker.settings import load as load_settings
from broker.smart.routes import router as smart_router
from broker.web.routes import admin_router as web_admin_router
from broker.web.routes import pages_router as web_pages_router
from broker.web.routes import router as web_router
from storage import ObjectStore, StoreUnavailable, open_store

log = logging.getLogger("scanonce")


def build_state(settings: Settings, *, wait_for_db: bool = False) -> AppState:
    """The state every entry point shares. `wait_for_db` (what `scanonce serve` and `scanonce
    worker` use): a database that refuses connections is retried with backoff, with a clear
    message naming the setting, instead of failing at once (what a one-shot command does)."""
    settings.ensure_data_dir()
    engine = make_engine(
        settings.resolved_database_url(), connect_timeout=settings.db_connect_timeout_seconds
    )
    if wait_for_db:
        wait_for_database(engine, give_up_after=settings.db_start_wait_seconds)
    else:
        check_connection(engine)
    if settings.resolved_migrate_on_start():
        migrate(engine)
    else:
        require_current_schema(engine)
    _wire(settings)
    # Blocking keys from an older matching version: a durable job rebuilds them (one query if not).
    identity_service.ensure_keys_current(engine=engine)
    # Studies stored before the lookup's facts existed: a durable job computes them once.
    index_service.ensure_facts_current(engine=engine)
    # The matcher retrains itself as the records grow (identity.autotrain says when).
    identity_service.ensure_trained(engine=engine)
    facilities_service.ensure_default_facility(engine=engine, settings=settings)
    store = _open_store(settings.resolved_storage_url(), local_sync=settings.storage_sync)
    processes = settings.ingest_processes
    # "One per core" counts this process, which serves HTTP and writes the index, as one.
    auto = max(1, (os.cpu_count() or 1) - 1)
    configure_parsing(processes=auto if processes < 0 else processes)
    return AppState(settings=settings, engine=engine, store=store)


def build_receiver_state(settings: Settings) -> AppState:
    """A DIMSE receiver process's state (`broker.dimse.receivers`): the same database, store and
    wiring as the serving process, none of its start-up work (migrations, durable jobs, the
    default facility: the serving process did those before starting receivers), and parsing in
    the receiving process itself: the receiver processes are the parallelism, and a parse pool
    per receiver would only add processes competing for the same cores."""
    engine = make_engine(
        settings.resolved_database_url(), connect_timeout=settings.db_connect_timeout_seconds
    )
    wait_for_database(engine)
    require_current_schema(engine)
    _wire(settings)
    store = _open_store(settings.resolved_storage_url(), local_sync=settings.storage_sync)
    configure_parsing(processes=0)
    return AppState(settings=settings, engine=engine, store=store)


def _wire(settings: Settings) -> None:
    """What every process that serves (the serving process, each DIMSE receiver) wires in the
    same way, so that a receiver's C-STORE, C-FIND or C-MOVE behaves as the serving process's."""
    register_jobs()
    # Ingest links every new patient to a person: identity sits above the index, so it is wired in.
    index_service.set_patient_linker(identity_service.link_patients)
    # An import of a study held only at its facility fetches it first (federation, same layer).
    imports_service.set_fetcher(federation_service.ensure_local)
    # An audit event that names only a study (a WADO-RS read) gets its patient from the index.
    audit_service.set_study_resolver(index_service.study_patients)
    # ... and an access made under a break-the-glass grant is flagged BTG (consent knows grants).
    audit_service.set_emergency_marker(consent_service.mark_emergency_accesses)
    # Where the broker may connect on a caller's behalf (facility archives, EHRs, JWKS).
    outbound.configure(settings.outbound_allow_networks)
    dimse_tls.configure(settings)


def _open_store(url: str, *, local_sync: str = "fsync") -> ObjectStore:
    """The object store, or a clear error naming the setting (never a stack trace) when its URL is
    wrong or, asked to create its bucket, the store cannot be reached or refuses."""
    shown = url.split("?", 1)[0]  # the query may hold an endpoint; never credentials, but keep it short
    try:
        return open_store(url, local_sync=local_sync)
    except StoreUnavailable as exc:
        raise unreachable_store(url, exc.message) from exc
    except ValueError as exc:
        raise BadRequest(f"SCANONCE_STORAGE_URL is not a usable storage URL ({shown}): {exc}") from exc
    except OSError as exc:  # a local folder (S3's faults are botocore's own types)
        raise InvalidSetting(
            f"SCANONCE_STORAGE_URL {shown}: cannot use this folder ({exc.strerror}); check that setting "
            "and that the broker's user may write there"
        ) from exc
    except Exception as exc:  # botocore's ClientError: access denied, a bucket it may not create, ...
        said = " ".join(str(exc).split())[:200]  # botocore's text spans lines; the report is one
        raise Unavailable(
            f"the object store {shown} (SCANONCE_STORAGE_URL) refused: {type(exc).__name__}: "
            f"{said}; check that setting and the credentials (AWS_* variables)"
        ) from exc


def register_jobs() -> None:
    """Every domain's job kinds, explicitly (a worker runs what its process registered)."""
    index_service.register_jobs()
    federation_service.register_jobs()
    identity_service.register_jobs()
    imports_service.register_jobs()
    index_verify.register_jobs()


@asynccontextmanager
async def _services(app: FastAPI) -> AsyncIterator[None]:
    """The long-running parts of `scanonce serve` besides HTTP: the DIMSE and MLLP listeners and
    the background threads."""
    state: AppState = app.state.scanonce
    handle = None
    supervisor = None
    writer = None
    if state.settings.dimse_port:
        shared = receiver_counts(state.settings)
        handle = start_scp(state=state, shared=shared)
        if shared is not None:
            if is_single_writer(state.settings.resolved_database_url()):
                # SQLite: the receivers commit through this process's ingest writer.
                writer = WriterServer(state=state, batcher=partial(index_batcher, handle)).start()
            # The receivers bind the port the serving process bound (the same one even when
            # the setting asks for a free port, 0).
            supervisor = ReceiverSupervisor(
                settings=state.settings,
                host=handle.address[0],
                port=handle.port,
                count=state.settings.dimse_receivers,
                shared=shared,
                build=build_receiver_state,
                writer=writer.address if writer is not None else None,
            ).start()
    mllp = None
    if state.settings.mllp_port:
        mllp = start_mllp(
            engine=state.engine,
            principal=feed_principal(facility=state.settings.default_facility),
            host=state.settings.host,
            port=state.settings.mllp_port,
            processing_ids=state.settings.mllp_processing_ids,
        )
    stop = threading.Event()  # the job worker, the periodic index sync, the reaper
    start_worker_thread(engine=state.engine, store=state.store, settings=state.settings, stop=stop)
    start_scheduler(engine=state.engine, settings=state.settings, stop=stop)
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
            stop_mllp(mllp)
        if supervisor is not None:
            supervisor.stop()
        if writer is not None:
            writer.close()
        if handle is not None:
            stop_scp(handle)


def _lifespan(*, services: bool) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifetime: the parse worker pool always (spawned before the first request,
    shut down cleanly at the end), the network services under `scanonce serve`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Spawned, not waited for: the workers import while this process finishes starting.
        await asyncio.to_thread(start_parsing, wait=False)
        try:
            if services:
                async with _services(app):
                    yield
            else:
                yield
        finally:
            await asyncio.to_thread(stop_parsing)

    return lifespan


def _is_fhir(request: Request) -> bool:
    """Whether the request is to the FHIR interface, whose every error is an OperationOutcome."""
    path = request.url.path
    return path == "/fhir" or path.startswith("/fhir/")


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
        # broker.web serves /docs from its own copy of Swagger UI (the defaults load it, and
        # ReDoc, from public CDNs: blank pages offline).
        docs_url=None,
        redoc_url=None,
    )
    app.state.scanonce = state or build_state(settings, wait_for_db=services)

    @app.exception_handler(ScanOnceError)
    async def _scanonce_error(request: Request, exc: ScanOnceError) -> Response:
        if _is_fhir(request):
            return operation_outcome(exc.status_code, exc.message)
        return JSONResponse(status_code=exc.status_code, content={"error": exc.title, "detail": exc.message})

    @app.exception_handler(StoreUnavailable)
    async def _store_unavailable(_request: Request, exc: StoreUnavailable) -> JSONResponse:
        STORAGE_ERRORS.inc()
        return JSONResponse(
            status_code=503,
            content={"error": Unavailable.title, "detail": exc.message},
            headers={"Retry-After": _RETRY_AFTER},
        )

    @app.exception_handler(OSError)
    async def _os_error(_request: Request, exc: OSError) -> JSONResponse:
        if exc.errno not in _DISK_FULL:
            raise exc  # a fault of ours: the 500 and its traceback in the log, as before
        return _disk_full(exc.strerror)

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    # A connection cut under a request (its session terminated, PostgreSQL restarted) surfaces
    # as these too (tests/cluster cuts every session of the nodes while they serve).
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PendingRollbackError)
    async def _database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
        # The database refused, dropped or did not answer: nothing was committed, so the caller
        # may simply try again (a balancer sends it to a node whose /readyz is true meanwhile).
        if isinstance(exc, OperationalError) and "disk is full" in str(exc.orig):
            # SQLITE_FULL: the embedded database's disk, not a database that is away.
            return _disk_full("database or disk is full")
        DB_ERRORS.inc()
        log.warning("database unavailable: %s", type(exc).__name__)
        return JSONResponse(
            status_code=503,
            content={"error": Unavailable.title, "detail": "the database is unreachable; try again shortly"},
            headers={"Retry-After": _RETRY_AFTER},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _routing_error(request: Request, exc: StarletteHTTPException) -> Response:
        # The router's own answers (no such path, a method the path does not take) in the shape
        # of every other error: {"error": title, "detail": message}, Allow kept on a 405; on the
        # FHIR interface an OperationOutcome, as a FHIR client reads every error.
        detail = {
            404: "this server has no resource at this path",
            405: f"{request.method} is not allowed on this resource",
        }.get(exc.status_code, str(exc.detail))
        if _is_fhir(request):
            answer = operation_outcome(exc.status_code, detail)
            answer.headers.update(exc.headers or {})
            return answer
        return JSONResponse(
            status_code=exc.status_code,
            content={"error": HTTPStatus(exc.status_code).phrase.capitalize(), "detail": detail},
            headers=exc.headers,
        )

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError) -> Response:
        # PostgreSQL refuses a NUL in any text value; no record can carry one, so a request naming
        # one (an identifier, a name) is the client's mistake, as SQLite's "not found" says too.
        if "NUL" not in str(exc.orig):
            raise exc  # anything else a value does not fit is a fault of ours: the 500 and its log
        message = "a value of the request contains a NUL character, which no record can hold"
        if _is_fhir(request):
            return operation_outcome(400, message)
        return JSONResponse(status_code=400, content={"error": BadRequest.title, "detail": message})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        if _is_fhir(request):
            said = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in exc.errors()[:5] if e.get("loc"))
            return operation_outcome(400, said[:2000] or "invalid request")
        return JSONResponse(
            status_code=400, content={"error": "Bad request", "detail": str(exc.errors())[:2000]}
        )

    @app.get("/healthz", response_class=PlainTextResponse, include_in_schema=False)
    def healthz() -> str:
        return "ok"

    probe = StoreProbe(app.state.scanonce.store)

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        found = readiness(app.state.scanonce, probe)
        return JSONResponse(
            found.body(),
            status_code=200 if found.ready else 503,
            headers=None if found.ready else {"Retry-After": _RETRY_AFTER},
        )

    queue = jobs_service.QueueCollector(app.state.scanonce.engine)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        body, content_type = render([queue])
        return Response(body, media_type=content_type)

    verifier = None
    if settings.auth_enabled:
        key = load_or_create_signing_key(settings.resolved_signing_key_file())
        verifier = Verifier(settings=settings, signing_key=key, engine=app.state.scanonce.engine)
    app.state.auth = verifier
    # Added first, so it runs inside every middleware added later (CORS here; audit and metrics
    # middlewares must be added after it, so that they see the requests it refuses).
    app.add_middleware(AuthGuard, settings=settings, verifier=verifier)
    # Outside the guard: it sees the principal the guard set, and the 401s and 403s it answers.
    # It holds each response's start until the access's audit event has committed.
    engine = app.state.scanonce.engine
    app.add_middleware(
        AuditMiddleware, writer=audit_service.writer_for(engine) if settings.audit_enabled else None
    )
    _add_cors(app, settings.cors_origins)
    # Added last, so it is the outermost: every request (also one refused by the guard or
    # failing in CORS) gets its id and is counted. An audit middleware goes between the guard and
    # this one (after AuthGuard, before this line).
    app.add_middleware(ObservabilityMiddleware)
    _include_routers(app)
    return app


_RETRY_AFTER = "5"
# No space left on the device, or the user's disk quota reached.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def _disk_full(reason: str | None) -> JSONResponse:
    """507 for a request the disk filled up under: the spool, the object store's folder or the
    database's disk. What was committed before is whole (objects are placed before their rows:
    a large STOW-RS commits in groups), what was not is gone with its transaction; the sender
    re-sends all of it once space is freed, and what is stored answers as duplicates."""
    STORAGE_ERRORS.inc()
    log.error("request refused: the disk is full (%s)", reason)
    return JSONResponse(
        status_code=507,
        content={
            "error": "Insufficient storage",
            "detail": "the server's disk is full (no space left on device); free space, then "
            "send the request again (what it stored before the disk filled answers as duplicates)",
        },
    )


# How long /readyz waits for the object store's answer: below a balancer's check timeout
# (HAProxy's `timeout check`, 1 s in tests/cluster), so a stalled store is reported as degraded
# rather than making the check itself time out and take the node out.
_STORE_PROBE_SECONDS = 0.8


class StoreProbe:
    """One cheap object store request at a time (a listing under a prefix nothing uses: it fails
    if the bucket is missing, the credentials wrong or the endpoint away), waited for at most
    `_STORE_PROBE_SECONDS`. A probe still hanging is joined by the next check instead of a new
    one being started, so a stalled store does not pile up threads."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._pending: Future[str | None] | None = None

    def check(self) -> str | None:
        """None when the store answered, else what is wrong (naming the setting)."""
        with self._lock:
            pending = self._pending
            if pending is None:
                pending = self._pending = Future()
                threading.Thread(target=self._run, args=(pending,), daemon=True, name="readyz-store").start()
        try:
            return pending.result(timeout=_STORE_PROBE_SECONDS)
        except TimeoutError:
            STORAGE_ERRORS.inc()
            return "not answering (SCANONCE_STORAGE_URL)"

    def _run(self, done: Future[str | None]) -> None:
        problem: str | None = None
        try:
            for _ in self._store.list("readyz-probe/"):
                break
        except Exception:
            STORAGE_ERRORS.inc()
            problem = "unreachable (SCANONCE_STORAGE_URL)"
        with self._lock:
            self._pending = None
        done.set_result(problem)


@dataclass(frozen=True)
class Readiness:
    """What /readyz reports. Ready means "send me traffic": the database answers, and (unless
    `requires_store` is off) so does the object store. A store is shared by every node, so its
    fault is every node's: with `requires_store` off the nodes stay in the balancer for the reads
    the index alone answers (QIDO-RS, C-FIND, FHIR, the lookup); the store's state is reported in
    the body and `scanonce_dependency_up`, and what needs it (STOW-RS, C-STORE, WADO-RS) answers
    503 / 0xA700 meanwhile."""

    database: str | None  # None: reachable; else what is wrong
    object_store: str | None
    # SCANONCE_READYZ_REQUIRES_STORE: a single node (or an operator who wants it) goes out of
    # the balancer with its store; a fleet sharing one bucket stays in, degraded.
    requires_store: bool = True

    @property
    def ready(self) -> bool:
        return self.database is None and (self.object_store is None or not self.requires_store)

    def body(self) -> dict[str, str]:
        status = "not ready" if not self.ready else "degraded" if self.object_store else "ready"
        body = {
            "status": status,
            "database": self.database or "ok",
            "object_store": self.object_store or "ok",
        }
        if self.ready and self.object_store:
            body["detail"] = (
                "queries are answered; storing and retrieving objects answer 503 until the store is back"
            )
        return body


def readiness(state: AppState, probe: StoreProbe) -> Readiness:
    """The database (`SELECT 1`) and the object store (`probe`), each checked on every call."""
    database: str | None = None
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:
        DB_ERRORS.inc()
        database = "unreachable (SCANONCE_DATABASE_URL)"
    store = probe.check()
    DEPENDENCY_UP.labels("database").set(0 if database else 1)
    DEPENDENCY_UP.labels("object_store").set(0 if store else 1)
    return Readiness(
        database=database, object_store=store, requires_store=state.settings.readyz_requires_store
    )


# What a viewer's script must be able to read from a DICOMweb response (CORS exposes only the
# "safelisted" headers otherwise): multipart boundaries, sizes, ranges and PS3.18 warnings.
_EXPOSED_HEADERS = ["Content-Type", "Content-Length", "Content-Range", "Accept-Ranges", "Warning", "Location"]


def _add_cors(app: FastAPI, origins: list[str]) -> None:
    """CORS for viewers served from another origin (OHIF, a portal); off unless origins are set."""
    if not origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
        # Accept with multipart parameters, Range, and bearer tokens are not safelisted headers.
        allow_headers=["*"],
        expose_headers=_EXPOSED_HEADERS,
        max_age=600,
    )


def _include_routers(app: FastAPI) -> None:
    """Each domain's router is mounted here; one line per router."""
    app.include_router(facilities_router)
    app.include_router(federation_router)
    app.include_router(jobs_router)
    app.include_router(verify_router)
    app.include_router(imports_router)
    app.include_router(identity_router)
    app.include_router(consent_router)
    app.include_router(lookup_router)
    app.include_router(fhir_router)
    app.include_router(cds_router)
    app.include_router(dicomweb_router)
    app.include_router(dicomweb_facility_router)
    app.include_router(web_router)
    app.include_router(web_pages_router)
    app.include_router(web_admin_router)
    app.include_router(security_router)
    app.include_router(smart_router)
    app.include_router(audit_router)


def check_start(
    *,
    settings: Settings,
    bind_host: str | None,
    ports_free: Callable[[], None] | None = None,
    while_waiting: Callable[[], AbstractContextManager[object]] | None = None,
) -> None:
    """What every way of serving checks before it builds anything (`scanonce serve`, and
    `app_from_env` under uvicorn), so that a configuration one refuses the other refuses too, in
    the same line (a `ScanOnceError`; each reports it its own way). `bind_host`: the address HTTP
    listens on, None where this process cannot see it (uvicorn binds with its own --host).
    `ports_free`: the caller's check of the ports it binds itself, before any wait. A database that
    refuses connections is waited for (SCANONCE_DB_START_WAIT_SECONDS bounds it), inside
    `while_waiting` (serve answers not-ready on its port meanwhile)."""
    _auth_before_exposure(settings=settings, bind_host=bind_host)
    _dimse_before_exposure(settings)
    if ports_free is not None:
        ports_free()
    _database_at_start(settings=settings, while_waiting=while_waiting or nullcontext)


def _auth_before_exposure(*, settings: Settings, bind_host: str | None) -> None:
    """Authentication off beyond loopback would open every patient's images to the network."""
    if settings.auth_enabled:
        return
    if bind_host is None:
        # uvicorn's --host (or --fd, or a process manager's socket) is invisible to the factory:
        # only the operator can say it is loopback, and must, rather than be assumed to have.
        if settings.auth_off_accepted:
            return
        raise RefusedToServe(
            "authentication is off (SCANONCE_AUTH_ENABLED=false) and this process cannot see the "
            "address uvicorn listens on: set SCANONCE_AUTH_ENABLED=true (the default), or "
            "SCANONCE_AUTH_OFF_ACCEPTED=true if uvicorn binds loopback only."
        )
    if not outbound.is_loopback_host(bind_host):
        raise RefusedToServe(
            f"authentication is off (SCANONCE_AUTH_ENABLED=false) and HTTP would listen on {bind_host}, "
            "beyond loopback: set SCANONCE_AUTH_ENABLED=true (the default) or bind to 127.0.0.1."
        )


def _dimse_before_exposure(settings: Settings) -> None:
    """The node's DIMSE settings, whether or not this process runs the listener (the factory does
    not: one environment is then good for `scanonce serve` and the factory, or for neither). Its
    TLS files are loaded now, so that a wrong one is a line naming its setting, not a traceback
    from the listener's start; open mode takes any calling AE title, so it is loopback only."""
    if not settings.dimse_port:
        return
    dimse_tls.server_context(settings)
    refused = dimse_access.open_mode_refusal(settings, settings.host)
    if refused is not None:
        raise RefusedToServe(refused)


def _database_at_start(
    *, settings: Settings, while_waiting: Callable[[], AbstractContextManager[object]]
) -> None:
    """A database that refuses connections is retried (the log names the setting) until it answers
    or SCANONCE_DB_START_WAIT_SECONDS have passed; a URL that cannot be used at all, or a data
    folder that cannot be written, is refused at once: waiting would not mend either."""
    settings.ensure_data_dir()
    engine = make_engine(
        settings.resolved_database_url(), connect_timeout=settings.db_connect_timeout_seconds
    )
    try:
        try:
            check_connection(engine)
            return
        except DatabaseUnreachable:
            pass
        with while_waiting():
            wait_for_database(engine, give_up_after=settings.db_start_wait_seconds)
    finally:
        engine.dispose()


# uvicorn's exit status for "failed before serving": its supervisor (--workers N) then stops instead
# of restarting workers that would fail alike, forever (uvicorn.config.STARTUP_FAILURE).
_STARTUP_FAILURE = 3


def app_from_env() -> FastAPI:
    """App factory for process managers (`uvicorn --factory broker.app:app_from_env --workers N`,
    docs/production.md; `scanonce serve` itself has no --workers): settings from SCANONCE_*
    variables, and the start checks `scanonce serve` runs (`check_start`). A wrong setting (or
    anything else refused at start: a store, a key file, authentication off, a database still
    away after SCANONCE_DB_START_WAIT_SECONDS) is one line on stderr naming it, as `scanonce
    serve` says it, and exit status 3; raised, it would be uvicorn's traceback, once per worker
    and again for every worker it restarts."""
    try:
        settings = load_settings()
        adopt_uvicorn_logging(settings.log_format)
        check_start(settings=settings, bind_host=None)
        return create_app(settings)
    except ScanOnceError as exc:
        said = " ".join(exc.message.split())  # one line, whatever the message holds
        print(f"{exc.title}: {said}", file=sys.stderr, flush=True)
        raise SystemExit(_STARTUP_FAILURE) from None
