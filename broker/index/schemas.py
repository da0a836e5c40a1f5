"""Shapes the index hands to its callers (DICOMweb, DIMSE, FHIR, lookup)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Level = Literal["patient", "study", "series", "instance"]


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    status: Literal["stored", "duplicate", "failed"]
    failure_reason: int | None = None  # broker.dicom.status code when failed
    message: str = ""  # readable, never patient data

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    @classmethod
    def failed(cls, reason: int, message: str, **uids: str) -> StoreOutcome:
        """A failure naming the UIDs read before it (`sop_class_uid`, `sop_instance_uid`,
        `study_uid`, `series_uid`; empty where none were)."""
        return cls(
            sop_class_uid=uids.get("sop_class_uid", ""),
            sop_instance_uid=uids.get("sop_instance_uid", ""),
            study_uid=uids.get("study_uid", ""),
            series_uid=uids.get("series_uid", ""),
            status="failed",
            failure_reason=reason,
            message=message,
        )


@dataclass
class Query:
    """One question to the index, the same whether it came by QIDO-RS, C-FIND or FHIR.

    `filters` maps a DICOM keyword (or 8-hex tag) to a PS3.4 C.2.2.2 match value, already
    URL-decoded; an empty value is universal matching (return the attribute). `retrieve_base`
    (e.g. "http://host/dicom-web") makes matches carry RetrieveURL.
    """

    level: Level
    filters: dict[str, str] = field(default_factory=dict)
    # Keys a QIDO-RS query gives more than once: a match is any of these values. Each is in
    # `filters` too (with its first value), so that it is returned like any other key asked.
    any_of: dict[str, tuple[str, ...]] = field(default_factory=dict)
    study_uid: str | None = None
    series_uid: str | None = None
    facility_id: str | None = None
    fuzzy: bool = False
    includefields: frozenset[str] | Literal["all"] = frozenset()
    limit: int = 100
    offset: int = 0
    retrieve_base: str | None = None
    # Only the studies (series, instances) of these patient rows: a person's records, as FHIR
    # ImagingStudy search asks for them. An empty tuple matches nothing; None does not constrain.
    patient_pks: tuple[int, ...] | None = None
    # Study level only: studies having a series whose BodyPartExamined is one of these.
    body_parts: tuple[str, ...] | None = None
    # Study level only: "pk" (arrival order, what QIDO-RS and C-FIND page by), "date" or "-date"
    # (StudyDate then StudyTime, oldest or newest first; undated studies sort as the oldest).
    order: Literal["pk", "date", "-date"] = "pk"
    # Which records the caller may see (consent, purpose of use): called with the columns naming a
    # record's facility and patient row, it returns an SQL condition every match must meet (built
    # by broker.consent, which sits above the index). None: no limit (administrators, the broker).
    visible: Callable[[Any, Any], Any] | None = None


@dataclass
class QueryResult:
    matches: list[dict[str, Any]]  # DICOM JSON model objects (PS3.18 F.2), UTF-8
    more: bool  # cut by limit: more matches exist past offset+limit
    warnings: list[str] = field(default_factory=list)  # e.g. keys not supported for matching


@dataclass(frozen=True, slots=True)
class StudyOwner:
    """Where a study came from and whose it is (`index.study_owners`)."""

    facility_id: str
    issuer: str  # the broker's issuer qualifying patient_id (the sending facility's)
    patient_id: str
    person_id: int | None


@dataclass(frozen=True, slots=True)
class InstanceRef:
    """Where one stored instance is, for retrieve."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    object_key: str
    size: int
    number_of_frames: int | None
    facility_id: str
    rows: int | None = None  # Rows (0028,0010): set for an instance with pixels
