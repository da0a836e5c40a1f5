"""`/api/imports`: import an outside study into a facility's archive (thin: see service)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Response

from broker.deps import PrincipalDep, SessionDep, StateDep
from broker.facilities import service as facilities
from broker.imports import service
from broker.imports.schemas import (
    DestinationConfig,
    DestinationConfigOut,
    DryRunOut,
    ImportOut,
    ImportRequest,
    InstanceDiff,
)

router = APIRouter(prefix="/api/imports", tags=["imports"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Bad input, or the destination has no record of the patient"},
    404: {"description": "No such study, facility or import"},
    503: {"description": "The destination archive cannot be reached"},
}


@router.post(
    "",
    response_model=ImportOut | DryRunOut,
    status_code=202,
    responses=_ERRORS,
    summary="Import a study into a facility's archive with its identifiers (or dry-run it)",
)
def start_import(body: ImportRequest, state: StateDep, principal: PrincipalDep, response: Response) -> Any:
    args: dict[str, Any] = {
        "engine": state.engine, "principal": principal, "study_uid": body.study_uid,
        "facility_id": body.facility, "patient": body.patient, "accession_policy": body.accession_policy,
        "via": body.via, "calling_ae": state.settings.ae_title,
    }  # fmt: skip
    if body.dry_run:
        prepared = service.prepare(**args)
        diffs = service.dry_run(
            engine=state.engine, store=state.store, prepared=prepared, study_uid=body.study_uid
        )
        response.status_code = 200
        return DryRunOut(
            study_uid=body.study_uid, facility=body.facility, via=prepared.via, plan=prepared.plan.to_json(),
            instances=[InstanceDiff.model_validate(d) for d in diffs],
        )  # fmt: skip
    return ImportOut.of(service.start_import(**args))


@router.get("", response_model=list[ImportOut], summary="Recent imports, newest first")
def list_imports(
    session: SessionDep, _principal: PrincipalDep, limit: int = Query(default=100, ge=1, le=1000)
) -> list[ImportOut]:
    rows = service.list_imports(session=session, limit=limit)
    retry = service.retry_times(session=session, rows=rows)
    return [ImportOut.of(r, retry_at=retry.get(r.id or 0)) for r in rows]


@router.get(
    "/destinations/{facility}",
    response_model=DestinationConfigOut,
    responses=_ERRORS,
    summary="How studies imported into a facility get StudyID and the institution attributes",
)
def get_destination(facility: str, session: SessionDep, _principal: PrincipalDep) -> DestinationConfigOut:
    facilities.get_facility(session=session, facility_id=facility)  # 404 for an unknown one
    return DestinationConfigOut.of(service.destination_config(session=session, facility_id=facility))


@router.put(
    "/destinations/{facility}",
    response_model=DestinationConfigOut,
    responses=_ERRORS,
    summary="Configure StudyID and the institution attributes of studies imported into a facility",
)
def put_destination(
    facility: str, body: DestinationConfig, state: StateDep, principal: PrincipalDep
) -> DestinationConfigOut:
    row = service.configure_destination(
        engine=state.engine, principal=principal, facility_id=facility,
        study_id_policy=body.study_id_policy,
        institution={str(k): v for k, v in body.institution.items()},
    )  # fmt: skip
    return DestinationConfigOut.of(row)


@router.get(
    "/{import_id}",
    response_model=ImportOut,
    responses=_ERRORS,
    summary="One import and each instance's outcome",
)
def get_import(import_id: int, session: SessionDep, _principal: PrincipalDep) -> ImportOut:
    row = service.get_import(session=session, import_id=import_id)
    retry = service.retry_times(session=session, rows=[row]).get(import_id)
    return ImportOut.of(row, service.instances_of(session=session, import_id=import_id), retry_at=retry)


@router.post("/{import_id}/cancel", response_model=ImportOut, responses=_ERRORS, summary="Cancel an import")
def cancel_import(import_id: int, state: StateDep, principal: PrincipalDep) -> ImportOut:
    return ImportOut.of(service.cancel_import(engine=state.engine, principal=principal, import_id=import_id))
