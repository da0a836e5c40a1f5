"""Facility registry tables: facilities, the AE titles they call from, and the state of each
facility's last index sync (written by federation through this domain's service)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Column, ForeignKey, String
from sqlmodel import Field, SQLModel


def _now() -> datetime:
    return datetime.now(UTC)


class Facility(SQLModel, table=True):
    """A federated archive. Its `issuer` qualifies every Patient ID it sends."""

    __tablename__ = "facility"

    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(default="", max_length=256)
    issuer: str = Field(max_length=128, unique=True)
    created_at: datetime = Field(default_factory=_now)
    # Where the facility's archive answers: DICOMweb, DIMSE, or both (DICOMweb is preferred).
    dicomweb_url: str | None = Field(default=None, max_length=1024)
    ae_title: str | None = Field(default=None, max_length=16)
    host: str | None = Field(default=None, max_length=255)
    port: int | None = None
    # share_all | index_only (pixels stay at the facility) | none (not shared at all)
    sharing_policy: str = Field(default="share_all", max_length=16)
    # Patients' consent model for this facility's records: "opt-out" (shared unless the person
    # opted out) or "opt-in" (shared with other facilities only once the person opted in).
    consent_policy: str = Field(default="opt-out", max_length=8)


class FacilityAE(SQLModel, table=True):
    """An AE title a facility calls the broker from: identifies the facility of a DIMSE caller.

    The AE title is the key so that one caller can never be claimed by two facilities. A calling
    AE title is trivially spoofed, so it is accepted only from `network` (a CIDR; None: loopback
    only): the allow-list is AE title *and* peer address.
    """

    __tablename__ = "facility_ae"

    ae_title: str = Field(primary_key=True, max_length=16)
    facility_id: str = Field(
        sa_column=Column(
            String(64), ForeignKey("facility.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    network: str | None = Field(default=None, max_length=64)
    # Under DICOM TLS with client certificates: the certificate this AE title must present
    # ("sha256:<fingerprint>" or "subject:<RFC 4514 name>", broker.security.tls); such a
    # certificate can then associate as no other AE title. None: any the CA signed that is bound
    # to no AE title.
    certificate: str | None = Field(default=None, max_length=512, index=True)


class SyncState(SQLModel, table=True):
    """The last index sync of a facility's archive."""

    __tablename__ = "sync_state"

    facility_id: str = Field(
        sa_column=Column(String(64), ForeignKey("facility.id", ondelete="CASCADE"), primary_key=True)
    )
    last_job_id: int | None = None
    last_started_at: datetime | None = None
    last_completed_at: datetime | None = None
    last_status: str = Field(default="", max_length=16)
    last_error: str = Field(default="", max_length=1024)
    studies_at_facility: int = 0
