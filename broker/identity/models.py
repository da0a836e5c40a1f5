"""Identity (MPI) tables: persons, the identifier records linked to them, blocking keys, links, review.

A *record* is one (issuer, value) with the demographics a facility or a feed sent for it. A
*person* is the set of records believed to be one human being; the index's `patient.person_id`
mirrors the record's person so every study follows its person.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def _now() -> datetime:
    return datetime.now(UTC)


class Person(SQLModel, table=True):
    __tablename__ = "identity_person"

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(default_factory=_now)


class IdentityRecord(SQLModel, table=True):
    """One (issuer, value) and its normalised demographics (`matching.Demographics`: upper case,
    Latin letters in ASCII, '' when unknown)."""

    __tablename__ = "identity_record"
    __table_args__ = (
        UniqueConstraint("issuer", "value", name="uq_identity_record_issuer_value"),
        Index("ix_identity_record_person", "person_id"),
        Index("ix_identity_record_family", "family"),
        Index("ix_identity_record_given", "given"),
        Index("ix_identity_record_patient_pk", "patient_pk"),
    )

    id: int | None = Field(default=None, primary_key=True)
    issuer: str = Field(max_length=128)
    value: str = Field(max_length=128)
    person_id: int
    facility_id: str | None = Field(default=None, max_length=64)
    patient_pk: int | None = None
    source: str = Field(default="dicom", max_length=16)
    family: str = Field(default="", max_length=128)
    given: str = Field(default="", max_length=128)
    middle: str = Field(default="", max_length=128)
    birth_date: str = Field(default="", max_length=8)
    sex: str = Field(default="", max_length=1)
    address: str = Field(default="", max_length=512)
    phone: str = Field(default="", max_length=32)
    # Set by an A40 merge: this identifier is retired in favour of another record.
    merged_into: int | None = None
    updated_at: datetime = Field(default_factory=_now)


class IdentityName(SQLModel, table=True):
    """Another name a record is known by: a DICOM PatientName's Ideographic or Phonetic group
    (山田^太郎, やまだ^たろう of `Yamada^Tarou=山田^太郎=やまだ^たろう`), or a feed's ideographic or
    phonetic name (FHIR IDE/SYL, HL7 XPN.8 I/P), normalised as the record's own name is.
    Searched (PDQm, the lookup page), never compared when linking: the record's own name
    (`family`, `given`) stays its Alphabetic group. Rows only for records that have such a
    name, so a site whose names are all Latin writes none."""

    __tablename__ = "identity_name"
    __table_args__ = (
        Index("ix_identity_name_family", "family"),
        Index("ix_identity_name_given", "given"),
    )

    record_id: int = Field(primary_key=True)
    family: str = Field(default="", primary_key=True, max_length=128)
    given: str = Field(default="", primary_key=True, max_length=128)
    # ISO 21090: IDE (ideographic) or SYL (phonetic), as a FHIR read shows it; "" for a row
    # stored before 0014 that no header of the record names (its next feed message says).
    representation: str = Field(default="", max_length=3)


class IdentityIdentifier(SQLModel, table=True):
    """Further identifiers a record carries (OtherPatientIDsSequence, FHIR identifiers, PID-3 repeats)."""

    __tablename__ = "identity_identifier"
    __table_args__ = (
        UniqueConstraint("record_id", "issuer", "value", name="uq_identity_identifier"),
        Index("ix_identity_identifier_value", "issuer", "value"),
    )

    id: int | None = Field(default=None, primary_key=True)
    record_id: int = Field(foreign_key="identity_record.id")
    issuer: str = Field(max_length=128)
    value: str = Field(max_length=128)


class BlockKey(SQLModel, table=True):
    """Indexed blocking keys: a new record meets only the records sharing one of its keys."""

    __tablename__ = "identity_block"
    __table_args__ = (Index("ix_identity_block_record", "record_id"),)

    key: str = Field(primary_key=True, max_length=64)
    record_id: int = Field(primary_key=True)


class TrustedIssuer(SQLModel, table=True):
    """An issuer whose identifiers are the same person wherever they appear (e.g. a national ID)."""

    __tablename__ = "identity_trusted_issuer"

    issuer: str = Field(primary_key=True, max_length=128)
    note: str = Field(default="", max_length=256)


class LinkEvent(SQLModel, table=True):
    """Every change of a record's person, how it was made and why (an append-only history)."""

    __tablename__ = "identity_link"
    __table_args__ = (
        Index("ix_identity_link_record", "record_id", "id"),
        Index("ix_identity_link_group", "group_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    record_id: int
    person_id: int
    previous_person_id: int | None = None
    # new | identifier | trusted-identifier | probabilistic | manual-link | manual-unlink | merge | unmerge
    method: str = Field(max_length=32)
    weight: float | None = None
    matched_record_id: int | None = None
    # JSON: per-field comparison level and log2 Bayes factor.
    contributions: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    # Records moved together (a merge) share a group so an unlink can split them back.
    group_id: str = Field(default="", max_length=36)
    who: str = Field(default="system", max_length=128)
    why: str = Field(default="", max_length=512)
    created_at: datetime = Field(default_factory=_now)


class ReviewItem(SQLModel, table=True):
    """A candidate pair between the thresholds: a human decides."""

    __tablename__ = "identity_review"
    __table_args__ = (
        Index("ix_identity_review_status", "status", "id"),
        Index("ix_identity_review_record", "record_id"),
        # The lookup asks for open items naming a person's records on either side.
        Index("ix_identity_review_candidate", "candidate_record_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    record_id: int
    candidate_record_id: int
    weight: float
    contributions: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    status: str = Field(default="open", max_length=16)  # open | linked | rejected | superseded
    decided_by: str | None = Field(default=None, max_length=128)
    reason: str | None = Field(default=None, max_length=512)
    decided_at: datetime | None = None
    created_at: datetime = Field(default_factory=_now)


class NoLink(SQLModel, table=True):
    """A human said these two records are different people: automatic linking must respect it."""

    __tablename__ = "identity_nolink"

    record_a: int = Field(primary_key=True)
    record_b: int = Field(primary_key=True)
    who: str = Field(default="", max_length=128)
    why: str = Field(default="", max_length=512)
    created_at: datetime = Field(default_factory=_now)


class ModelParams(SQLModel, table=True):
    """Fellegi–Sunter m/u parameters estimated from the data (EM); the newest row is used."""

    __tablename__ = "identity_model"

    id: int | None = Field(default=None, primary_key=True)
    params: str = Field(sa_column=Column(Text, nullable=False))
    pairs: int = 0
    created_at: datetime = Field(default_factory=_now)


class IdentitySetting(SQLModel, table=True):
    """Small named facts about the identity tables themselves (e.g. which version of
    `matching.block_keys` the stored blocking keys were computed with)."""

    __tablename__ = "identity_setting"

    name: str = Field(primary_key=True, max_length=64)
    value: str = Field(default="", max_length=512)
