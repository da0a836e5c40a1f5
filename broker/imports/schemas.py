"""Request and response shapes of `/api/imports`."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from broker.imports.models import ImportDestination, ImportInstance, ImportJob


class ImportRequest(BaseModel):
    study_uid: str = Field(min_length=1, max_length=64, description="StudyInstanceUID of the outside study")
    facility: str = Field(min_length=1, max_length=64, description="The destination facility (its archive)")
    patient: str = Field(
        default="",
        max_length=128,
        description="The destination's Patient ID for this person; default: found by the identity service",
    )
    accession_policy: Literal["empty", "keep", "new"] = "keep"
    via: Literal["", "dimse", "dicomweb"] = Field(
        default="", description="Delivery: C-STORE or STOW-RS; default as the facility is registered"
    )
    dry_run: bool = Field(
        default=False, description="Show the plan and each instance's changes; send nothing"
    )


class Change(BaseModel):
    attribute: str
    before: str
    after: str


class InstanceDiff(BaseModel):
    sop_uid: str
    changes: list[Change]
    error: str = Field(
        default="",
        description="Why this instance cannot be read or coerced (the import would fail it alone); "
        "empty when its changes are shown",
    )


class DryRunOut(BaseModel):
    dry_run: Literal[True] = True
    study_uid: str
    facility: str
    via: str
    plan: dict[str, Any]
    instances: list[InstanceDiff]


class InstanceOut(BaseModel):
    source_sop_uid: str
    sop_uid: str
    status: str
    code: int | None
    detail: str
    attempts: int

    @classmethod
    def of(cls, row: ImportInstance) -> InstanceOut:
        return cls(
            source_sop_uid=row.source_sop_uid, sop_uid=row.sop_uid, status=row.status, code=row.code,
            detail=row.detail, attempts=row.attempts,
        )  # fmt: skip


class ImportOut(BaseModel):
    id: int
    job_id: int | None
    study_uid: str
    delivered_study_uid: str
    facility: str
    source_facility: str
    accession_policy: str
    via: str
    status: str
    total: int
    sent: int
    failed: int
    verified: int | None
    message: str
    plan: dict[str, Any]
    created_at: datetime
    finished_at: datetime | None
    # Still `running`, but waiting for its job's next attempt after a transient failure (the
    # destination unreachable): not before this time.
    retry_at: datetime | None = None
    instances: list[InstanceOut] | None = None

    @classmethod
    def of(
        cls, row: ImportJob, instances: list[ImportInstance] | None = None, retry_at: datetime | None = None
    ) -> ImportOut:
        assert row.id is not None
        plan = json.loads(row.plan or "{}")
        return cls(
            id=row.id, job_id=row.job_id, study_uid=row.study_uid,
            delivered_study_uid=str(plan.get("study_uid") or row.study_uid), facility=row.facility_id,
            source_facility=row.source_facility_id, accession_policy=row.accession_policy, via=row.via,
            status=row.status, total=row.total, sent=row.sent, failed=row.failed, verified=row.verified,
            message=row.message, plan=plan, created_at=row.created_at, finished_at=row.finished_at,
            retry_at=retry_at,
            instances=None if instances is None else [InstanceOut.of(i) for i in instances],
        )  # fmt: skip


class DestinationConfig(BaseModel):
    """What studies imported into a facility get, beyond the patient and the accession number.
    Each changed value is kept in OriginalAttributesSequence like every other coercion."""

    study_id_policy: Literal["keep", "empty", "from-accession"] = Field(
        default="keep", description="StudyID: keep it, empty it, or the accession number as delivered"
    )
    institution: dict[
        Literal["InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName"], str | None
    ] = Field(
        default_factory=dict,
        description="The value to set per institution attribute ('' empties it); absent or null keeps it",
    )


class DestinationConfigOut(DestinationConfig):
    facility: str
    updated_by: str

    @classmethod
    def of(cls, row: ImportDestination) -> DestinationConfigOut:
        return cls(
            facility=row.facility_id, study_id_policy=row.study_id_policy,  # type: ignore[arg-type]
            institution=json.loads(row.institution or "{}"), updated_by=row.updated_by,
        )  # fmt: skip
