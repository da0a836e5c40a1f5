"""Ingest: parse each instance once, store its object, then index it.

The order is the rule of the house: the object is in storage before its index row commits, and
an outcome is "stored" only after both. One transaction covers a whole batch (a STOW-RS request
or a group of C-STOREs).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache, partial
from typing import Any, NamedTuple, Protocol

import orjson
from sqlalchemy import String, bindparam, cast, false, func, literal_column, select, tuple_, union_all, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col
from sqlmodel import select as sqlmodel_select

from broker.db import Prepared, core_table
from broker.dicom import status
from broker.dicom.attributes import is_series_level, is_study_level
from broker.dicom.json_model import (
    casefold_pn,
    first_value,
    fuzzy_pn,
    int_value,
    pn_groups,
    pn_string,
    str_value,
)
from broker.errors import NotFound
from broker.facilities.models import Facility
from broker.index.facts import InstanceFacts, write_batch_facts
from broker.index.keys import conflict_key, instance_key
from broker.index.models import Instance, InstanceConflict, IntegrityFinding, Patient, Series, Study, _now
from broker.index.parse import (
    Received,
    _Parsed,
    parse_instance,
    without_main_script,
    worker_pid,
)
from broker.index.parse_worker import start_worker
from broker.index.schemas import StoreOutcome
from broker.metrics import observe_ingest
from broker.security.schemas import Principal
from broker.security.service import authorize
from storage import ObjectInfo, ObjectStore, StoreUnavailable

log = logging.getLogger("scanonce.ingest")

_ATTEMPTS = 8
_PARALLEL_PUTS = 8


class PatientLinker(Protocol):
    """Links new or changed patient rows to persons, in order (the identity domain, a layer
    above the index, implements it). Called inside the ingest transaction, after the rows are
    flushed; `patients`: (row, the DICOM JSON attributes of one of its instances or None)."""

    def __call__(self, *, session: Session, patients: Sequence[tuple[Patient, Any]]) -> None: ...


_linker: PatientLinker | None = None


class IngestAudit(Protocol):
    """Records what a batch stores in the batch's own transaction, just before it commits (the
    audit domain implements it; the caller of ingest passes one). `stored`: per instance, its
    (study UID, patient ID, issuer, status: stored, duplicate or failed). If it raises, nothing
    of the batch commits: no store goes unrecorded."""

    def __call__(self, *, session: Session, stored: Sequence[tuple[str, str, str, str]]) -> None: ...


def set_patient_linker(linker: PatientLinker | None) -> None:
    """Wired once per process by the app factory (`broker.app.build_state`); without it, ingest
    indexes patients without linking them to persons (the index alone, as its own tests use it)."""
    global _linker
    _linker = linker


def link_patient(*, session: Session, patient: Patient, dataset: Any = None) -> None:
    """Link a new or changed patient row (index sync's) through the wired linker."""
    if _linker is not None:
        _linker(session=session, patients=[(patient, dataset)])


def normalize_time(value: str) -> str:
    """HHMMSS.ffffff with missing parts zero-filled, so times compare as strings."""
    value = value.replace(":", "").strip()
    if not value:
        return ""
    main, _, frac = value.partition(".")
    return main.ljust(6, "0")[:6] + ("." + frac if frac else "")


def patient_issuer(*, issuer_in_data: str, facility_issuer: str, registered: set[str]) -> str:
    """The issuer that qualifies a Patient ID a facility sends (ingest and index sync alike).

    IssuerOfPatientID in the data is honoured only when it names a registered issuer; otherwise
    the sending facility's issuer qualifies the ID, so a bare ID never links two patients."""
    issuer_in_data = issuer_in_data.strip()
    return issuer_in_data if issuer_in_data in registered else facility_issuer


def known_issuers(session: Session) -> set[str]:
    """Every registered facility's issuer: the IssuerOfPatientID values the broker honours."""
    return {r[0] for r in session.exec(select(Facility.issuer)).all()}  # type: ignore[call-overload]


def patient_key(
    attrs: dict[str, Any], *, study_uid: str, facility_issuer: str, registered: set[str]
) -> tuple[str, str]:
    """The (issuer, Patient ID) of the patient row a study belongs to; a study without a Patient
    ID gets a patient of its own, never one shared with every other ID-less study."""
    pid = str_value(attrs, "00100020").strip()
    issuer = patient_issuer(
        issuer_in_data=str_value(attrs, "00100021"),
        facility_issuer=facility_issuer,
        registered=registered,
    )
    return issuer, pid or f"~no-id~{study_uid}"


# The row mapping, one for ingest and index sync alike: which attributes fill which columns, cut
# to the column widths.


def level_json(
    attrs: dict[str, Any], pick: Callable[[str], bool], *, drop: Collection[str] = ()
) -> dict[str, Any]:
    """The attributes of one level (`pick`: study or series) that its query answers return;
    `drop`: those the index sets itself instead of copying them."""
    return {k: v for k, v in attrs.items() if k not in drop and pick(k)}


def name_columns(name: Any) -> dict[str, str]:
    """The PatientName columns of a patient or study row, from a DICOM JSON PN object or a PN
    string: the whole name with every component group (what answers return), and each group
    normalised for matching (json_model.casefold_pn, fuzzy_pn)."""
    alphabetic, ideographic, phonetic = groups = pn_groups(name)
    return {
        "patient_name": pn_string(groups),
        "name_norm": casefold_pn(alphabetic),
        "name_fuzzy": fuzzy_pn(alphabetic),
        "name_ideographic": casefold_pn(ideographic),
        "name_ideographic_fuzzy": fuzzy_pn(ideographic),
        "name_phonetic": casefold_pn(phonetic),
        "name_phonetic_fuzzy": fuzzy_pn(phonetic),
    }


def patient_columns(attrs: dict[str, Any]) -> dict[str, Any]:
    """A patient row's demographics."""
    a = attrs
    return {
        **name_columns(first_value(a, "00100010")),
        "birth_date": str_value(a, "00100030")[:8],
        "sex": str_value(a, "00100040")[:16],
    }


_ADDRESS, _TELEPHONES, _STUDY_DATE = "00101040", "00102154", "00080020"


def study_date(attrs: dict[str, Any]) -> str:
    """A study's StudyDate as its row's `study_date` column holds it."""
    return str_value(attrs, _STUDY_DATE)[:8]


def contact_columns(attrs: dict[str, Any]) -> dict[str, Any]:
    """A patient row's address and telephone (ingest's alone: see `_Batch._patients`)."""
    return {"address": str_value(attrs, _ADDRESS)[:512], "phone": str_value(attrs, _TELEPHONES)[:64]}


def study_columns(attrs: dict[str, Any], patient: Patient) -> dict[str, Any]:
    """A study row's matching columns: its own attributes, and its patient's copied down (all
    but `modalities`, the counts and `study_json`, which ingest and sync each set their way)."""
    a = attrs
    return {
        "patient_pk": patient.pk,
        "patient_id": str_value(a, "00100020"),
        "issuer": patient.issuer,
        "issuer_in_data": str_value(a, "00100021").strip(),
        "patient_name": patient.patient_name,
        "name_norm": patient.name_norm,
        "name_fuzzy": patient.name_fuzzy,
        "name_ideographic": patient.name_ideographic,
        "name_ideographic_fuzzy": patient.name_ideographic_fuzzy,
        "name_phonetic": patient.name_phonetic,
        "name_phonetic_fuzzy": patient.name_phonetic_fuzzy,
        "birth_date": patient.birth_date,
        "sex": patient.sex,
        "study_date": study_date(a),
        "study_time": normalize_time(str_value(a, "00080030"))[:32],
        "accession_number": str_value(a, "00080050")[:64],
        "study_id": str_value(a, "00200010")[:64],
        "study_description": str_value(a, "00081030")[:256],
        **referring_columns(first_value(a, "00080090")),
    }


def referring_columns(name: Any) -> dict[str, str]:
    """ReferringPhysicianName's columns of a study row: each component group casefolded."""
    alphabetic, ideographic, phonetic = pn_groups(name)
    return {
        "referring_physician": casefold_pn(alphabetic)[:256],
        "referring_physician_ideographic": casefold_pn(ideographic)[:256],
        "referring_physician_phonetic": casefold_pn(phonetic)[:256],
    }


def series_columns(attrs: dict[str, Any], *, drop: Collection[str] = ()) -> dict[str, Any]:
    """A series row's columns (all but its study and count)."""
    a = attrs
    return {
        "modality": str_value(a, "00080060")[:16],
        "series_number": int_value(a, "00200011"),
        "series_description": str_value(a, "0008103E")[:256],
        "body_part": str_value(a, "00180015")[:64],
        "pps_start_date": str_value(a, "00400244")[:8],
        "pps_start_time": normalize_time(str_value(a, "00400245"))[:32],
        "series_json": orjson.dumps(level_json(a, is_series_level, drop=drop)).decode(),
    }


# The writer's statements, built once and run through the driver (`Prepared`: SQLAlchemy's
# execution of a statement cost more CPU than the database's work for a C-STORE group).
_FACILITY, _INSTANCE, _STUDY, _SERIES = (core_table(m) for m in (Facility, Instance, Study, Series))
_INSTANCE_COLUMNS = [c.name for c in _INSTANCE.columns if c.name != "pk"]
_INSERT_INSTANCES = Prepared(_INSTANCE.insert().inline(), column_keys=_INSTANCE_COLUMNS)
_INSERT_STUDIES = Prepared(
    _STUDY.insert().inline(), column_keys=[c.name for c in _STUDY.columns if c.name != "pk"]
)
_INSERT_SERIES = Prepared(
    _SERIES.insert().inline(), column_keys=[c.name for c in _SERIES.columns if c.name != "pk"]
)
_BUMP_SERIES_INSTANCES = Prepared(
    update(_SERIES)
    .where(_SERIES.c.pk == bindparam("b_pk"))
    .values(num_instances=_SERIES.c.num_instances + bindparam("b_n"))
)
_BUMP_STUDY_INSTANCES = Prepared(
    update(_STUDY)
    .where(_STUDY.c.pk == bindparam("b_pk"))
    .values(num_instances=_STUDY.c.num_instances + bindparam("b_n"))
)
_BUMP_STUDY_SERIES = Prepared(
    update(_STUDY).where(_STUDY.c.pk == bindparam("b_pk")).values(num_series=_STUDY.c.num_series + 1)
)
# A new series' modality joins its study's "\\CT\\MR\\" list unless it is there already: what
# `contains(..., autoescape=True)` says, with the pattern bound (`_like_escaped`) so the
# statement is built once.
_ADD_STUDY_MODALITY = Prepared(
    update(_STUDY)
    .where(_STUDY.c.pk == bindparam("b_pk"), ~_STUDY.c.modalities.like(bindparam("b_pattern"), escape="/"))
    .values(modalities=_STUDY.c.modalities + bindparam("b_suffix"))
)


_BS = "\\"


def _like_escaped(text: str) -> str:
    """`text` matched literally by a LIKE with ESCAPE '/'."""
    return text.replace("/", "//").replace("%", "/%").replace("_", "/_")


# What a batch needs to know before it writes, in one round trip: its facility and every
# registered issuer, the stored SHA-256 of each of its SOP Instance UIDs, and the keys of its
# studies and series that exist already. Keys are read as text so the branches share columns.
# One statement per shape (how many UIDs of each kind, each rounded up to a power of two and
# padded with a repeat): run through the driver, without SQLAlchemy's expanding of IN lists
# per execution, and a handful of shapes cover every group and batch.
_KNOWN_CHUNK = 512


@lru_cache(maxsize=64)
def _known_statement(sops: int, studies: int, series: int) -> Prepared:
    def among(column: Any, prefix: str, n: int) -> Any:
        return column.in_([bindparam(f"{prefix}{k}") for k in range(n)]) if n else false()

    return Prepared(
        union_all(
            select(
                literal_column("'f'").label("kind"), _FACILITY.c.id.label("k"), _FACILITY.c.issuer.label("v")
            ),
            select(literal_column("'i'"), _INSTANCE.c.sop_uid, _INSTANCE.c.sha256).where(
                among(_INSTANCE.c.sop_uid, "i", sops)
            ),
            select(literal_column("'t'"), _STUDY.c.study_uid, cast(_STUDY.c.pk, String)).where(
                among(_STUDY.c.study_uid, "t", studies)
            ),
            select(literal_column("'s'"), _SERIES.c.series_uid, cast(_SERIES.c.pk, String)).where(
                among(_SERIES.c.series_uid, "s", series)
            ),
        )
    )


def _padded(values: list[str], prefix: str, params: dict[str, str]) -> int:
    """Bind `values` as prefix0, prefix1, ... up to the next power of two; returns that size."""
    if not values:
        return 0
    size = 1 << (len(values) - 1).bit_length()
    for k in range(size):
        params[f"{prefix}{k}"] = values[k] if k < len(values) else values[0]
    return size


@lru_cache(maxsize=32)
def _pks_statement(kind: str, n: int) -> Prepared:
    table, uid = (_STUDY, _STUDY.c.study_uid) if kind == "t" else (_SERIES, _SERIES.c.series_uid)
    return Prepared(select(uid, table.c.pk).where(uid.in_([bindparam(f"{kind}{k}") for k in range(n)])))


def _pks_of(conn: Any, kind: str, uids: list[str]) -> dict[str, int]:
    """The keys of the study ("t") or series ("s") rows of `uids`, as the batch just inserted them."""
    found: dict[str, int] = {}
    for start in range(0, len(uids), _KNOWN_CHUNK):
        params: dict[str, str] = {}
        n = _padded(uids[start : start + _KNOWN_CHUNK], kind, params)
        found.update((uid, int(pk)) for uid, pk in _pks_statement(kind, n).all(conn, params))
    return found


class _Known(NamedTuple):
    issuer_of: dict[str, str]  # facility id -> issuer, every facility
    sha_of: dict[str, str]  # SOP Instance UID -> SHA-256 of the stored object
    study_pks: dict[str, int]
    series_pks: dict[str, int]


def _read_known(
    session: Session, *, sop_uids: list[str], study_uids: list[str], series_uids: list[str]
) -> _Known:
    known = _Known({}, {}, {}, {})
    into = {"f": known.issuer_of, "i": known.sha_of}
    pks = {"t": known.study_pks, "s": known.series_pks}
    longest = max(len(sop_uids), len(study_uids), len(series_uids))
    for start in range(0, max(longest, 1), _KNOWN_CHUNK):
        end = start + _KNOWN_CHUNK
        params: dict[str, str] = {}
        shape = (
            _padded(sop_uids[start:end], "i", params),
            _padded(study_uids[start:end], "t", params),
            _padded(series_uids[start:end], "s", params),
        )
        for kind, key, value in _known_statement(*shape).all(session, params):
            if kind in into:
                into[kind][key] = value
            else:
                pks[kind][key] = int(value)
    return known


class _FacilityRef(NamedTuple):
    """What a batch needs of its facility's row."""

    id: str
    issuer: str


class _Batch:
    """The patient, study and series rows one batch touches: existing ones known by key from the
    batch's one read (`_read_known`), new ones inserted with one flush per table, so a batch of
    N instances costs a handful of statements, not several per instance."""

    def __init__(
        self,
        session: Session,
        facility: _FacilityRef,
        issuers: set[str],
        *,
        study_pks: dict[str, int],
        series_pks: dict[str, int],
    ) -> None:
        self.session = session
        self.facility = facility
        self.issuers = issuers
        self.study_pks = study_pks  # study UID -> pk, existing and (after `prepare`) new
        self.series_pks = series_pks
        self.new_study_pks: set[int] = set()
        self.new_series: list[tuple[int, str]] = []  # (study pk, modality) of series added to old studies
        self.new_series_pks: set[int] = set()

    def _patient_key(self, p: _Parsed) -> tuple[str, str]:
        return patient_key(
            p.attrs, study_uid=p.study_uid, facility_issuer=self.facility.issuer, registered=self.issuers
        )

    def prepare(self, pending: list[_Parsed]) -> None:
        session = self.session
        first_of_study: dict[str, _Parsed] = {}
        first_of_series: dict[str, _Parsed] = {}
        in_study: dict[str, int] = {}
        in_series: dict[str, int] = {}
        for p in pending:
            first_of_study.setdefault(p.study_uid, p)
            first_of_series.setdefault(p.series_uid, p)
            in_study[p.study_uid] = in_study.get(p.study_uid, 0) + 1
            in_series[p.series_uid] = in_series.get(p.series_uid, 0) + 1

        new_studies = [p for uid, p in first_of_study.items() if uid not in self.study_pks]
        new_series = [p for uid, p in first_of_series.items() if uid not in self.series_pks]
        # New study and series rows are inserted as Core rows through the driver (`Prepared`),
        # their keys read back by UID: building and flushing ORM objects cost ~1 ms of CPU per
        # study here. Patients stay ORM objects: the identity domain links them as such.
        now = _now()
        studies: dict[str, dict[str, Any]] = {}
        if new_studies:
            patients = self._patients(new_studies)
            for p in new_studies:
                patient = patients[self._patient_key(p)]
                a = p.attrs
                studies[p.study_uid] = {
                    "study_uid": p.study_uid,
                    "facility_id": self.facility.id,
                    **study_columns(a, patient),
                    "modalities": "\\",
                    # New rows get their counts here; `_index_batch` bumps only existing rows.
                    "num_series": 0,
                    "num_instances": in_study[p.study_uid],
                    "study_json": orjson.dumps(level_json(a, is_study_level)).decode(),
                    "updated_at": now,
                }
        series_columns_of: dict[str, dict[str, Any]] = {}
        for p in new_series:
            columns = series_columns_of[p.series_uid] = series_columns(p.attrs)
            modality = columns["modality"]
            study = studies.get(p.study_uid)
            if study is not None:
                # A new study's counters and modalities are set before its insert, not bumped
                # later (and not by an UPDATE right after it).
                study["num_series"] += 1
                if modality and f"\\{modality}\\" not in study["modalities"]:
                    study["modalities"] += modality + "\\"
        if studies:
            # What the ORM holds (new or changed patients, what linking them added) goes first,
            # as one flush of everything did before.
            session.flush()
            conn = session.connection()
            _INSERT_STUDIES.run(conn, list(studies.values()))
            self.study_pks.update(_pks_of(conn, "t", list(studies)))
            self.new_study_pks = {self.study_pks[uid] for uid in studies}
        if new_series:
            rows: list[dict[str, Any]] = []
            for p in new_series:
                study_pk = self.study_pks[p.study_uid]
                columns = series_columns_of[p.series_uid]
                rows.append(
                    {
                        "series_uid": p.series_uid,
                        "study_pk": study_pk,
                        "num_instances": in_series[p.series_uid],
                        **columns,
                    }
                )
                if study_pk not in self.new_study_pks:
                    self.new_series.append((study_pk, columns["modality"]))
            conn = session.connection()
            _INSERT_SERIES.run(conn, rows)
            found = _pks_of(conn, "s", [row["series_uid"] for row in rows])
            self.series_pks.update(found)
            self.new_series_pks = set(found.values())

    def _patients(self, new_studies: list[_Parsed]) -> dict[tuple[str, str], Patient]:
        """The patient row of each new study: found, created, or updated with newer demographics.

        A known patient is relinked when the header changes its name, birth date or sex (the
        newest arrival wins, as it always has), or gives an address or telephone other than the
        row's from a study at least as new as the patient's newest (StudyDate: a study sent
        late does not move a patient back to where they lived; a study without a date cannot
        be placed, so its arrival counts). A header without them keeps the row's. Of a batch's
        new studies of one patient, the newest by StudyDate speaks for the patient."""
        session = self.session
        wanted: dict[tuple[str, str], _Parsed] = {}
        for p in new_studies:
            key = self._patient_key(p)
            other = wanted.get(key)
            if other is None or study_date(p.attrs) > study_date(other.attrs):
                wanted[key] = p
        found: dict[tuple[str, str], Patient] = {}
        keys = list(wanted)
        for chunk in _chunks(keys):
            stmt = sqlmodel_select(Patient).where(
                tuple_(col(Patient.issuer), col(Patient.patient_id)).in_(chunk)
            )
            for patient in session.exec(stmt):
                found[(patient.issuer, patient.patient_id)] = patient
        contacts: dict[tuple[str, str], dict[str, Any]] = {}
        for key, p in wanted.items():
            known = found.get(key)
            if known is not None:
                given = contact_columns(p.attrs)
                if any(v and v != getattr(known, k) for k, v in given.items()):
                    contacts[key] = given
        # Only for a patient whose header gives another address or telephone: rare, one query.
        newest = _newest_study_dates(session, [found[key].pk for key in contacts]) if contacts else {}
        created: list[tuple[Patient, dict[str, Any]]] = []
        changed: list[tuple[Patient, dict[str, Any]]] = []
        for key, p in wanted.items():
            columns = patient_columns(p.attrs)
            name, birth, sex = columns["patient_name"], columns["birth_date"], columns["sex"]
            known = found.get(key)
            if known is None:
                patient = Patient(
                    facility_id=self.facility.id,
                    issuer=key[0],
                    patient_id=key[1],
                    **columns,
                    **contact_columns(p.attrs),
                )
                session.add(patient)
                found[key] = patient
                created.append((patient, p.attrs))
                continue
            renamed = (known.patient_name, known.birth_date, known.sex) != (name, birth, sex) and bool(name)
            contact = contacts.get(key)
            date = study_date(p.attrs)
            moved = contact is not None and (not date or date >= newest.get(known.pk or 0, ""))
            if not (renamed or moved):
                continue
            if renamed:
                known.sqlmodel_update(columns)
            attrs = p.attrs
            if moved:
                assert contact is not None
                known.sqlmodel_update({k: v for k, v in contact.items() if v})
            elif contact is not None:
                # Renamed by a study older than the address it would bring: the linker keeps
                # the stored address and telephone for a header without them.
                attrs = {k: v for k, v in p.attrs.items() if k not in (_ADDRESS, _TELEPHONES)}
            session.add(known)
            changed.append((known, attrs))
        if created or changed:
            session.flush()
        if (created or changed) and _linker is not None:
            # All at once: the identity domain decides a batch of new patients in a few statements.
            _linker(session=session, patients=[*created, *changed])
        return found


def _newest_study_dates(session: Session, patient_pks: list[int | None]) -> dict[int, str]:
    """The newest StudyDate of each patient's studies indexed so far, by patient pk."""
    newest: dict[int, str] = {}
    for chunk in _chunks(patient_pks):
        stmt = (
            select(col(Study.patient_pk), func.max(col(Study.study_date)))
            .where(col(Study.patient_pk).in_(chunk))
            .group_by(col(Study.patient_pk))
        )
        newest.update((pk, date or "") for pk, date in session.execute(stmt))
    return newest


def _instance_row(
    p: _Parsed, *, series_pk: int, study_pk: int, facility_id: str, now: datetime
) -> dict[str, Any]:
    """The instance's index row (the `_INSERT_INSTANCES` parameters)."""
    a = p.attrs
    return {
        "sop_uid": p.sop_uid,
        "series_pk": series_pk,
        "study_pk": study_pk,
        "facility_id": facility_id,
        "sop_class_uid": p.sop_class_uid,
        "instance_number": int_value(a, "00200013"),
        "transfer_syntax_uid": p.transfer_syntax_uid,
        "rows": int_value(a, "00280010"),
        "columns": int_value(a, "00280011"),
        "number_of_frames": int_value(a, "00280008"),
        "size": p.size,
        "sha256": p.sha256,
        "object_key": instance_key(p.sha256),
        "instance_json": "{}",
        "metadata_json": p.metadata_packed,
        "created_at": now,
    }


def _write_facts(session: Session, batch: _Batch, pending: list[tuple[int, _Parsed]]) -> None:
    """The prior lookup's facts of the new instances (index.facts), in the same transaction; a
    study that is new in this batch is marked as having all its facts."""
    series_study: dict[int, int] = {}
    per_series: dict[int, list[InstanceFacts]] = {}
    doses: list[tuple[str, int, str]] = []
    for _i, p in pending:
        if p.facts is None:
            continue
        study_pk = batch.study_pks[p.study_uid]
        series_pk = batch.series_pks[p.series_uid]
        series_study[series_pk] = study_pk
        per_series.setdefault(series_pk, []).append(p.facts)
        if p.facts.dose_json is not None:
            doses.append((p.sop_uid, study_pk, p.facts.dose_json))
    write_batch_facts(
        session=session,
        series_study=series_study,
        per_series=per_series,
        doses=doses,
        new_studies=batch.new_study_pks,
        new_series=batch.new_series_pks,
    )


def _audit_items(
    batch: _Batch,
    parsed: list[tuple[int, _Parsed]],
    pending: list[tuple[int, _Parsed]],
    conflicts: list[tuple[int, _Parsed]],
) -> list[tuple[str, str, str, str]]:
    """(study UID, patient ID, issuer, status) of every instance of the batch, for the audit."""
    status_of = {i: "stored" for i, _p in pending} | {i: "failed" for i, _p in conflicts}
    items = []
    for i, p in parsed:
        issuer, pid = batch._patient_key(p)
        items.append((p.study_uid, pid, issuer, status_of.get(i, "duplicate")))
    return items


def _open_findings(session: Session, sop_uids: list[str]) -> dict[str, str]:
    """SOP Instance UID -> object key, of these instances, for those `scanonce verify --repair`
    recorded missing or changed and no later run found whole again."""
    found: dict[str, str] = {}
    for start in range(0, len(sop_uids), _KNOWN_CHUNK):
        rows = session.execute(
            select(col(IntegrityFinding.sop_uid), col(IntegrityFinding.object_key)).where(
                col(IntegrityFinding.sop_uid).in_(sop_uids[start : start + _KNOWN_CHUNK]),
                col(IntegrityFinding.resolved_at).is_(None),
            )
        )
        found.update((sop, key) for sop, key in rows)
    return found


def _resolve_findings(session: Session, sop_uids: list[str]) -> None:
    """The objects of these instances were stored again from a re-send (the bytes their rows
    were indexed with): their open findings are resolved, in the batch's transaction."""
    session.execute(
        update(IntegrityFinding)
        .where(col(IntegrityFinding.sop_uid).in_(sop_uids), col(IntegrityFinding.resolved_at).is_(None))
        .values(resolved_at=_now())
    )


def _check_placed(info: ObjectInfo, sizes: dict[str, int]) -> None:
    """The placed object must be as long as what was received and hashed. Its content address
    is the hash of the bytes received, not re-read from the object (each byte is read once), so
    a byte written into the spool file by anything else (as a poke of a closed, reused pipe
    descriptor once did: broker/dicom/reactor.py) would be stored under a hash it does not
    have. The size is already in hand. Nothing of the group is indexed, so nothing in it is
    acknowledged; the sender retries (C-STORE 0xA700, STOW-RS 503) and the placement is
    replaced, while the misplaced object, never indexed, is the reaper's."""
    expected = sizes.get(info.key)
    if expected is not None and info.size != expected:
        log.error("stored object %s: %d bytes, %d received; not indexed", info.key, info.size, expected)
        raise StoreUnavailable("a stored object did not match the bytes received; nothing was indexed")


def _chunks(items: list[Any], size: int = 500) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_POOL: ThreadPoolExecutor | None = None


def _io_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="scanonce-store")
    return _POOL


# Parsing holds the GIL; worker processes let a broker on N cores parse N instances at once.
# Configured once per process by the app (settings.ingest_processes); off (in-process) until then.
_PARSE_PROCESSES = 0
_PARSE_POOL: ProcessPoolExecutor | None = None
_WARMUPS: list[Future[int]] = []
_PARSE_LOCK = threading.Lock()


def configure_parsing(*, processes: int) -> None:
    """Parse in `processes` worker processes (0: in the calling thread). One worker already
    helps: it parses while this process serves HTTP and writes the index."""
    global _PARSE_PROCESSES, _PARSE_POOL
    with _PARSE_LOCK:
        if processes == _PARSE_PROCESSES:
            return
        if _PARSE_POOL is not None:
            _PARSE_POOL.shutdown(wait=False, cancel_futures=True)
            _PARSE_POOL = None
            _WARMUPS.clear()  # the old pool's: cancelled, never to be waited for
        _PARSE_PROCESSES = processes


def _parse_pool() -> ProcessPoolExecutor | None:
    global _PARSE_POOL
    with _PARSE_LOCK:
        if _PARSE_PROCESSES < 1:
            return None
        if _PARSE_POOL is None:
            # spawn: workers start from a clean interpreter, never from a fork of this threaded
            # process (whose locks another thread may hold at fork time), and no fork server
            # stays resident beside them.
            ctx = multiprocessing.get_context("spawn")
            _PARSE_POOL = ProcessPoolExecutor(
                max_workers=_PARSE_PROCESSES,
                mp_context=ctx,
                initializer=start_worker,
                initargs=(os.getpid(),),
            )
            # All workers now (the executor spawns one per task submitted while none is idle),
            # without the main script: see `without_main_script`.
            with without_main_script():
                _WARMUPS[:] = [_PARSE_POOL.submit(worker_pid, n) for n in range(_PARSE_PROCESSES)]
        return _PARSE_POOL


def start_parsing(*, wait: bool = True) -> None:
    """Start the parse worker processes now, with the server: spawning them takes seconds,
    which the first STOW-RS or C-STORE would otherwise wait for. `wait=False` (what the server
    does) returns once they are spawned, not once they have imported their modules: the node is
    ready sooner (it parses correctly meanwhile; an early request just queues behind the
    warm-up), and the workers' imports overlap the server's own start."""
    if _parse_pool() is not None and wait:
        for warmup in list(_WARMUPS):
            warmup.result()


def stop_parsing() -> None:
    """Shut the worker processes down and wait for them, so that their queues' semaphores are
    released (else Python's resource tracker reports them as leaked at exit). A later ingest
    starts a new pool."""
    global _PARSE_POOL
    with _PARSE_LOCK:
        pool, _PARSE_POOL = _PARSE_POOL, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def _parse_started(
    paths: Sequence[str | Received], expected_study_uid: str | None
) -> Callable[[], list[_Parsed | StoreOutcome]]:
    """Hand `paths` to the parse workers now; the returned call waits for their results (in
    order). Without workers the parse happens in that call."""
    parse = partial(parse_instance, expected_study_uid=expected_study_uid)
    pool = _parse_pool()
    if pool is None or not paths:
        return lambda: [parse(p) for p in paths]
    # A worker reads the file itself (from the page cache) rather than get its bytes through a
    # pipe; the hash computed on receipt goes along, so nothing is hashed twice.
    paths = [Received(p.path, p.sha256, p.size) if isinstance(p, Received) else p for p in paths]

    def in_process() -> list[_Parsed | StoreOutcome]:
        # A worker died (killed, out of memory): parse here, and start a fresh pool next time.
        global _PARSE_POOL
        with _PARSE_LOCK:
            _PARSE_POOL = None
        log.warning("a parse worker process died; parsing this batch in-process")
        return [parse(p) for p in paths]

    try:
        # One task (one message back, one pickle of its results) per worker per batch: the
        # serving process receives them, and smaller chunks cost it ~8 µs more per instance
        # in hand-offs and pipe reads (bench/parse_results.py).
        chunk = -(-len(paths) // _PARSE_PROCESSES)
        results = pool.map(parse, paths, chunksize=chunk)
    except BrokenProcessPool:
        return in_process

    def collect() -> list[_Parsed | StoreOutcome]:
        try:
            return list(results)
        except BrokenProcessPool:
            return in_process()

    return collect


# How many instances of one call are parsed and indexed together. A call with thousands (one
# STOW-RS of a whole study, an import of a folder) goes a group at a time, so what the serving
# process holds for it (~18 KB per parsed instance, the rows of its insert, the transaction's
# dirty pages) is the size of a group, not of the request: 2,000 CT slices in one request
# took ~45 MB more at their peak (bench/archive.py). A group is large enough that its fixed
# cost (a transaction, the statements of a group) stays small per instance.
INGEST_GROUP = 250


def ingest_files(
    *,
    engine: Engine,
    store: ObjectStore,
    principal: Principal,
    facility_id: str,
    paths: Sequence[str | Received],
    expected_study_uid: str | None = None,
    consume: bool = False,
    audit: IngestAudit | None = None,
) -> list[StoreOutcome]:
    """Store and index Part 10 files; one outcome per path, in order. A `Received` item
    carries the hash its receiver computed while writing it (and maybe its bytes): it is not
    read again to hash it.

    Same SOP Instance UID with the same bytes: "duplicate" (a success, nothing rewritten).
    Same UID with different bytes: failed with DUPLICATE_SOP_INSTANCE; the new copy is kept apart
    under conflicts/ and recorded, the stored one untouched. Blocking: call from a thread.

    `consume=True` says the files are the caller's own temporary copies (a STOW-RS part, a
    C-STORE spool file): the store may move them into place instead of copying. The caller
    still removes whatever is left afterwards.

    More than `INGEST_GROUP` paths are stored a group at a time, each group in its own
    transaction (with its own audit events): a failure partway (the database gone) leaves the
    groups before it stored, and sending the same files again stores the rest (the stored ones
    count as duplicates).
    """
    authorize(principal, action="index.store", facility=facility_id)
    groups = [paths[i : i + INGEST_GROUP] for i in range(0, len(paths), INGEST_GROUP)] or [paths]
    outcomes: list[StoreOutcome] = []
    parsing = _parse_started(groups[0], expected_study_uid)
    for n in range(len(groups)):
        parsed = parsing()
        if n + 1 < len(groups):
            # The workers parse the next group while this process writes this one.
            parsing = _parse_started(groups[n + 1], expected_study_uid)
        outcomes += index_parsed(
            engine=engine,
            store=store,
            principal=principal,
            facility_id=facility_id,
            parsed=parsed,
            consume=consume,
            audit=audit,
        )
        del parsed
    return outcomes


def index_parsed(
    *,
    engine: Engine,
    store: ObjectStore,
    principal: Principal,
    facility_id: str,
    parsed: Sequence[_Parsed | StoreOutcome],
    consume: bool = False,
    audit: IngestAudit | None = None,
) -> list[StoreOutcome]:
    """The second half of `ingest_files`, for callers that parsed already (`parse_instance`,
    e.g. one C-STORE per association, gathered into one commit by `batcher.IngestBatcher`):
    items that are already an outcome (a parse failure) pass through; one outcome per item,
    in order."""
    outcomes: list[StoreOutcome | None] = [None] * len(parsed)
    todo: list[tuple[int, _Parsed]] = []
    for i, result in enumerate(parsed):
        if isinstance(result, StoreOutcome):
            outcomes[i] = result
        else:
            todo.append((i, result))
    if todo:
        placed: set[str] = set()
        committed: set[str] = set()
        held: list[str] = []
        try:
            for attempt in range(_ATTEMPTS):
                try:
                    _index_batch(
                        engine=engine,
                        store=store,
                        facility_id=facility_id,
                        parsed=todo,
                        outcomes=outcomes,
                        consume=consume,
                        placed=placed,
                        committed=committed,
                        held=held,
                        audit=audit,
                    )
                    break
                except IntegrityError:
                    # A concurrent batch created the same patient/study/series/instance first and
                    # committed: the next attempt sees its rows. Jitter keeps racing batches apart.
                    if attempt == _ATTEMPTS - 1:
                        raise
                    time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
            # An object placed by an attempt that lost a race (its instance turned out to be a
            # conflict or a duplicate in the next one) is named by no row: remove it.
            _release(held)
            if placed - committed:
                _remove_unreferenced(engine=engine, store=store, keys=placed - committed)
        finally:
            _release(held)
    done = [o for o in outcomes if o is not None]
    stored = sum(o.status == "stored" for o in done)
    observe_ingest(
        stored=stored,
        duplicate=sum(o.status == "duplicate" for o in done),
        failed=sum(o.status == "failed" for o in done),
        stored_bytes=sum(p.size for i, p in todo if (o := outcomes[i]) is not None and o.status == "stored"),
    )
    log.info(
        "ingest by %s into %s: %d stored, %d duplicate, %d failed",
        principal.who,
        facility_id,
        stored,
        sum(o.status == "duplicate" for o in done),
        sum(o.status == "failed" for o in done),
    )
    return done


# Object keys that an ingest of this process has begun to place and not yet committed (or
# given up): the reaper (broker/index/reaper.py) never removes them, however old the bytes.
#
# Per process on purpose, also with DIMSE receiver processes (settings.dimse_receivers), rather
# than a table or advisory locks in the database (a write or a round trip more per batch on the
# hot path, and rows a SIGKILLed receiver would leave behind):
# - the reaper runs in the serving process only and removes nothing younger than its grace
#   period (an hour by default); another process's placement is seconds from its commit, and a
#   re-put object is young again (the reaper re-reads its age just before removing it). It
#   relies on age alone for other processes' placements.
# - the race cleanup (`_remove_unreferenced`) removes only keys of instances that another
#   batch committed first: a duplicate's key is the committed row's own key (named, kept); a
#   conflicting copy's key names bytes whose SOP Instance UID is already taken by other bytes,
#   so no ingest in any process can commit a row naming it (its insert would fail on the UID and
#   its retry would file the copy under conflicts/). The per-process check below only spares a
#   key this process is placing right now.
_IN_FLIGHT: dict[str, int] = {}
_IN_FLIGHT_LOCK = threading.Lock()


def _hold(key: str, held: list[str]) -> None:
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT[key] = _IN_FLIGHT.get(key, 0) + 1
    held.append(key)


def _release(held: list[str]) -> None:
    with _IN_FLIGHT_LOCK:
        for key in held:
            left = _IN_FLIGHT.get(key, 0) - 1
            if left > 0:
                _IN_FLIGHT[key] = left
            else:
                _IN_FLIGHT.pop(key, None)
    held.clear()


@contextmanager
def no_new_placements() -> Iterator[Callable[[str], bool]]:
    """While open, no ingest of this process begins to place an object; yields whether a key
    is being placed by one now. For removing an object no row names without racing an
    ingest that is about to name it."""
    with _IN_FLIGHT_LOCK:
        yield _IN_FLIGHT.__contains__


def _remove_unreferenced(*, engine: Engine, store: ObjectStore, keys: set[str]) -> None:
    try:
        with Session(engine) as session:
            named = set(
                session.exec(
                    sqlmodel_select(col(Instance.object_key)).where(col(Instance.object_key).in_(keys))
                )
            )
            named |= set(
                session.exec(
                    sqlmodel_select(col(InstanceConflict.object_key)).where(
                        col(InstanceConflict.object_key).in_(keys)
                    )
                )
            )
        with no_new_placements() as in_flight:
            for key in keys - named:
                if not in_flight(key):  # another ingest of the same bytes, about to name it
                    store.delete(key)
    except Exception as exc:  # the reaper removes it later; the ingest itself succeeded
        log.warning("could not remove an unreferenced object after a race: %s", type(exc).__name__)


def _index_batch(
    *,
    engine: Engine,
    store: ObjectStore,
    facility_id: str,
    parsed: list[tuple[int, _Parsed]],
    outcomes: list[StoreOutcome | None],
    consume: bool = False,
    placed: set[str],
    committed: set[str],
    held: list[str],
    audit: IngestAudit | None = None,
) -> None:
    with Session(engine, expire_on_commit=False) as session:
        known = _read_known(
            session,
            sop_uids=[p.sop_uid for _, p in parsed],
            study_uids=list(dict.fromkeys(p.study_uid for _, p in parsed)),
            series_uids=list(dict.fromkeys(p.series_uid for _, p in parsed)),
        )
        if facility_id not in known.issuer_of:
            raise NotFound(f"no facility {facility_id!r}")
        facility = _FacilityRef(facility_id, known.issuer_of[facility_id])
        batch = _Batch(
            session,
            facility,
            set(known.issuer_of.values()),
            study_pks=known.study_pks,
            series_pks=known.series_pks,
        )
        existing = known.sha_of
        pending: list[tuple[int, _Parsed]] = []
        conflicts: list[tuple[int, _Parsed]] = []
        duplicates: list[tuple[int, _Parsed]] = []
        for i, p in parsed:
            prior = existing.get(p.sop_uid)
            if prior is None:
                existing[p.sop_uid] = p.sha256
                pending.append((i, p))
            elif prior == p.sha256:
                duplicates.append((i, p))
            else:
                conflicts.append((i, p))
        # A re-send of an instance whose object `scanonce verify --repair` found missing or
        # changed brings the bytes its row was indexed with: stored again, in place. One read,
        # and only when the batch holds re-sends (a finding is rare; the lookup is by SOP UID).
        repairs = _open_findings(session, [p.sop_uid for _i, p in duplicates]) if duplicates else {}
        for i, p in duplicates:
            if p.sop_uid in repairs:
                outcomes[i] = p.outcome("duplicate", message="already indexed; its object was restored")
            else:
                outcomes[i] = p.outcome("duplicate", message="already stored (identical object)")

        # Objects first: nothing is indexed (and so acknowledged) before its bytes are stored.
        # File and S3 writes (and their fsyncs) release the GIL, so they run side by side.
        # Keys are content-addressed, so an object placed by an earlier attempt is already right.
        puts = [(instance_key(p.sha256), p.path) for _i, p in pending]
        puts += [(conflict_key(p.sop_uid, p.sha256), p.path) for _i, p in conflicts]
        restored = [(repairs[p.sop_uid], p) for _i, p in duplicates if p.sop_uid in repairs]
        puts += [(key, p.path) for key, p in restored]
        puts = [(key, path) for key, path in puts if key not in placed]
        sizes = {instance_key(p.sha256): p.size for _i, p in pending}
        sizes.update((conflict_key(p.sop_uid, p.sha256), p.size) for _i, p in conflicts)
        sizes.update((key, p.size) for key, p in restored)

        def put(key_path: tuple[str, str]) -> None:
            _hold(key_path[0], held)
            _check_placed(store.put_file(key_path[0], key_path[1], move=consume), sizes)
            placed.add(key_path[0])

        put_files = getattr(store, "put_files", None)
        if consume and put_files is not None and len(puts) > 1:
            # A group of C-STOREs or a STOW-RS batch into a local folder: the files' fsyncs side
            # by side, then each directory that gained an entry once (a batch of 100 small
            # instances spreads over ~80 of the 256 fan-out folders), in a few thread hand-offs
            # rather than a whole put_file per object through the pool below.
            for key, _path in puts:
                _hold(key, held)
            for info in put_files(puts, move=True):
                _check_placed(info, sizes)
            placed.update(key for key, _path in puts)
        elif len(puts) < _PARALLEL_PUTS:
            # A handful: a hop to the pool costs more than it saves.
            for key_path in puts:
                put(key_path)
        else:
            list(_io_pool().map(put, puts))

        touched_series: dict[int, int] = {}
        touched_studies: dict[int, int] = {}
        rows: list[dict[str, Any]] = []
        now = _now()
        batch.prepare([p for _i, p in pending])
        for _i, p in pending:
            study_pk = batch.study_pks[p.study_uid]
            series_pk = batch.series_pks[p.series_uid]
            rows.append(
                _instance_row(p, series_pk=series_pk, study_pk=study_pk, facility_id=facility.id, now=now)
            )
            if series_pk not in batch.new_series_pks:
                touched_series[series_pk] = touched_series.get(series_pk, 0) + 1
            if study_pk not in batch.new_study_pks:
                touched_studies[study_pk] = touched_studies.get(study_pk, 0) + 1
        conn = session.connection()
        _INSERT_INSTANCES.run(conn, rows)
        # Counters are bumped in SQL, not on the loaded rows, so concurrent batches never lose updates.
        # One executemany per counter, not a statement per row: a batch of 100 small instances
        # touches ~20 series and ~10 studies.
        _BUMP_SERIES_INSTANCES.run(conn, [{"b_pk": pk, "b_n": n} for pk, n in touched_series.items()])
        _BUMP_STUDY_INSTANCES.run(conn, [{"b_pk": pk, "b_n": n} for pk, n in touched_studies.items()])
        _BUMP_STUDY_SERIES.run(conn, [{"b_pk": pk} for pk, _modality in batch.new_series])
        added = [
            {"b_pk": pk, "b_pattern": f"%{_like_escaped(_BS + modality + _BS)}%", "b_suffix": modality + _BS}
            for pk, modality in batch.new_series
            if modality
        ]
        # In order, one at a time (executemany): two new series of one modality add it once.
        _ADD_STUDY_MODALITY.run(conn, added)
        _write_facts(session, batch, pending)
        for _i, p in conflicts:
            session.add(
                InstanceConflict(
                    sop_uid=p.sop_uid,
                    facility_id=facility.id,
                    sha256=p.sha256,
                    size=p.size,
                    object_key=conflict_key(p.sop_uid, p.sha256),
                )
            )
        if repairs:
            _resolve_findings(session, list(repairs))
        if audit is not None:
            audit(session=session, stored=_audit_items(batch, parsed, pending, conflicts))
        session.commit()
    committed.update(instance_key(p.sha256) for _i, p in pending)
    committed.update(conflict_key(p.sop_uid, p.sha256) for _i, p in conflicts)
    for i, p in pending:
        outcomes[i] = p.outcome("stored")
    for i, p in conflicts:
        outcomes[i] = p.outcome(
            "failed",
            status.DUPLICATE_SOP_INSTANCE,
            "a different object is already stored under this SOP Instance UID; the new copy was kept "
            "apart for review and the stored one is unchanged",
        )
