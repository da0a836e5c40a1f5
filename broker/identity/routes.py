"""HTTP for identity: FHIR R4 PIXm / PDQm / Patient feed under /fhir, and the review API under /api.

FHIR routes answer in application/fhir+json and report every error as an OperationOutcome
with the matching HTTP status (the app-wide JSON error shape is not FHIR).
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from broker.deps import PrincipalDep, SessionDep
from broker.errors import BadRequest, NotFound, ScanOnceError
from broker.identity import matching, service
from broker.identity.models import IdentityRecord, ReviewItem
from broker.identity.schemas import (
    Identifier,
    LinkRequest,
    PersonView,
    ReviewDecision,
    TrustedIssuerIn,
    UnlinkRequest,
)

FHIR_JSON = "application/fhir+json"
router = APIRouter(tags=["identity"])

_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_LOCAL_PREFIX = "urn:scanonce:issuer:"


# ---------------------------------------------------------------- issuer <-> FHIR system


def system_for_issuer(issuer: str) -> str:
    """An issuer as a FHIR identifier system: OIDs as urn:oid:, URIs as is, others namespaced."""
    if _OID.match(issuer):
        return "urn:oid:" + issuer
    if ":" in issuer:
        return issuer
    return _LOCAL_PREFIX + issuer


def issuer_from_system(system: str) -> str:
    if system.startswith("urn:oid:"):
        return system[len("urn:oid:") :]
    if system.startswith(_LOCAL_PREFIX):
        return system[len(_LOCAL_PREFIX) :]
    return system


def parse_token(token: str, *, what: str) -> Identifier:
    """FHIR token `system|value`; a bare value has no issuer and is refused."""
    if "|" not in token:
        raise BadRequest(f"{what} must be system|value: a bare identifier has no issuer")
    system, value = token.split("|", 1)
    if not system.strip():
        raise BadRequest(f"{what} has no system (issuer)")
    if not value.strip():
        raise BadRequest(f"{what} has no value")
    return Identifier(issuer=issuer_from_system(system.strip()), value=value.strip())


# ---------------------------------------------------------------- FHIR responses


def _fhir(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=FHIR_JSON, headers=headers)


_ISSUE_CODE = {400: "invalid", 403: "forbidden", 404: "not-found", 409: "conflict", 422: "processing"}


def operation_outcome(status: int, message: str, code: str | None = None) -> Response:
    return _fhir(
        {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": code or _ISSUE_CODE.get(status, "exception"),
                    "diagnostics": message,
                }
            ],
        },
        status,
    )


def _date_fhir(d: str) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 else ""


def patient_resource(view: PersonView) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Patient",
        "id": str(view.person_id),
        "identifier": [{"system": system_for_issuer(i.issuer), "value": i.value} for i in view.identifiers],
        "active": True,
    }
    if view.family or view.given:
        name: dict[str, Any] = {"use": "official"}
        if view.family:
            name["family"] = view.family
        given = [g for g in (view.given, view.middle) if g]
        if given:
            name["given"] = given
        res["name"] = [name]
    if view.sex:
        res["gender"] = {"M": "male", "F": "female", "O": "other"}[view.sex]
    if len(view.birth_date) == 8 and matching.normalize_date(view.birth_date):
        res["birthDate"] = _date_fhir(view.birth_date)
    if view.address:
        res["address"] = [{"text": view.address}]
    if view.phone:
        res["telecom"] = [{"system": "phone", "value": view.phone}]
    return res


# ---------------------------------------------------------------- PIXm / PDQm


@router.get("/fhir/Patient/$ihe-pix", include_in_schema=True)
def pixm(
    session: SessionDep,
    _principal: PrincipalDep,
    sourceIdentifier: str | None = Query(default=None),  # noqa: N803 - FHIR parameter name
    targetSystem: list[str] = Query(default_factory=list),  # noqa: N803
) -> Response:
    """IHE PIXm (ITI-83): the other identifiers of the person a source identifier belongs to."""
    try:
        if not sourceIdentifier:
            raise BadRequest("sourceIdentifier is required")
        source = parse_token(sourceIdentifier, what="sourceIdentifier")
        if not _issuer_known(session, source.issuer):
            return operation_outcome(400, "sourceIdentifier assigning authority not found", "code-invalid")
        targets = [issuer_from_system(t) for t in targetSystem if t]
        if any(not _issuer_known(session, t) for t in targets):
            return operation_outcome(403, "targetSystem not found", "code-invalid")
        ids = service.cross_reference(session=session, identifier=source, target_issuers=targets)
        rec = service.get_record(session=session, issuer=source.issuer, value=source.value)
    except ScanOnceError as exc:
        return operation_outcome(exc.status_code, exc.message)
    params: list[dict[str, Any]] = [
        {
            "name": "targetIdentifier",
            "valueIdentifier": {"system": system_for_issuer(i.issuer), "value": i.value},
        }
        for i in ids
    ]
    if rec is not None:
        params.append({"name": "targetId", "valueReference": {"reference": f"Patient/{rec.person_id}"}})
    return _fhir({"resourceType": "Parameters", "parameter": params})


def _issuer_known(session: Any, issuer: str) -> bool:
    """A registered facility's or trusted issuer, or one any record or identifier carries
    (index lookups only: PIXm must stay fast on a large MPI)."""
    from sqlmodel import select

    from broker.facilities.models import Facility
    from broker.identity.models import IdentityIdentifier, TrustedIssuer

    return any(
        session.exec(stmt.limit(1)).first() is not None
        for stmt in (
            select(Facility.id).where(Facility.issuer == issuer),
            select(TrustedIssuer.issuer).where(TrustedIssuer.issuer == issuer),
            select(IdentityRecord.id).where(IdentityRecord.issuer == issuer),
            select(IdentityIdentifier.id).where(IdentityIdentifier.issuer == issuer),
        )
    )


@router.get("/fhir/Patient")
def pdqm(
    request: Request,
    session: SessionDep,
    _principal: PrincipalDep,
    family: str | None = None,
    given: str | None = None,
    birthdate: str | None = None,
    identifier: str | None = None,
    _count: int = Query(default=50, ge=1, le=500),
) -> Response:
    """IHE PDQm (ITI-78): persons matching the demographics, each with all its identifiers."""
    allowed = {"family", "given", "birthdate", "identifier", "_count", "_format"}
    unknown = sorted(set(request.query_params) - allowed)
    try:
        if unknown:
            raise BadRequest(f"unsupported search parameter(s): {', '.join(unknown)}")
        ident = parse_token(identifier, what="identifier") if identifier else None
        persons = service.search_persons(
            session=session, family=family, given=given, birth_date=birthdate, identifier=ident, limit=_count
        )
    except ScanOnceError as exc:
        return operation_outcome(exc.status_code, exc.message)
    base = str(request.base_url).rstrip("/") + "/fhir/Patient/"
    return _fhir(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(persons),
            "link": [{"relation": "self", "url": str(request.url)}],
            "entry": [
                {
                    "fullUrl": base + str(p.person_id),
                    "resource": patient_resource(p),
                    "search": {"mode": "match"},
                }
                for p in persons
            ],
        }
    )


@router.get("/fhir/Patient/{person_id}")
def read_patient(person_id: str, session: SessionDep, _principal: PrincipalDep) -> Response:
    if not person_id.isdigit():
        return operation_outcome(404, "no such Patient")
    try:
        view = service.person_view(session=session, person_id=int(person_id))
    except ScanOnceError as exc:
        return operation_outcome(exc.status_code, exc.message)
    return _fhir(patient_resource(view))


# ---------------------------------------------------------------- Patient feed (create / update)


def _parse_patient(raw: bytes) -> tuple[Identifier, list[Identifier], matching.Demographics]:
    """Validate a FHIR R4 Patient and extract identifiers and demographics (BadRequest if not)."""
    from fhir.resources.patient import Patient as FhirPatient
    from pydantic import ValidationError

    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("resourceType") != "Patient":
        raise BadRequest("body must be a FHIR Patient resource")
    try:
        patient = FhirPatient.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise BadRequest(f"invalid Patient at {where or 'root'}: {first.get('msg', 'invalid')}") from None
    idents: list[Identifier] = []
    for ident in patient.identifier or []:
        if not ident.system:
            raise BadRequest("every Patient.identifier needs a system (issuer); bare identifiers are refused")
        if not ident.value:
            raise BadRequest("every Patient.identifier needs a value")
        idents.append(Identifier(issuer=issuer_from_system(str(ident.system)), value=str(ident.value)))
    if not idents:
        raise BadRequest("a Patient needs at least one identifier with a system")
    name = next((n for n in (patient.name or []) if n.use in (None, "official", "usual")), None)
    family = str(name.family) if name and name.family else ""
    givens = [str(g) for g in (name.given or [])] if name else []
    birth = ""
    if patient.birthDate is not None:
        birth = str(patient.birthDate).replace("-", "")
        if len(birth) == 8 and not matching.normalize_date(birth):
            raise BadRequest("birthDate is in the future or before 1850")
        if len(birth) != 8:
            birth = ""  # a partial date (year only) says too little to match on
    address = ""
    if patient.address:
        a = patient.address[0]
        address = " ".join(
            str(x) for x in [*(a.line or []), a.city, a.district, a.state, a.postalCode, a.text] if x
        )
    phone = next((str(t.value) for t in (patient.telecom or []) if t.system == "phone" and t.value), "")
    demo = matching.demographics(
        family=family,
        given=givens[0] if givens else "",
        middle=" ".join(givens[1:]),
        birth_date=birth,
        sex=str(patient.gender or "")[:1] if patient.gender in ("male", "female", "other") else "",
        address=address,
        phone=phone,
    )
    return idents[0], idents[1:], demo


def _feed(raw: bytes, session: Any, who: str, expect: Identifier | None) -> Response:
    try:
        primary, others, demo = _parse_patient(raw)
        if expect is not None and expect not in [primary, *others]:
            raise BadRequest("the resource does not carry the identifier named in the URL")
        if expect is not None and primary != expect:
            others = [i for i in [primary, *others] if i != expect]
            primary = expect
        existed = service.get_record(session=session, issuer=primary.issuer, value=primary.value) is not None
        decision = service.upsert_record(
            session=session, identifier=primary, demographics=demo, identifiers=others, source="fhir", who=who
        )
        session.commit()
        view = service.person_view(session=session, person_id=decision.person_id)
    except ScanOnceError as exc:
        session.rollback()
        return operation_outcome(exc.status_code, exc.message)
    return _fhir(
        patient_resource(view),
        200 if existed else 201,
        {"Location": f"/fhir/Patient/{decision.person_id}", "X-ScanOnce-Link": decision.outcome},
    )


@router.post("/fhir/Patient")
async def create_patient(request: Request, session: SessionDep, principal: PrincipalDep) -> Response:
    """Patient identity feed (PIXm feed / ITI-104 style): create or update by the first identifier."""
    raw = await request.body()
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_feed, raw, session, principal.who, None)


@router.put("/fhir/Patient")
async def conditional_update_patient(
    request: Request, session: SessionDep, principal: PrincipalDep, identifier: str | None = None
) -> Response:
    """ITI-104 conditional update: PUT /fhir/Patient?identifier=system|value."""
    raw = await request.body()
    try:
        if not identifier:
            raise BadRequest("conditional update needs ?identifier=system|value")
        expect = parse_token(identifier, what="identifier")
    except ScanOnceError as exc:
        return operation_outcome(exc.status_code, exc.message)
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_feed, raw, session, principal.who, expect)


@router.put("/fhir/Patient/{person_id}")
async def update_patient(
    person_id: str, request: Request, session: SessionDep, principal: PrincipalDep
) -> Response:
    """Update: the resource's first identifier names the record; it must belong to this Patient."""
    raw = await request.body()
    from starlette.concurrency import run_in_threadpool

    def run() -> Response:
        try:
            primary, _others, _demo = _parse_patient(raw)
            rec = service.get_record(session=session, issuer=primary.issuer, value=primary.value)
            if rec is None or str(rec.person_id) != person_id:
                raise NotFound("the identifier does not belong to this Patient (use POST to create)")
        except ScanOnceError as exc:
            return operation_outcome(exc.status_code, exc.message)
        return _feed(raw, session, principal.who, None)

    return await run_in_threadpool(run)


# ---------------------------------------------------------------- /api/identity


def _review_out(item: ReviewItem) -> dict[str, Any]:
    return {
        "id": item.id,
        "record_id": item.record_id,
        "candidate_record_id": item.candidate_record_id,
        "weight": item.weight,
        "contributions": orjson.loads(item.contributions),
        "status": item.status,
        "decided_by": item.decided_by,
        "reason": item.reason,
        "decided_at": item.decided_at.isoformat() if item.decided_at else None,
    }


@router.get("/api/identity/review")
def list_review(
    session: SessionDep,
    _principal: PrincipalDep,
    status: str = "open",
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0),
) -> list[dict[str, Any]]:
    return [
        _review_out(i)
        for i in service.review_queue(session=session, status=status, limit=limit, offset=offset)
    ]


@router.post("/api/identity/review/{review_id}")
def decide(
    review_id: int, body: ReviewDecision, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    item = service.decide_review(
        session=session, review_id=review_id, decision=body.decision, who=principal.who, why=body.reason
    )
    return _review_out(item)


@router.post("/api/identity/link")
def link(body: LinkRequest, session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    d = service.manual_link(
        session=session,
        record_id=body.record_id,
        to_record_id=body.to_record_id,
        who=principal.who,
        why=body.reason,
    )
    return {"record_id": d.record_id, "person_id": d.person_id}


@router.post("/api/identity/unlink")
def unlink(body: UnlinkRequest, session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    d = service.unlink(session=session, record_id=body.record_id, who=principal.who, why=body.reason)
    return {"record_id": d.record_id, "person_id": d.person_id}


@router.get("/api/identity/records/{record_id}/explain")
def explain(record_id: int, session: SessionDep, _principal: PrincipalDep) -> service.Explanation:
    return service.explain(session=session, record_id=record_id)


@router.get("/api/identity/records")
def find_record(issuer: str, value: str, session: SessionDep, _principal: PrincipalDep) -> dict[str, Any]:
    rec = service.get_record(session=session, issuer=issuer, value=value)
    if rec is None:
        raise NotFound("no record for that identifier")
    return {"id": rec.id, "issuer": rec.issuer, "value": rec.value, "person_id": rec.person_id}


@router.post("/api/identity/trusted-issuers", status_code=201)
def add_trusted_issuer(
    body: TrustedIssuerIn, session: SessionDep, _principal: PrincipalDep
) -> dict[str, str]:
    service.set_trusted_issuer(session=session, issuer=body.issuer, note=body.note)
    return {"issuer": body.issuer}


@router.post("/api/identity/train")
def train(session: SessionDep, _principal: PrincipalDep) -> dict[str, Any]:
    return service.train(session=session)
