"""HTTP for FHIR R4 under /fhir: IHE PIXm (`Patient/$ihe-pix`), PDQm (`Patient` search), Patient
read, and the Patient identity feed (create, update, conditional update), over identity's service;
ImagingStudy search and read over the index (`fhir.service`).

FHIR routes answer in application/fhir+json and report every error as an OperationOutcome
with the matching HTTP status (the app-wide JSON error shape is not FHIR).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from broker.consent import service as consent_service
from broker.deps import (
    FHIR_EVERY_INTERACTION,
    PrincipalDep,
    SessionDep,
    SettingsDep,
    fhir_ignored_entry,
    fhir_json_only,
    fhir_lenient,
    fhir_one,
    fhir_unsupported,
)
from broker.errors import BadRequest, NotFound, ScanOnceError
from broker.fhir import service as fhir_service
from broker.fhir.schemas import (
    OtherNames,
    consent_resource,
    issuer_from_system,
    parse_consent,
    parse_patient,
    parse_person_id,
    parse_token,
    patient_resource,
    system_for_issuer,
)
from broker.identity import service
from broker.identity.schemas import Identifier
from broker.security.schemas import Principal

FHIR_JSON = "application/fhir+json"

router = APIRouter(prefix="/fhir", tags=["fhir"], dependencies=[Depends(fhir_json_only)])


def _fhir(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=FHIR_JSON, headers=headers)


_ISSUE_CODE = {
    400: "invalid",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    415: "not-supported",
    422: "processing",
}


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


# ---------------------------------------------------------------- PIXm / PDQm


@router.get("/Patient/$ihe-pix", include_in_schema=True)
def pixm(
    session: SessionDep,
    principal: PrincipalDep,
    sourceIdentifier: str | None = Query(default=None),  # noqa: N803 - FHIR parameter name
    targetSystem: list[str] = Query(default_factory=list),  # noqa: N803
) -> Response:
    """IHE PIXm (ITI-83): the other identifiers of the person a source identifier belongs to.
    Only records the caller may see (consent, purpose of use) answer: a source identifier of a
    withheld record is 404 as an unknown one, a withheld record's identifiers are not listed."""
    try:
        if not sourceIdentifier:
            raise BadRequest("sourceIdentifier is required")
        source = parse_token(sourceIdentifier, what="sourceIdentifier")
        if not service.issuer_known(session=session, issuer=source.issuer):
            return operation_outcome(400, "sourceIdentifier assigning authority not found", "code-invalid")
        targets = [issuer_from_system(t) for t in targetSystem if t]
        if any(not service.issuer_known(session=session, issuer=t) for t in targets):
            return operation_outcome(403, "targetSystem not found", "code-invalid")
        keep = consent_service.record_filter(session=session, principal=principal)
        ids = service.cross_reference(session=session, identifier=source, target_issuers=targets, keep=keep)
        person_id = service.person_of(session=session, identifier=source)
    except ScanOnceError as exc:
        return operation_outcome(exc.status_code, exc.message)
    params: list[dict[str, Any]] = [
        {
            "name": "targetIdentifier",
            "valueIdentifier": {"system": system_for_issuer(i.issuer), "value": i.value},
        }
        for i in ids
    ]
    if person_id is not None:
        params.append({"name": "targetId", "valueReference": {"reference": f"Patient/{person_id}"}})
    return _fhir({"resourceType": "Parameters", "parameter": params})


@router.get("/Patient")
def pdqm(
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    family: str | None = None,
    given: str | None = None,
    birthdate: str | None = None,
    identifier: str | None = None,
    _count: int = Query(default=50, ge=1, le=500),
) -> Response:
    """IHE PDQm (ITI-78): persons matching the demographics, each with all its identifiers; both
    limited to the records the caller may see (consent, purpose of use)."""
    allowed = {"family", "given", "birthdate", "identifier", "_count", *FHIR_EVERY_INTERACTION}
    try:
        unknown = fhir_unsupported(request.query_params, supported=allowed, lenient=fhir_lenient(request))
        ident = parse_token(identifier, what="identifier") if identifier else None
        keep = consent_service.record_filter(session=session, principal=principal)
        persons = service.search_persons(
            session=session,
            family=family,
            given=given,
            birth_date=birthdate,
            identifier=ident,
            limit=_count,
            keep=keep,
        )
    except ScanOnceError as exc:
        return operation_outcome(exc.status_code, exc.message)
    base = str(request.base_url).rstrip("/") + "/fhir/Patient/"
    # The self link is the search as processed: without the parameters ignored (FHIR search).
    used = [(k, v) for k, v in request.query_params.multi_items() if k in allowed]
    resources = fhir_service.patient_resources(session=session, views=persons, keep=keep)
    entries: list[dict[str, Any]] = [
        {"fullUrl": base + str(p.person_id), "resource": res, "search": {"mode": "match"}}
        for p, res in zip(persons, resources, strict=True)
    ]
    if unknown:
        entries.append(fhir_ignored_entry(unknown))
    out: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(persons),
        "link": [{"relation": "self", "url": base.rstrip("/") + ("?" + urlencode(used) if used else "")}],
    }
    if entries:  # FHIR JSON has no empty arrays
        out["entry"] = entries
    return _fhir(out)


@router.get("/Patient/{person_id}")
def read_patient(person_id: str, session: SessionDep, principal: PrincipalDep) -> Response:
    """A person, from the records the caller may see: none is 404, as for an unknown person."""
    pid = parse_person_id(person_id)
    if pid is None:
        return operation_outcome(404, "no such Patient")
    try:
        return _fhir(fhir_service.read_patient(session=session, person_id=pid, principal=principal))
    except ScanOnceError as exc:
        return operation_outcome(exc.status_code, exc.message)


# ---------------------------------------------------------------- Patient feed (create / update)


def _feed(raw: bytes, session: Session, principal: Principal, expect: Identifier | None) -> Response:
    try:
        primary, others, demo, other_names = parse_patient(raw)
        if expect is not None and expect not in [primary, *others]:
            raise BadRequest("the resource does not carry the identifier named in the URL")
        if expect is not None and primary != expect:
            others = [i for i in [primary, *others] if i != expect]
            primary = expect
        existed = service.person_of(session=session, identifier=primary) is not None
        decision = service.upsert_record(
            session=session,
            identifier=primary,
            demographics=demo,
            identifiers=others,
            source="fhir",
            principal=principal,
            other_names=other_names,
        )
        session.commit()
        try:
            # The resource as stored is the one a read gives (FHIR create / update, the default
            # return=representation): built by the read's code, so the two cannot differ.
            resource = fhir_service.read_patient(
                session=session, person_id=decision.person_id, principal=principal
            )
        except NotFound:
            # A person the caller fed but may not see (consent: another facility's patient who
            # opted out there), whom no read shows it: what it sent, nothing the broker adds.
            view = service.PersonView(
                person_id=decision.person_id, identifiers=[primary, *others], **dataclasses.asdict(demo)
            )
            resource = patient_resource(view, other_names=OtherNames(fed=other_names or ()))
    except ScanOnceError as exc:
        session.rollback()
        return operation_outcome(exc.status_code, exc.message)
    return _fhir(
        resource,
        200 if existed else 201,
        {"Location": f"/fhir/Patient/{decision.person_id}", "X-ScanOnce-Link": decision.outcome},
    )


@router.post("/Patient")
async def create_patient(request: Request, session: SessionDep, principal: PrincipalDep) -> Response:
    """Patient identity feed (PIXm feed / ITI-104 style): create or update by the first identifier."""
    raw = await request.body()
    return await run_in_threadpool(_feed, raw, session, principal, None)


@router.put("/Patient")
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
    return await run_in_threadpool(_feed, raw, session, principal, expect)


@router.put("/Patient/{person_id}")
async def update_patient(
    person_id: str, request: Request, session: SessionDep, principal: PrincipalDep
) -> Response:
    """Update: the resource's first identifier names the record; it must belong to this Patient,
    and an id in the resource must be this one (FHIR update: 400 otherwise)."""
    raw = await request.body()

    def run() -> Response:
        try:
            primary, _others, _demo, _names = parse_patient(raw, url_id=person_id)
            owner = service.person_of(session=session, identifier=primary)
            if owner is None or str(owner) != person_id:
                raise NotFound("the identifier does not belong to this Patient (use POST to create)")
        except ScanOnceError as exc:
            return operation_outcome(exc.status_code, exc.message)
        return _feed(raw, session, principal, None)

    return await run_in_threadpool(run)


# ---------------------------------------------------------------- ImagingStudy


def _base(request: Request, settings: SettingsDep) -> str:
    return (settings.base_url or str(request.base_url)).rstrip("/")


@router.get("/ImagingStudy")
def search_imaging_study(
    request: Request, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> Response:
    """ImagingStudy search: a person's studies at every facility (patient, subject,
    patient.identifier=system|value), or studies by identifier; started, modality, bodysite,
    _sort=-started|started, _count, _offset. A searchset Bundle; errors as OperationOutcome."""
    base = _base(request, settings)
    params: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        params.setdefault(key, []).append(value)
    lenient = fhir_lenient(request)
    try:
        answer = fhir_service.search_imaging_studies(
            session=session, params=params, base_url=base, lenient=lenient, principal=principal
        )
    except ScanOnceError as exc:
        return operation_outcome(exc.status_code, exc.message)
    return _fhir(fhir_service.bundle(answer, search_url=f"{base}/fhir/ImagingStudy"))


@router.get("/ImagingStudy/{study_id}")
def read_imaging_study(
    study_id: str, request: Request, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> Response:
    """One ImagingStudy; its id is the Study Instance UID."""
    res = fhir_service.read_imaging_study(
        session=session, study_uid=study_id, base_url=_base(request, settings), principal=principal
    )
    if res is None:
        return operation_outcome(404, "no such ImagingStudy")
    return _fhir(res)


# ---------------------------------------------------------------- Consent


def _consent_out(row: Any) -> dict[str, Any]:
    return consent_resource(
        consent_id=row.id,
        person_id=row.person_id,
        decision=row.decision,
        organization=row.recorded_at_facility,
        scope=row.scope_facility,
        recorded_at=row.recorded_at.isoformat()
        if row.recorded_at.tzinfo
        else row.recorded_at.isoformat() + "Z",
    )


@router.post("/Consent")
async def create_consent(request: Request, session: SessionDep, principal: PrincipalDep) -> Response:
    """Record a patient's sharing choice: provision.type deny (opt-out) or permit (opt-in), for
    the Patient (a person) at the Organization where it was given (default: the caller's)."""
    raw = await request.body()
    try:
        parsed = parse_consent(raw)
        row = await run_in_threadpool(
            partial(
                consent_service.record_consent_for_person,
                session=session,
                principal=principal,
                person_id=parsed.person_id,
                organization=parsed.organization,
                decision=parsed.decision,
                scope=parsed.scope,
            )
        )
    except ScanOnceError as exc:
        session.rollback()
        return operation_outcome(exc.status_code, exc.message)
    return _fhir(_consent_out(row), 201, {"Location": f"/fhir/Consent/{row.id}"})


# What a Consent search takes; `patient` is its one criterion, given once.
_CONSENT_PARAMS = ("patient", *FHIR_EVERY_INTERACTION)


@router.get("/Consent")
def search_consent(
    request: Request, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> Response:
    """The choices that apply to a person: ?patient=Patient/<id> (required). A searchset Bundle.
    Any other parameter is refused (400) unless Prefer: handling=lenient, as for ImagingStudy: a
    criterion silently dropped would answer every choice of the person as if it had matched."""
    try:
        unknown = fhir_unsupported(
            request.query_params, supported=_CONSENT_PARAMS, lenient=fhir_lenient(request)
        )
        patient = (fhir_one(request.query_params.getlist("patient"), "patient") or "").strip()
        if not patient:
            raise BadRequest("search Consent by patient (?patient=Patient/<id>)")
        if len(patient) > 256:
            raise BadRequest("patient: at most 256 characters")
        person = parse_person_id(patient.rstrip("/").rsplit("/", 1)[-1])
        rows = (
            consent_service.consents_of_person_id(session=session, principal=principal, person_id=person)
            if person is not None
            else []
        )
    except ScanOnceError as exc:
        return operation_outcome(exc.status_code, exc.message)
    entries = [{"resource": _consent_out(r), "search": {"mode": "match"}} for r in rows]
    if unknown:
        entries.append(fhir_ignored_entry(unknown))
    # The self link is the search as processed (FHIR search): the ignored parameters left out.
    used = [(k, v) for k, v in request.query_params.multi_items() if k in _CONSENT_PARAMS]
    out: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(rows),
        "link": [{"relation": "self", "url": f"{_base(request, settings)}/fhir/Consent?{urlencode(used)}"}],
    }
    if entries:  # FHIR JSON has no empty arrays
        out["entry"] = entries
    return _fhir(out)


@router.get("/metadata")
def metadata(request: Request, settings: SettingsDep) -> Response:
    """The CapabilityStatement: resources, interactions and search parameters served."""
    return _fhir(fhir_service.capability_statement(base_url=_base(request, settings)))
