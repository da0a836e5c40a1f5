"""Request and response shapes of the facility registry."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

FACILITY_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# PS3.5 AE: up to 16 characters of the default repertoire, no backslash or control characters.
AE_TITLE = r"^[ -\[\]-~]{1,16}$"


class SharingPolicy(StrEnum):
    share_all = "share_all"  # index and pixels are shared
    index_only = "index_only"  # studies are found; pixels stay at the facility until fetched
    none = "none"  # nothing is shared


class CallingAE(BaseModel):
    """An AE title the facility calls the broker from, and the network it calls from."""

    ae_title: str = Field(pattern=AE_TITLE)
    network: str | None = Field(
        default=None,
        max_length=64,
        description="CIDR (or one address) the AE calls from; associations from elsewhere are "
        "rejected. Default: loopback only.",
    )
    certificate: str | None = Field(
        default=None,
        max_length=512,
        description="Under DICOM TLS with client certificates, the certificate this AE title must "
        "present: sha256:<fingerprint> or subject:<RFC 4514 name>. That certificate can then "
        "associate as no other AE title.",
    )


class ConsentPolicy(StrEnum):
    opt_out = "opt-out"  # shared with other facilities unless the person opted out
    opt_in = "opt-in"  # shared with other facilities only if the person opted in


class FacilityIn(BaseModel):
    id: str = Field(pattern=FACILITY_ID)
    issuer: str = Field(min_length=1, max_length=128, description="Issuer of Patient ID (0010,0021).")
    name: str = Field(default="", max_length=256)
    dicomweb_url: str | None = Field(
        default=None, max_length=1024, description="Base URL of the archive's DICOMweb service."
    )
    ae_title: str | None = Field(default=None, pattern=AE_TITLE, description="The archive's AE title.")
    host: str | None = Field(default=None, max_length=255)
    port: int | None = Field(default=None, ge=1, le=65535)
    calling_ae_titles: list[str] = Field(
        default_factory=list,
        description="AE titles the facility calls the broker from, from loopback only (see calling_aes).",
    )
    calling_aes: list[CallingAE] = Field(
        default_factory=list, description="AE titles the facility calls from, each with its network."
    )
    sharing_policy: SharingPolicy = SharingPolicy.share_all
    consent_policy: ConsentPolicy = Field(
        default=ConsentPolicy.opt_out, description="Patients' consent model for this facility's records."
    )


class FacilityUpdate(BaseModel):
    """Only the fields given change; `null` clears an endpoint."""

    issuer: str | None = Field(default=None, min_length=1, max_length=128)
    name: str | None = Field(default=None, max_length=256)
    dicomweb_url: str | None = Field(default=None, max_length=1024)
    ae_title: str | None = Field(default=None, pattern=AE_TITLE)
    host: str | None = Field(default=None, max_length=255)
    port: int | None = Field(default=None, ge=1, le=65535)
    calling_ae_titles: list[str] | None = None
    calling_aes: list[CallingAE] | None = Field(
        default=None, description="Replaces the calling AE titles (with calling_ae_titles, if both given)."
    )
    sharing_policy: SharingPolicy | None = None
    consent_policy: ConsentPolicy | None = None


class SyncStateOut(BaseModel):
    last_job_id: int | None
    last_started_at: datetime | None
    last_completed_at: datetime | None
    last_status: str
    last_error: str
    studies_at_facility: int


class FacilityOut(BaseModel):
    id: str
    issuer: str
    name: str
    dicomweb_url: str | None = None
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    calling_ae_titles: list[str] = Field(default_factory=list)
    calling_aes: list[CallingAE] = Field(default_factory=list)
    sharing_policy: SharingPolicy = SharingPolicy.share_all
    consent_policy: ConsentPolicy = ConsentPolicy.opt_out
    sync: SyncStateOut | None = None
