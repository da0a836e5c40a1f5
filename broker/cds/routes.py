"""HTTP for CDS Hooks 2.0: discovery, the services, feedback. Thin: the body is read here and
handed to `cds.service` in a thread (the lookup and the FHIR reads block)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from broker.cds import service
from broker.cds.schemas import CdsResponse, Discovery, FeedbackAnswer
from broker.deps import PrincipalDep, SessionDep, SettingsDep

router = APIRouter(tags=["cds-hooks"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Malformed hook request (missing hook, hookInstance, context or its fields)"},
    404: {"description": "No such CDS service (or, for feedback, no such card)"},
    412: {"description": "The patient's identifiers were neither prefetched nor readable from fhirServer"},
}


@router.get("/cds-services", response_model=Discovery, response_model_exclude_none=True)
def discover() -> Discovery:
    """The services, their hooks and the prefetch templates they want."""
    return service.discovery()


@router.post(
    "/cds-services/{service_id}",
    response_model=CdsResponse,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def call(
    service_id: str, request: Request, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> CdsResponse:
    """A hook call: cards for the draft imaging orders that have relevant priors."""
    raw = await request.body()
    base = (settings.base_url or str(request.base_url)).rstrip("/")
    return await run_in_threadpool(
        lambda: service.call_service(
            session=session, principal=principal, service_id=service_id, raw=raw, base_url=base
        )
    )


@router.post("/cds-services/{service_id}/feedback", response_model=FeedbackAnswer, responses=_ERRORS)
async def feedback(
    service_id: str, request: Request, session: SessionDep, principal: PrincipalDep
) -> FeedbackAnswer:
    """Accepted or overridden cards; an accepted "remove this order" records an avoided repeat."""
    raw = await request.body()
    return await run_in_threadpool(
        lambda: service.record_feedback(session=session, principal=principal, service_id=service_id, raw=raw)
    )
