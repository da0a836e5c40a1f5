"""The index's public face: ingest, the one query engine, what retrieve needs, and the rows of
studies held at facility archives (written for federation's index sync and retrieve on demand).

Every function is keyword-only and blocking (database and storage I/O): async callers run it
in a thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson
from sqlalchemy import Select, select
from sqlmodel import Session

from broker.db import core_table
from broker.dicom.json_model import BULK_BASE_BYTES
from broker.dicom.native_xml import native_dicom_model
from broker.dicom.uids import require_uid
from broker.errors import NotFound
from broker.index.batcher import IngestBatcher
from broker.index.facts import (
    FACTS_JOB,
    FACTS_VERSION,
    InstanceFacts,
    SeriesView,
    StudyView,
    compute_missing_facts,
    compute_study_facts,
    ensure_facts_current,
    facts_missing,
    instance_facts,
    newest_patient_headers,
    patient_by_identifier,
    patients_by_pk,
    patients_of_persons,
    register_jobs,
    studies_by_uid,
    studies_of_patients,
    write_facts,
)
from broker.index.ingest import IngestAudit, PatientLinker, ingest_files, set_patient_linker
from broker.index.models import Instance, Patient, Series, Study
from broker.index.packing import unpack_metadata
from broker.index.parse import parse_instance
from broker.index.persons import assign_person, assign_persons, lock_patient_by_identifier, lock_patients
from broker.index.query import count, search, study_owners
from broker.index.remote import (
    has_locations,
    held_instances,
    is_remote_only,
    locations_at,
    mark_local,
    mark_partial,
    mark_seen,
    remote_holders,
    remote_only_count,
    remove_gone,
    study_locations,
    unseen_studies,
    upsert_remote_studies,
)
from broker.index.schemas import InstanceRef, Query, QueryResult, StoreOutcome, StudyOwner

__all__ = [
    "IngestBatcher",
    "PatientLinker",
    "set_patient_linker",
    "ingest_files",
    "IngestAudit",
    "parse_instance",
    "search",
    "count",
    "study_owners",
    "StudyOwner",
    "find_instances",
    "metadata_fragments",
    "render_metadata",
    "render_metadata_xml",
    "Query",
    "QueryResult",
    "StoreOutcome",
    "InstanceRef",
    "study_locations",
    "locations_at",
    "has_locations",
    "unseen_studies",
    "remote_holders",
    "is_remote_only",
    "remote_only_count",
    "mark_seen",
    "upsert_remote_studies",
    "remove_gone",
    "mark_local",
    "mark_partial",
    "held_instances",
    "assign_person",
    "assign_persons",
    "lock_patients",
    "lock_patient_by_identifier",
    "FACTS_JOB",
    "FACTS_VERSION",
    "compute_missing_facts",
    "compute_study_facts",
    "ensure_facts_current",
    "facts_missing",
    "register_jobs",
    "InstanceFacts",
    "SeriesView",
    "StudyView",
    "instance_facts",
    "newest_patient_headers",
    "patient_by_identifier",
    "patients_by_pk",
    "patients_of_persons",
    "studies_by_uid",
    "study_patients",
    "studies_of_patients",
    "write_facts",
]

_study = core_table(Study)
_series = core_table(Series)
_inst = core_table(Instance)
_patient = core_table(Patient)


def study_patients(*, session: Session, study_uids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """The patient (Patient ID, issuer) of each study the index knows, by Study Instance UID
    (the audit trail names the patient of a study a request read)."""
    found: dict[str, tuple[str, str]] = {}
    uids = list(study_uids)
    for start in range(0, len(uids), 500):
        stmt = (
            select(_study.c.study_uid, _patient.c.patient_id, _patient.c.issuer)
            .join(_patient, _patient.c.pk == _study.c.patient_pk)
            .where(_study.c.study_uid.in_(uids[start : start + 500]))
        )
        for uid, pid, issuer in session.execute(stmt):
            found[uid] = (pid, issuer)
    return found


def _scope(
    stmt: Select[Any],
    *,
    study_uid: str,
    series_uid: str | None,
    sop_uid: str | None,
    facility_id: str | None,
) -> Select[Any]:
    stmt = stmt.where(_study.c.study_uid == require_uid(study_uid, "StudyInstanceUID"))
    if series_uid is not None:
        stmt = stmt.where(_series.c.series_uid == require_uid(series_uid, "SeriesInstanceUID"))
    if sop_uid is not None:
        stmt = stmt.where(_inst.c.sop_uid == require_uid(sop_uid, "SOPInstanceUID"))
    if facility_id is not None:
        stmt = stmt.where(_study.c.facility_id == facility_id)
    return stmt


def _not_found(study_uid: str, series_uid: str | None, sop_uid: str | None) -> NotFound:
    if sop_uid is not None:
        return NotFound(f"no instance {sop_uid} in series {series_uid} of study {study_uid}")
    if series_uid is not None:
        return NotFound(f"no series {series_uid} in study {study_uid}")
    return NotFound(f"no study {study_uid}")


def find_instances(
    *,
    session: Session,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    facility_id: str | None = None,
) -> list[InstanceRef]:
    """The stored instances of a study, series or instance, in series then instance order."""
    stmt = (
        select(
            _study.c.study_uid,
            _series.c.series_uid,
            _inst.c.sop_uid,
            _inst.c.sop_class_uid,
            _inst.c.transfer_syntax_uid,
            _inst.c.object_key,
            _inst.c.size,
            _inst.c.number_of_frames,
            _inst.c.facility_id,
            _inst.c.rows,
        )
        .select_from(_inst)
        .join(_series, _series.c.pk == _inst.c.series_pk)
        .join(_study, _study.c.pk == _inst.c.study_pk)
        .order_by(_series.c.series_number, _series.c.pk, _inst.c.instance_number, _inst.c.pk)
    )
    stmt = _scope(stmt, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, facility_id=facility_id)
    refs = [InstanceRef(*row) for row in session.execute(stmt).all()]
    if not refs:
        raise _not_found(study_uid, series_uid, sop_uid)
    return refs


def metadata_fragments(
    *,
    session: Session,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    facility_id: str | None = None,
) -> list[bytes]:
    """Each instance's stored DICOM JSON (bulk data URIs under the placeholder base)."""
    stmt = (
        select(_inst.c.metadata_json)
        .select_from(_inst)
        .join(_series, _series.c.pk == _inst.c.series_pk)
        .join(_study, _study.c.pk == _inst.c.study_pk)
        .order_by(_series.c.series_number, _series.c.pk, _inst.c.instance_number, _inst.c.pk)
    )
    stmt = _scope(stmt, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, facility_id=facility_id)
    frags = [unpack_metadata(row[0]) for row in session.execute(stmt).all()]
    if not frags:
        raise _not_found(study_uid, series_uid, sop_uid)
    return frags


def render_metadata(fragments: list[bytes], *, base: str, chunk: int = 64) -> Iterator[bytes]:
    """The WADO-RS metadata response body: a JSON array of the stored fragments with the
    bulk data base filled in; yielded in chunks so a large study streams."""
    base_b = base.rstrip("/").encode()
    yield b"["
    for start in range(0, len(fragments), chunk):
        part = b",".join(fragments[start : start + chunk]).replace(BULK_BASE_BYTES, base_b)
        yield (b"," + part) if start else part
    yield b"]"


def render_metadata_xml(fragments: list[bytes], *, base: str) -> Iterator[tuple[str, Iterable[bytes]]]:
    """The parts of a WADO-RS XML metadata response: one PS3.19 Native DICOM Model document per
    instance, translated from the same stored JSON (so both encodings carry the same attributes
    and bulk data URIs); translated lazily, one instance at a time."""
    base_b = base.rstrip("/").encode()
    for fragment in fragments:
        attrs = orjson.loads(fragment.replace(BULK_BASE_BYTES, base_b))
        yield "application/dicom+xml", (native_dicom_model(attrs),)
