"""`/api/priors`: the prior lookup; `/api/priors/avoided` and `/api/metrics/avoided`: repeats avoided."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Query

from broker.deps import PrincipalDep, SessionDep
from broker.lookup import service
from broker.lookup.schemas import AvoidedIn, AvoidedMonth, AvoidedOut, ExamSuggestion, PriorsAnswer

router = APIRouter(tags=["lookup"])

Responses = dict[int | str, dict[str, Any]]
_BAD: Responses = {
    400: {
        "description": "No usable identifier, an unknown setting, or a planned exam the engine cannot read"
    },
    404: {"description": "No such facility"},
}


@router.get("/api/priors", response_model=PriorsAnswer, responses=_BAD)
def get_priors(
    session: SessionDep,
    principal: PrincipalDep,
    facility: Annotated[str | None, Query(description="facility id; with mrn")] = None,
    mrn: Annotated[str | None, Query(description="the patient's ID at that facility")] = None,
    identifier: Annotated[str | None, Query(description="system|value, system a facility's issuer")] = None,
    exam: Annotated[str | None, Query(description="the planned exam as ordered, e.g. CT ABD/PEL W")] = None,
    code: Annotated[str | None, Query(description="procedure code (CPT, LOINC, RadLex RPID)")] = None,
    system: Annotated[str | None, Query(description="the code's system")] = None,
    modality: Annotated[str | None, Query()] = None,
    bodypart: Annotated[str | None, Query(description="BodyPartExamined term")] = None,
    setting: Annotated[str, Query(description="trauma, ed, inpatient or outpatient")] = "outpatient",
    now: Annotated[date | None, Query(description="judge as of this date (default today)")] = None,
) -> PriorsAnswer:
    """Every study of the patient's person across facilities, relevant first, with dose."""
    return service.find_priors(
        session=session,
        principal=principal,
        facility=facility,
        mrn=mrn,
        identifier=identifier,
        exam=exam,
        code=code,
        code_system=system,
        modality=modality,
        body_part=bodypart,
        setting=setting,
        now=now,
    )


@router.get("/api/priors/exams", response_model=list[ExamSuggestion])
def get_exam_suggestions() -> list[ExamSuggestion]:
    """Planned exams the engine reads by code, with their short labels: suggestions for a form."""
    return service.exam_suggestions()


@router.post("/api/priors/avoided", response_model=AvoidedOut, status_code=201, responses=_BAD)
def post_avoided(body: AvoidedIn, session: SessionDep, principal: PrincipalDep) -> AvoidedOut:
    """A clinician saw this prior and did not repeat the planned exam."""
    return service.record_avoided(
        session=session,
        principal=principal,
        study_uid=body.study_instance_uid,
        planned_exam=body.planned_exam,
        facility=body.facility,
    )


@router.get("/api/metrics/avoided", response_model=list[AvoidedMonth])
def get_avoided(session: SessionDep, facility: str | None = None) -> list[AvoidedMonth]:
    """Repeats avoided and estimated dose spared, per facility per month."""
    return service.avoided_per_month(session=session, facility=facility)
