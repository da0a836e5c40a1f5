"""The one index: patients, studies, series and instances.

Rows hold every attribute QIDO-RS and C-FIND match on (denormalised down to the study so
a study query never joins), the response fragments each level returns, and per instance
the full DICOM JSON metadata computed once at ingest; and where each study is held
(`StudyLocation`: at which facility, and whether the broker has its pixels).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, Column, ForeignKey, Index, LargeBinary, String, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def _now() -> datetime:
    return datetime.now(UTC)


class Patient(SQLModel, table=True):
    """One (issuer, Patient ID) as a facility knows it; `person_id` links it to a person (MPI)."""

    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("issuer", "patient_id", name="uq_patient_issuer_id"),)

    pk: int | None = Field(default=None, primary_key=True)
    facility_id: str = Field(foreign_key="facility.id", index=True, max_length=64)
    issuer: str = Field(max_length=128)
    patient_id: str = Field(max_length=128)
    # PatientName with all its component groups, `Yamada^Tarou=山田^太郎=やまだ^たろう` (what
    # patient-level answers return); the Alphabetic group casefolded (case-insensitive matching)
    # and also folded (fuzzy matching: json_model.fuzzy_pn); the Ideographic and Phonetic groups
    # likewise, each in a column of its own so a query on any group is an index prefix scan.
    patient_name: str = Field(default="", max_length=512)
    name_norm: str = Field(default="", max_length=512, index=True)
    name_fuzzy: str = Field(default="", max_length=512)
    name_ideographic: str = Field(default="", max_length=256, index=True)
    name_ideographic_fuzzy: str = Field(default="", max_length=256)
    name_phonetic: str = Field(default="", max_length=256, index=True)
    name_phonetic_fuzzy: str = Field(default="", max_length=256)
    birth_date: str = Field(default="", max_length=8)
    sex: str = Field(default="", max_length=16)
    # PatientAddress and the first PatientTelephoneNumbers as ingest last gave them to the
    # identity linker (`ingest.contact_columns`): a new study's header that says otherwise
    # relinks the patient, as a changed name does. "" until a header gives them; never
    # erased by a header that leaves them out.
    address: str = Field(default="", max_length=512)
    phone: str = Field(default="", max_length=64)
    person_id: int | None = Field(default=None, index=True)
    updated_at: datetime = Field(default_factory=_now)


class Study(SQLModel, table=True):
    __tablename__ = "study"
    __table_args__ = (
        Index("ix_study_patient_id", "patient_id"),
        Index("ix_study_accession", "accession_number"),
        Index("ix_study_date", "study_date"),
        Index("ix_study_name_norm", "name_norm"),
        Index("ix_study_name_fuzzy", "name_fuzzy"),
        Index("ix_study_name_ideographic", "name_ideographic"),
        Index("ix_study_name_ideographic_fuzzy", "name_ideographic_fuzzy"),
        Index("ix_study_name_phonetic", "name_phonetic"),
        Index("ix_study_name_phonetic_fuzzy", "name_phonetic_fuzzy"),
        Index("ix_study_facility", "facility_id", "pk"),
    )

    pk: int | None = Field(default=None, primary_key=True)
    study_uid: str = Field(max_length=64, unique=True)
    facility_id: str = Field(foreign_key="facility.id", max_length=64)
    patient_pk: int = Field(foreign_key="patient.pk", index=True)
    # Patient attributes copied down so study-level matching needs no join.
    patient_id: str = Field(default="", max_length=128)
    # The issuer that qualifies patient_id for the broker (ingest.patient_issuer), and the
    # object's own IssuerOfPatientID ("" when it has none): queries match either, answer the
    # object's own value when there is one.
    issuer: str = Field(default="", max_length=128)
    issuer_in_data: str = Field(default="", max_length=64)
    patient_name: str = Field(default="", max_length=512)  # all component groups, as Patient's
    name_norm: str = Field(default="", max_length=512)
    name_fuzzy: str = Field(default="", max_length=512)
    name_ideographic: str = Field(default="", max_length=256)
    name_ideographic_fuzzy: str = Field(default="", max_length=256)
    name_phonetic: str = Field(default="", max_length=256)
    name_phonetic_fuzzy: str = Field(default="", max_length=256)
    birth_date: str = Field(default="", max_length=8)
    sex: str = Field(default="", max_length=16)
    study_date: str = Field(default="", max_length=8)
    study_time: str = Field(default="", max_length=32)
    accession_number: str = Field(default="", max_length=64)
    study_id: str = Field(default="", max_length=64)
    study_description: str = Field(default="", max_length=256)
    # ReferringPhysicianName's groups, casefolded: matched as PatientName's are, in any group.
    # Not indexed, as the Alphabetic group never was: it narrows a query other keys select.
    referring_physician: str = Field(default="", max_length=256)
    referring_physician_ideographic: str = Field(default="", max_length=256)
    referring_physician_phonetic: str = Field(default="", max_length=256)
    # "\CT\SR\": backslash-delimited so one LIKE '%\CT\%' matches a modality exactly.
    modalities: str = Field(default="", max_length=256)
    num_series: int = 0
    num_instances: int = 0
    # Study-level attributes (patient + study modules) as a DICOM JSON object.
    study_json: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    updated_at: datetime = Field(default_factory=_now)


class Series(SQLModel, table=True):
    __tablename__ = "series"
    __table_args__ = (Index("ix_series_study", "study_pk", "pk"), Index("ix_series_modality", "modality"))

    pk: int | None = Field(default=None, primary_key=True)
    series_uid: str = Field(max_length=64, unique=True)
    study_pk: int = Field(foreign_key="study.pk")
    modality: str = Field(default="", max_length=16)
    series_number: int | None = None
    series_description: str = Field(default="", max_length=256)
    body_part: str = Field(default="", max_length=64)
    pps_start_date: str = Field(default="", max_length=8)
    pps_start_time: str = Field(default="", max_length=32)
    num_instances: int = 0
    series_json: str = Field(default="{}", sa_column=Column(Text, nullable=False))


class Instance(SQLModel, table=True):
    __tablename__ = "instance"
    __table_args__ = (
        Index("ix_instance_series", "series_pk", "pk"),
        Index("ix_instance_study", "study_pk", "pk"),
    )

    pk: int | None = Field(default=None, primary_key=True)
    sop_uid: str = Field(max_length=64, unique=True)
    series_pk: int = Field(foreign_key="series.pk")
    study_pk: int = Field(foreign_key="study.pk")
    facility_id: str = Field(foreign_key="facility.id", max_length=64)
    sop_class_uid: str = Field(default="", max_length=64)
    instance_number: int | None = None
    transfer_syntax_uid: str = Field(default="", max_length=64)
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int | None = None
    size: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    sha256: str = Field(max_length=64)
    object_key: str = Field(max_length=512)
    # Instance-level QIDO attributes, and the full WADO-RS metadata (bulk data as BulkDataURI
    # relative to a placeholder base that is filled in when served).
    instance_json: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    metadata_json: bytes = Field(default=b"{}", sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=_now)


class InstanceConflict(SQLModel, table=True):
    """A different object that arrived under an existing SOP Instance UID: kept apart, never merged."""

    __tablename__ = "instance_conflict"

    pk: int | None = Field(default=None, primary_key=True)
    sop_uid: str = Field(max_length=64, index=True)
    facility_id: str = Field(max_length=64)
    sha256: str = Field(max_length=64)
    size: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    object_key: str = Field(max_length=512)
    received_at: datetime = Field(default_factory=_now)


class StudyLocation(SQLModel, table=True):
    """Where a study is held, and whether the broker has its pixels.

    The remote counts are what the facility reported at the last sync; a study whose counts
    did not change is not asked about again (incremental sync). `seen_job` is the sync job that
    last saw the study at the facility: after a complete listing, rows another job saw are gone.
    """

    __tablename__ = "study_location"
    __table_args__ = (Index("ix_study_location_facility_seen", "facility_id", "seen_job"),)

    study_uid: str = Field(primary_key=True, max_length=64)
    facility_id: str = Field(
        sa_column=Column(String(64), ForeignKey("facility.id", ondelete="CASCADE"), primary_key=True)
    )
    has_pixels: bool = False
    remote_series: int = 0
    remote_instances: int = 0
    seen_job: int | None = None
    synced_at: datetime = Field(default_factory=_now)
    fetched_at: datetime | None = None


class SeriesFacts(SQLModel, table=True):
    """What the prior lookup needs of a series that the series JSON does not hold (image-level
    values), aggregated once at ingest or by the facts job: never per lookup."""

    __tablename__ = "series_facts"

    series_pk: int = Field(primary_key=True)
    study_pk: int = Field(index=True)
    min_slice_thickness_mm: float | None = None
    contrast_agent: str = Field(default="", max_length=64)
    laterality: str = Field(default="", max_length=16)
    body_part: str = Field(default="", max_length=64)
    instances: int = 0


class DoseFact(SQLModel, table=True):
    """One instance's DoseRecord (broker.dicom.dose), as JSON, for the instances that carry dose:
    dose SRs and dose-carrying images. Per image only what study_dose uses is kept (CTDIvol,
    phantom, z, event UID, localizer), so a CT of hundreds of images stays small."""

    __tablename__ = "dose_fact"

    sop_uid: str = Field(primary_key=True, max_length=64)
    study_pk: int = Field(index=True)
    record_json: str = Field(sa_column=Column(Text, nullable=False))


class StudyFacts(SQLModel, table=True):
    """Marks a study whose series and dose facts are computed (with the facts' version), so the
    facts job knows what is left to do."""

    __tablename__ = "study_facts"

    study_pk: int = Field(primary_key=True)
    version: int = 1
    computed_at: datetime = Field(default_factory=_now)


class IntegrityFinding(SQLModel, table=True):
    """An instance whose object `scanonce verify --repair` found missing or changed (SHA-256),
    kept until a later run finds it whole again (`resolved_at`): what to restore from backup or
    ask the facility to send again."""

    __tablename__ = "integrity_finding"

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=16)  # missing | mismatch
    sop_uid: str = Field(max_length=64, index=True)
    facility_id: str = Field(max_length=64)
    object_key: str = Field(max_length=512)
    found_at: datetime = Field(default_factory=_now)
    last_seen_at: datetime | None = None
    resolved_at: datetime | None = None
