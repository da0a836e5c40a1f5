"""PS3.18 Studies Service over HTTP: STOW-RS, QIDO-RS, WADO-RS.

One router per service, each a set of thin handlers (parse, run the blocking work in a worker
thread, shape the response) over the named steps above it:

- `stow_router`: Store (PS3.18 10.5), `POST studies[/{study}]`;
- `qido_router`: Search (10.6), `studies`, `series`, `instances` and their study/series forms;
- `wado_router`: Retrieve (10.4) of instances, metadata, bulk data and frames;
- `rendered_router`: Retrieve of rendered images and thumbnails (10.4, 8.3.5).

`make_router` mounts them under one prefix, twice: federation-wide at `/dicom-web` and per
facility at `/facilities/{facility}/dicom-web` (the partition a facility pushes into and may
query alone).

A UID in the path that is not a UID is answered per transaction (docs/conformance.md 2.8): a
Retrieve names a resource that does not exist (404); a Search or a Store was sent a malformed
key (400), the same answer a Search gives for that UID as a query parameter.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from broker.audit.service import IngestAuditHook
from broker.consent import service as consent_service
from broker.deps import PrincipalDep, StateDep
from broker.dicom.uids import is_valid_uid, require_uid
from broker.dicomweb import qido, stow, wado
from broker.dicomweb.multipart import (
    ReceivedParts,
    new_boundary,
    receive_parts,
    related_request,
    related_stream,
)
from broker.errors import BadRequest, NotAcceptable, NotFound, PayloadTooLarge
from broker.facilities import service as facilities_service
from broker.federation import service as federation_service
from broker.index import service as index_service
from broker.index.schemas import InstanceRef, Level, Query, QueryResult, StoreOutcome
from broker.security.schemas import Principal

DICOM_JSON = "application/dicom+json"
T = TypeVar("T")

# ================================================================================ shared steps

# ---------------------------------------------------------------------------- scope


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a DICOMweb request looks and what its URLs are relative to."""

    facility_id: str | None  # None: federation-wide
    base: str  # this service's root URL, e.g. http://host/facilities/a/dicom-web
    state: Any  # broker.deps.AppState
    principal: Principal


def get_scope(request: Request, state: StateDep, principal: PrincipalDep) -> Scope:
    """Federation-wide, or the facility named in the path (404 when it does not exist)."""
    facility = request.path_params.get("facility")
    if facility is not None:
        with Session(state.engine) as session:
            facilities_service.get_facility(session=session, facility_id=facility)
        suffix = f"/facilities/{facility}/dicom-web"
    else:
        suffix = "/dicom-web"
    origin = state.settings.base_url or str(request.base_url)
    return Scope(facility, origin.rstrip("/") + suffix, state, principal)


ScopeDep = Annotated[Scope, Depends(get_scope)]

# ---------------------------------------------------------------------------- UIDs in paths


def _target_uids(study: str, series: str | None = None, instance: str | None = None) -> None:
    """Retrieve: a UID that is not a UID names no resource: 404 (PS3.18 8.5, "the target resource
    does not exist"), before anything can turn it into a key or a query."""
    for value, what in (
        (study, "StudyInstanceUID"),
        (series, "SeriesInstanceUID"),
        (instance, "SOPInstanceUID"),
    ):
        if value is not None and not is_valid_uid(value):
            raise NotFound(f"no such resource: {what} is not a valid DICOM UID: {value[:80]!r}")


def _key_uids(study: str | None, series: str | None = None) -> None:
    """Search and Store: a path UID is a key of the request (a Search matches it as it would the
    query parameter; a Store checks each instance against it), and a key that is not a UID is
    bad syntax: 400 (PS3.18 10.5.3 and 10.6.3)."""
    if study is not None:
        require_uid(study, "StudyInstanceUID")
    if series is not None:
        require_uid(series, "SeriesInstanceUID")


def _has_encoded_slash(request: Request) -> bool:
    """A `%2F` inside a path segment is part of a UID, and no UID holds a slash; the server decodes
    it before routing, so `studies/1.2%2Fseries%2F3` would otherwise be served as series 3 of
    study 1.2."""
    raw = request.scope.get("raw_path") or b""
    return b"%2f" in raw.lower()


def _no_encoded_slash_in_target(request: Request) -> None:
    if _has_encoded_slash(request):
        raise NotFound("no such resource: a DICOM UID in a path never contains '/' (%2F)")


def _no_encoded_slash_in_keys(request: Request) -> None:
    if _has_encoded_slash(request):
        raise BadRequest("a DICOM UID in a path never contains '/' (%2F)")


# ---------------------------------------------------------------------------- responses


def _warning(base: str, text: str) -> str:
    # PS3.18 8.3.4.2 form: Warning: 299 <service>: <text>. Header values must stay ASCII.
    return f"299 {base}: {text}".encode("ascii", "replace").decode("ascii")


def _streamed(request: Request, body: Callable[[], Iterator[bytes]], *, media_type: str) -> StreamingResponse:
    """A streamed (multipart or JSON) response; HEAD gets its status and headers without the body
    being produced (no instance is read or transcoded for it)."""
    if request.method == "HEAD":
        return StreamingResponse(iter(()), media_type=media_type)
    return StreamingResponse(body(), media_type=media_type)


def _multipart(
    request: Request, parts: Callable[[], Iterable[tuple[str, Iterable[bytes]]]], *, part_type: str
) -> StreamingResponse:
    """`multipart/related; type="{part_type}"`, streamed (nothing produced for HEAD)."""
    boundary = new_boundary()
    return _streamed(
        request,
        lambda: related_stream(parts(), boundary=boundary),
        media_type=f'multipart/related; type="{part_type}"; boundary={boundary}',
    )


async def _primed_multipart(
    request: Request, parts: Callable[[], Iterable[tuple[str, Iterable[bytes]]]], *, part_type: str
) -> StreamingResponse:
    """As `_multipart`, but the body's first write (which opens the first object, and the next
    ones up to the write size) is produced before the status goes out: an object store that is
    down then gets a 503 the client can retry, not a 200 whose body breaks off after the headers.
    Later objects are still read as the body streams."""
    if request.method == "HEAD":
        return _multipart(request, parts, part_type=part_type)
    boundary = new_boundary()
    body = related_stream(parts(), boundary=boundary)
    first = await run_in_threadpool(next, body, None)
    return StreamingResponse(
        itertools.chain(() if first is None else (first,), body),
        media_type=f'multipart/related; type="{part_type}"; boundary={boundary}',
    )


async def _single_part(request: Request, body: wado.SinglePart) -> Response:
    """A single-part body, honouring one byte range (RFC 9110 14): 206 with Content-Range, 416
    when the range starts past the end; several ranges or another unit get the whole body. A
    Range under If-Range is answered in full: there is no validator to compare it with."""
    headers = {"Accept-Ranges": "bytes"}
    status = 200
    start, end = 0, body.size
    # RFC 9110 14.2: Range is defined for GET only; under If-Range there is no validator to compare.
    ranged = request.method == "GET" and "if-range" not in request.headers
    wanted = request.headers.get("range") if ranged else None
    asked = wado.byte_range(wanted, body.size)
    if asked is not None and not asked:
        return Response(
            status_code=416, headers={"Content-Range": f"bytes */{body.size}", "Accept-Ranges": "bytes"}
        )
    if asked is not None:
        start, end = asked.start, asked.stop
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{body.size}"
    headers["Content-Length"] = str(end - start)
    # Opening a ranged read may be a blocking object-store request: not on the event loop.
    chunks: Iterable[bytes] = (
        () if request.method == "HEAD" else await run_in_threadpool(body.read, start, end)
    )
    return StreamingResponse(iter(chunks), status_code=status, media_type=body.content_type, headers=headers)


def _get_and_head(
    router: APIRouter, path: str, summary: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """GET, and HEAD with the same handler (the same status and headers, no body; PS3.18
    8.4 and RFC 9110 9.3.2); HEAD stays out of the OpenAPI document."""

    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        router.add_api_route(path, endpoint, methods=["GET"], summary=summary)
        router.add_api_route(path, endpoint, methods=["HEAD"], summary=summary, include_in_schema=False)
        return endpoint

    return register


# ---------------------------------------------------------------------------- index reads


def _in_session(scope: Scope, fn: Callable[..., T], **kwargs: Any) -> T:
    with Session(scope.state.engine, expire_on_commit=False) as session:
        return fn(session=session, **kwargs)


def _visible_search(session: Session, *, query: Query, principal: Principal) -> QueryResult:
    """The index's answer with only the records the caller may see (consent, purpose of use)."""
    query.visible = consent_service.visibility(principal=principal)
    return index_service.search(session=session, query=query)


async def _local_or_fetched(scope: Scope, study: str, fn: Callable[..., T], **kwargs: Any) -> T:
    """Run an index read; if the study is known only from a facility's archive (index sync,
    pixels still at home), fetch it once from there and read again (retrieve on demand).
    A read of a whole study or series also fetches when the broker holds only part of it (a
    fetch that left instances missing): its answer is the whole, or the fetch's Unavailable
    saying what is missing, never a silent part. A study the caller may not see is answered as
    one the index does not hold (404), before anything is read or fetched."""
    check = partial(
        _in_session, scope, consent_service.check_study, principal=scope.principal, study_uid=study
    )
    await run_in_threadpool(check)
    read = partial(_in_session, scope, fn, study_uid=study, **kwargs)
    remote = partial(_in_session, scope, federation_service.is_remote_only, study_uid=study)

    def read_whole(*, session: Session) -> tuple[T, bool]:
        found = fn(session=session, study_uid=study, **kwargs)
        # An instance the broker holds is whole, whatever else of its study is missing.
        whole = kwargs.get("sop_uid") is not None or not federation_service.is_remote_only(
            session=session, study_uid=study
        )
        return found, whole

    try:
        found, whole = await run_in_threadpool(_in_session, scope, read_whole)
    except NotFound:
        if not await run_in_threadpool(remote):
            raise
    else:
        if whole:
            return found
    fetch = partial(
        federation_service.ensure_local, engine=scope.state.engine, store=scope.state.store, study_uid=study
    )
    await run_in_threadpool(fetch)
    return await run_in_threadpool(read)


async def _refs(
    scope: Scope, study: str, series: str | None = None, instance: str | None = None
) -> list[InstanceRef]:
    _target_uids(study, series, instance)
    return await _local_or_fetched(
        scope,
        study,
        index_service.find_instances,
        series_uid=series,
        sop_uid=instance,
        facility_id=scope.facility_id,
    )


# ================================================================================ STOW-RS

stow_router = APIRouter(dependencies=[Depends(_no_encoded_slash_in_keys)])


def _within_request_limit(content_length: str | None, limit: int) -> None:
    """413 before reading a body whose announced size is above the limit (a chunked body is
    counted as it arrives instead)."""
    if content_length is None:
        return
    try:
        size = int(content_length)
    except ValueError as exc:
        raise BadRequest("Content-Length is not a number") from exc
    if size > limit:
        raise PayloadTooLarge(f"the request body ({size} bytes) exceeds the limit of {limit} bytes")


async def _receive_and_store(
    request: Request, scope: Scope, *, boundary: str, declared: str, study: str | None
) -> list[StoreOutcome]:
    """Receive every part within the limits, then ingest them all; a request above a limit is
    refused whole (413) and stores nothing."""
    settings = scope.state.settings
    _within_request_limit(request.headers.get("content-length"), settings.stow_max_request_bytes)
    async with ReceivedParts() as received:
        # Parts land beside the object store (data_dir/spool), so ingest can move them into
        # place instead of copying.
        spool = settings.data_dir / "spool"
        spool.mkdir(parents=True, exist_ok=True)
        await receive_parts(
            request.stream(),
            boundary=boundary,
            max_part_bytes=settings.max_part_bytes,
            into=received,
            tmp_dir=str(spool),
            max_total_bytes=settings.stow_max_request_bytes,
            max_parts=settings.stow_max_parts,
        )
        # The store's audit event commits with its rows (no store without its event); the audit
        # middleware then writes none of its own for this request.
        client = request.client.host if request.client else ""
        hook = IngestAuditHook(principal=scope.principal, interface="dicomweb", client_address=client)

        def items_and_store() -> list[StoreOutcome]:
            # One hop to a thread for both steps (each hop wakes a thread through the GIL).
            items = stow.items_of(received.parts, declared=declared, received=received, tmp_dir=str(spool))
            return stow.store_items(
                items,
                engine=scope.state.engine,
                store=scope.state.store,
                principal=scope.principal,
                facility_id=scope.facility_id or settings.default_facility,
                expected_study_uid=study,
                audit=hook if settings.audit_enabled else None,
            )

        outcomes = await run_in_threadpool(items_and_store)
        request.state.audit_recorded = hook.ran
        return outcomes


def _store_response(scope: Scope, outcomes: list[StoreOutcome], study: str | None) -> Response:
    """The Store Instances Response (PS3.18 10.5.3), the first 20 failures also as Warnings."""
    code, body = stow.store_response(outcomes, base=scope.base, url_study=study)
    response = Response(orjson.dumps(body), status_code=code, media_type=DICOM_JSON)
    failed = [(i, o) for i, o in enumerate(outcomes) if not o.ok]
    for i, o in failed[:20]:
        response.headers.append("Warning", _warning(scope.base, f"instance {i + 1}: {o.message}"[:300]))
    return response


async def store(request: Request, scope: Scope, study: str | None) -> Response:
    _key_uids(study)
    wado.negotiate_json(request.headers.get("accept"))
    declared, boundary = related_request(
        request.headers.get("content-type"), part_types=("application/dicom", stow.DICOM_JSON)
    )
    outcomes = await _receive_and_store(request, scope, boundary=boundary, declared=declared, study=study)
    return _store_response(scope, outcomes, study)


@stow_router.post("/studies", summary="STOW-RS: store instances")
async def store_instances(request: Request, scope: ScopeDep) -> Response:
    return await store(request, scope, None)


@stow_router.post("/studies/{study}", summary="STOW-RS: store instances of one study")
async def store_study_instances(request: Request, scope: ScopeDep, study: str) -> Response:
    return await store(request, scope, study)


# ================================================================================ QIDO-RS

qido_router = APIRouter(dependencies=[Depends(_no_encoded_slash_in_keys)])


async def search(
    request: Request, scope: Scope, level: Level, study: str | None = None, series: str | None = None
) -> Response:
    _key_uids(study, series)
    settings = scope.state.settings
    parsed = qido.parse_query(
        request.url.query,
        level=level,
        default_limit=settings.qido_default_limit,
        max_limit=settings.qido_max_limit,
        study_uid=study,
        series_uid=series,
        facility_id=scope.facility_id,
        retrieve_base=scope.base,
    )
    wado.negotiate_json(parsed.accept if parsed.accept is not None else request.headers.get("accept"))
    qido.negotiate_charset(parsed.charset)
    result = await run_in_threadpool(
        _in_session, scope, _visible_search, query=parsed.query, principal=scope.principal
    )
    warnings = list(parsed.warnings)
    warnings += [w if w.endswith(".") else w + "." for w in result.warnings]
    if result.more:
        # PS3.18 8.3.4.4.1: remaining matches are announced in a Warning header.
        warnings.append("There are additional results that can be requested.")
    if result.matches:
        response = Response(orjson.dumps(result.matches), media_type=DICOM_JSON)
    else:
        # PS3.18 8.3.4.4.1: no results -> 204 (No Content).
        response = Response(status_code=204)
    for text in warnings:
        response.headers.append("Warning", _warning(scope.base, text))
    return response


@_get_and_head(qido_router, "/studies", "QIDO-RS: search for studies")
async def search_studies(request: Request, scope: ScopeDep) -> Response:
    return await search(request, scope, "study")


@_get_and_head(qido_router, "/series", "QIDO-RS: search for series")
async def search_series(request: Request, scope: ScopeDep) -> Response:
    return await search(request, scope, "series")


@_get_and_head(qido_router, "/instances", "QIDO-RS: search for instances")
async def search_instances(request: Request, scope: ScopeDep) -> Response:
    return await search(request, scope, "instance")


@_get_and_head(qido_router, "/studies/{study}/series", "QIDO-RS: search for series of a study")
async def search_study_series(request: Request, scope: ScopeDep, study: str) -> Response:
    return await search(request, scope, "series", study)


@_get_and_head(qido_router, "/studies/{study}/instances", "QIDO-RS: search for instances of a study")
async def search_study_instances(request: Request, scope: ScopeDep, study: str) -> Response:
    return await search(request, scope, "instance", study)


@_get_and_head(
    qido_router, "/studies/{study}/series/{series}/instances", "QIDO-RS: search for instances of a series"
)
async def search_series_instances(request: Request, scope: ScopeDep, study: str, series: str) -> Response:
    return await search(request, scope, "instance", study, series)


# ================================================================================ WADO-RS

wado_router = APIRouter(dependencies=[Depends(_no_encoded_slash_in_target)])
rendered_router = APIRouter(dependencies=[Depends(_no_encoded_slash_in_target)])


# ---------------------------------------------------------------------------- instances


async def retrieve(
    request: Request, scope: Scope, study: str, series: str | None, instance: str | None
) -> Response:
    refs = await _refs(scope, study, series, instance)
    plan = wado.negotiate_instances(request.headers.get("accept"), refs, allow_single=instance is not None)
    if plan.single_part:
        (delivery,) = plan.deliveries
        body = await run_in_threadpool(wado.single_instance, scope.state.store, delivery)
        return await _single_part(request, body)
    response = await _primed_multipart(
        request, lambda: wado.instance_parts(scope.state.store, plan.deliveries), part_type=wado.DICOM
    )
    if plan.partial:
        # PS3.18 10.4.3: some instances could not be returned as asked -> 206 and say which.
        response.status_code = 206
        response.headers.append("Warning", _warning(scope.base, wado.partial_warning(plan)))
    return response


@_get_and_head(wado_router, "/studies/{study}", "WADO-RS: retrieve a study")
async def retrieve_study(request: Request, scope: ScopeDep, study: str) -> Response:
    return await retrieve(request, scope, study, None, None)


@_get_and_head(wado_router, "/studies/{study}/series/{series}", "WADO-RS: retrieve a series")
async def retrieve_series(request: Request, scope: ScopeDep, study: str, series: str) -> Response:
    return await retrieve(request, scope, study, series, None)


@_get_and_head(
    wado_router, "/studies/{study}/series/{series}/instances/{instance}", "WADO-RS: retrieve an instance"
)
async def retrieve_instance(
    request: Request, scope: ScopeDep, study: str, series: str, instance: str
) -> Response:
    return await retrieve(request, scope, study, series, instance)


# ---------------------------------------------------------------------------- metadata


async def metadata(
    request: Request, scope: Scope, study: str, series: str | None, instance: str | None
) -> Response:
    _target_uids(study, series, instance)
    media_type = wado.negotiate_metadata(request.headers.get("accept"))
    fragments = await _local_or_fetched(
        scope,
        study,
        index_service.metadata_fragments,
        series_uid=series,
        sop_uid=instance,
        facility_id=scope.facility_id,
    )
    if media_type == wado.DICOM_XML:
        return _multipart(
            request,
            lambda: index_service.render_metadata_xml(fragments, base=scope.base),
            part_type=wado.DICOM_XML,
        )
    return _streamed(
        request, lambda: index_service.render_metadata(fragments, base=scope.base), media_type=DICOM_JSON
    )


@_get_and_head(wado_router, "/studies/{study}/metadata", "WADO-RS: study metadata")
async def study_metadata(request: Request, scope: ScopeDep, study: str) -> Response:
    return await metadata(request, scope, study, None, None)


@_get_and_head(wado_router, "/studies/{study}/series/{series}/metadata", "WADO-RS: series metadata")
async def series_metadata(request: Request, scope: ScopeDep, study: str, series: str) -> Response:
    return await metadata(request, scope, study, series, None)


@_get_and_head(
    wado_router,
    "/studies/{study}/series/{series}/instances/{instance}/metadata",
    "WADO-RS: instance metadata",
)
async def instance_metadata(
    request: Request, scope: ScopeDep, study: str, series: str, instance: str
) -> Response:
    return await metadata(request, scope, study, series, instance)


# ---------------------------------------------------------------------------- bulk data and frames


@_get_and_head(
    wado_router, "/studies/{study}/series/{series}/instances/{instance}/bulk/{tag:path}", "WADO-RS: bulk data"
)
async def bulkdata(
    request: Request, scope: ScopeDep, study: str, series: str, instance: str, tag: str
) -> Response:
    single = wado.negotiate_bulk(request.headers.get("accept"))
    (ref,) = await _refs(scope, study, series, instance)
    data = await run_in_threadpool(wado.bulk_value, scope.state.store, ref, tag)
    if single:
        return await _single_part(request, wado.single_bytes(wado.OCTET, data))
    return _multipart(request, lambda: [(wado.OCTET, (data,))], part_type=wado.OCTET)


@_get_and_head(
    wado_router, "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}", "WADO-RS: frames"
)
async def frames(
    request: Request, scope: ScopeDep, study: str, series: str, instance: str, frames: str
) -> Response:
    numbers = wado.parse_frame_list(frames)
    (ref,) = await _refs(scope, study, series, instance)
    plan = wado.negotiate_frames(request.headers.get("accept"), ref.transfer_syntax_uid)
    parts = await run_in_threadpool(wado.frame_parts, scope.state.store, ref, numbers, plan)
    part_type = parts[0][0].split(";")[0] if parts else wado.OCTET
    return _multipart(request, lambda: [(ct, (data,)) for ct, data in parts], part_type=part_type)


# ---------------------------------------------------------------------------- rendered and thumbnails


async def rendered(
    request: Request,
    scope: Scope,
    refs: list[InstanceRef],
    *,
    frame: int | None = None,
    thumbnail: bool = False,
) -> Response:
    """One image: an instance, a frame, or (thumbnail) the middle image of `refs`."""
    media_type = wado.negotiate_rendered(request.headers.get("accept"))
    params = wado.parse_render_params(dict(request.query_params))
    ref = wado.thumbnail_ref(refs) if thumbnail else refs[0]
    data = await run_in_threadpool(
        wado.render_instance,
        scope.state.store,
        ref,
        media_type=media_type,
        frame=frame,
        params=params,
        thumbnail=thumbnail,
    )
    return await _single_part(request, wado.single_bytes(media_type, data))


async def rendered_many(request: Request, scope: Scope, refs: list[InstanceRef]) -> Response:
    """One image per instance with pixels, as multipart (a study or a series)."""
    media_type = wado.negotiate_rendered(request.headers.get("accept"), multipart=True)
    params = wado.parse_render_params(dict(request.query_params))
    return await _primed_multipart(
        request,
        lambda: wado.rendered_parts(scope.state.store, refs, media_type=media_type, params=params),
        part_type=media_type,
    )


@_get_and_head(
    rendered_router, "/studies/{study}/series/{series}/instances/{instance}/rendered", "WADO-RS: rendered"
)
async def instance_rendered(
    request: Request, scope: ScopeDep, study: str, series: str, instance: str
) -> Response:
    return await rendered(request, scope, await _refs(scope, study, series, instance))


@_get_and_head(
    rendered_router,
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
    "WADO-RS: rendered frame",
)
async def frame_rendered(
    request: Request, scope: ScopeDep, study: str, series: str, instance: str, frames: str
) -> Response:
    numbers = wado.parse_frame_list(frames)
    if len(numbers) != 1:
        raise NotAcceptable("a rendered frame resource names exactly one frame")
    return await rendered(request, scope, await _refs(scope, study, series, instance), frame=numbers[0])


@_get_and_head(rendered_router, "/studies/{study}/rendered", "WADO-RS: rendered study")
async def study_rendered(request: Request, scope: ScopeDep, study: str) -> Response:
    return await rendered_many(request, scope, await _refs(scope, study))


@_get_and_head(rendered_router, "/studies/{study}/series/{series}/rendered", "WADO-RS: rendered series")
async def series_rendered(request: Request, scope: ScopeDep, study: str, series: str) -> Response:
    return await rendered_many(request, scope, await _refs(scope, study, series))


@_get_and_head(rendered_router, "/studies/{study}/thumbnail", "WADO-RS: study thumbnail")
async def study_thumbnail(request: Request, scope: ScopeDep, study: str) -> Response:
    return await rendered(request, scope, await _refs(scope, study), thumbnail=True)


@_get_and_head(rendered_router, "/studies/{study}/series/{series}/thumbnail", "WADO-RS: series thumbnail")
async def series_thumbnail(request: Request, scope: ScopeDep, study: str, series: str) -> Response:
    return await rendered(request, scope, await _refs(scope, study, series), thumbnail=True)


@_get_and_head(
    rendered_router,
    "/studies/{study}/series/{series}/instances/{instance}/thumbnail",
    "WADO-RS: instance thumbnail",
)
async def instance_thumbnail(
    request: Request, scope: ScopeDep, study: str, series: str, instance: str
) -> Response:
    return await rendered(request, scope, await _refs(scope, study, series, instance), thumbnail=True)


# ================================================================================ mounting


def make_router(*, per_facility: bool) -> APIRouter:
    """The four services under one prefix, in the order their routes are matched."""
    prefix = "/facilities/{facility}/dicom-web" if per_facility else "/dicom-web"
    router = APIRouter(prefix=prefix, tags=["DICOMweb (facility)" if per_facility else "DICOMweb"])
    for service in (stow_router, qido_router, wado_router, rendered_router):
        router.include_router(service)
    return router


router = make_router(per_facility=False)
facility_router = make_router(per_facility=True)
