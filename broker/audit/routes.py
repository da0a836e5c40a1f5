"""HTTP for the audit trail: FHIR `AuditEvent` search (IHE BALP's query for auditors), the same
events in the broker's own JSON at `/api/audit`, and the chain check at `/api/audit/verify`.
Who may read them (auditors, admins) is the policy table's say (broker.security.policy)."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from broker.audit import service
from broker.audit.schemas import AuditEventOut, VerifyOut
from broker.audit.service import AuditQuery
from broker.deps import (
    FHIR_EVERY_INTERACTION,
    PrincipalDep,
    SessionDep,
    SettingsDep,
    StateDep,
    fhir_ignored_entry,
    fhir_json_only,
    fhir_lenient,
    fhir_one,
    fhir_unsupported,
)
from broker.errors import BadRequest

router = APIRouter(tags=["audit"])
FHIR_JSON = "application/fhir+json"
_MAX_COUNT = 1000


def _fhir(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type=FHIR_JSON)


# What an AuditEvent search takes: its criteria, paging, and FHIR's parameters of every interaction.
_AUDIT_PARAMS = (
    "patient",
    "agent",
    "date",
    "action",
    "subtype",
    "purpose",
    "entity-id",
    "_count",
    "_offset",
    *FHIR_EVERY_INTERACTION,
)


@router.get("/fhir/AuditEvent", dependencies=[Depends(fhir_json_only)])
def search_audit_events(
    request: Request, session: SessionDep, settings: SettingsDep, _principal: PrincipalDep
) -> Response:
    """AuditEvent search: patient (ID or system|ID), agent (who), date (repeatable, with ge/le/gt/lt
    prefixes), action (C R U D E), subtype, purpose (a purpose-of-use code: `BTG` lists accesses
    made under break-the-glass), _count, _offset. Newest first; a searchset Bundle. Errors are
    raised: the app answers them as OperationOutcome, as for every /fhir route. Another parameter
    is refused unless Prefer: handling=lenient: an auditor's misspelt criterion must not widen
    the answer to everyone's accesses unnoticed."""
    params = request.query_params
    unknown = fhir_unsupported(params, supported=_AUDIT_PARAMS, lenient=fhir_lenient(request))

    def one(name: str) -> str | None:  # every criterion but `date` (a range is two of them)
        return fhir_one(params.getlist(name), name)

    count_text, offset_text = one("_count"), one("_offset")
    try:
        count = int("100" if count_text is None else count_text)
        offset = int("0" if offset_text is None else offset_text)
    except ValueError:
        raise BadRequest("_count and _offset must be integers") from None
    if not 0 <= count <= _MAX_COUNT or offset < 0:
        raise BadRequest(f"_count must be 0..{_MAX_COUNT} and _offset not negative")
    query = AuditQuery(
        patient=one("patient"),
        agent=one("agent"),
        dates=tuple(params.getlist("date")),
        action=one("action"),
        subtype=one("subtype"),
        study=(one("entity-id") or "").removeprefix("urn:oid:") or None,
        purpose=one("purpose") or None,
    )
    total, rows = service.search(session=session, query=query, limit=count, offset=offset)
    base = (settings.base_url or str(request.base_url)).rstrip("/") + "/fhir"
    # The self link is the search as processed (FHIR search): the ignored parameters left out.
    applied = [(k, v) for k, v in params.multi_items() if k in _AUDIT_PARAMS]
    bundle = service.searchset(
        base=base,
        total=total,
        rows=rows,
        self_url=f"{base}/AuditEvent?{urlencode(applied)}",
        outcomes=[fhir_ignored_entry(unknown)] if unknown else (),
    )
    return _fhir(bundle)


@router.get("/api/audit", response_model=list[AuditEventOut])
def list_audit_events(
    session: SessionDep,
    _principal: PrincipalDep,
    patient: Annotated[str | None, Query(description="Patient ID, or issuer|Patient ID")] = None,
    agent: Annotated[str | None, Query(description="who acted (token subject, AE title)")] = None,
    date: Annotated[list[str] | None, Query(description="ge2026-01-01, le2026-01-31, 2026-01-05")] = None,
    action: Annotated[str | None, Query(description="C, R, U, D or E")] = None,
    subtype: Annotated[
        str | None, Query(description="query, read, retrieve, store, import, link, ...")
    ] = None,
    study: Annotated[str | None, Query(description="Study Instance UID")] = None,
    purpose: Annotated[
        str | None,
        Query(description="purpose-of-use code; BTG: accesses under break-the-glass", max_length=32),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=_MAX_COUNT)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[AuditEventOut]:
    """Audit events, newest first."""
    query = AuditQuery(
        patient=patient,
        agent=agent,
        dates=tuple(date or ()),
        action=action,
        subtype=subtype,
        study=study,
        purpose=purpose,
    )
    _total, rows = service.search(session=session, query=query, limit=limit, offset=offset)
    return [AuditEventOut(**r) for r in rows]


@router.get("/api/audit/verify", response_model=VerifyOut)
async def verify_audit_chain(state: StateDep, _principal: PrincipalDep) -> VerifyOut:
    """Walk the hash chain; `ok` false names the first broken row and what is wrong with it."""
    return await run_in_threadpool(service.verify, engine=state.engine)
