"""Import tables: one row per import of a study into a destination archive, and one row per
instance with its own outcome (so a resumed job never resends what already arrived, and every
refusal is reported instance by instance)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def _now() -> datetime:
    return datetime.now(UTC)


class ImportJob(SQLModel, table=True):
    """An import of one study into one facility's archive (IHE IRWF.b).

    `plan` is the reconciliation decided once for the whole study (JSON): the destination's
    patient attributes, the accession number, whether UIDs are renamed. It is fixed when the
    import is queued so that a resumed job applies exactly the same values.
    """

    __tablename__ = "import_job"
    __table_args__ = (Index("ix_import_job_study", "study_uid", "facility_id"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int | None = None  # the durable job (broker.jobs) that runs it
    study_uid: str = Field(max_length=64)
    facility_id: str = Field(max_length=64)  # the destination
    source_facility_id: str = Field(default="", max_length=64)
    patient: str = Field(default="", max_length=128)  # explicit local identifier, if given
    accession_policy: str = Field(default="keep", max_length=8)  # empty | keep | new
    via: str = Field(default="", max_length=8)  # dimse | dicomweb
    status: str = Field(default="queued", max_length=16)  # queued|running|done|failed|cancelled
    plan: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    total: int = 0
    sent: int = 0
    failed: int = 0
    verified: int | None = None
    cancel_requested: bool = False
    message: str = Field(default="", sa_column=Column(Text, nullable=False))
    created_by: str = Field(default="", max_length=128)
    created_at: datetime = Field(default_factory=_now)
    finished_at: datetime | None = None


class ImportInstance(SQLModel, table=True):
    """One instance of an import: pending, sent (with the archive's status), or failed (why)."""

    __tablename__ = "import_instance"
    __table_args__ = (UniqueConstraint("import_id", "source_sop_uid", name="uq_import_instance"),)

    id: int | None = Field(default=None, primary_key=True)
    import_id: int = Field(foreign_key="import_job.id", index=True)
    source_sop_uid: str = Field(max_length=64)
    sop_uid: str = Field(max_length=64)  # as delivered (renamed when the destination clashed)
    status: str = Field(default="pending", max_length=16)  # pending | sent | warning | failed
    code: int | None = None  # DIMSE status, or HTTP status / PS3.18 FailureReason for STOW-RS
    detail: str = Field(default="", max_length=512)
    attempts: int = 0
    updated_at: datetime = Field(default_factory=_now)


class ImportDestination(SQLModel, table=True):
    """How studies imported into one facility's archive are configured beyond the patient and the
    accession: the StudyID policy and the institution attributes (IHE IRWF.b "as configured").

    Kept by the imports domain, keyed by facility id, rather than as columns of the facility
    registry: the registry is shared by every domain, this is the import's own business. No row
    means every such attribute is kept as it came.
    """

    __tablename__ = "import_destination"

    facility_id: str = Field(primary_key=True, max_length=64)
    study_id_policy: str = Field(default="keep", max_length=16)  # keep | empty | from-accession
    # {keyword: value} for InstitutionName / InstitutionAddress / InstitutionalDepartmentName to
    # set ("" empties it); a keyword absent from it is kept.
    institution: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    updated_by: str = Field(default="", max_length=128)
    updated_at: datetime = Field(default_factory=_now)
