"""What the prior lookup reads of a person's studies, and the facts it needs that the stored
series JSON does not hold (smallest slice thickness, contrast agent, laterality per series; the
DoseRecord of each dose-carrying instance), computed once at ingest or by the facts job.

Reads here are keyed on indexed columns only (patient.person_id, study.patient_pk,
series.study_pk, series_facts.study_pk, dose_fact.study_pk), so a lookup costs the same on an
index of ten thousand studies as on one of a million.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Float, String, bindparam, case, cast, delete, func, or_, update
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from broker.db import Prepared, core_table
from broker.dicom.dose import DoseRecord
from broker.index.instance_facts import InstanceFacts, instance_facts
from broker.index.models import (
    DoseFact,
    Instance,
    Patient,
    Series,
    SeriesFacts,
    Study,
    StudyFacts,
    StudyLocation,
)
from broker.index.packing import unpack_metadata
from broker.jobs import service as jobs
from broker.jobs.models import Job

log = logging.getLogger("scanonce.index")

FACTS_VERSION = 1


_SERIES_FACTS = core_table(SeriesFacts)
# Built once and run through the driver (`Prepared`): each ingest group runs them (see
# broker.index.ingest's statements).
_INSERT_SERIES_FACTS = Prepared(
    _SERIES_FACTS.insert().inline(), column_keys=[c.name for c in _SERIES_FACTS.columns]
)
_INSERT_DOSES = Prepared(
    core_table(DoseFact).insert().inline(), column_keys=["sop_uid", "study_pk", "record_json"]
)
_INSERT_STUDY_FACTS = Prepared(
    core_table(StudyFacts).insert().inline(), column_keys=["study_pk", "version", "computed_at"]
)
_sf = _SERIES_FACTS.c
_new_min = cast(bindparam("b_min", type_=Float), Float)


def _first_unless_set(column: Any, param: str) -> Any:
    return case((column == "", bindparam(param, type_=String)), else_=column)


# `merge_series_facts` in SQL, for a row that exists: the batch's facts are folded first
# (`_folded`), which gives the same row as folding them one by one.
_MERGE_SERIES_FACTS = Prepared(
    update(_SERIES_FACTS)
    .where(_sf.series_pk == bindparam("b_pk"))
    .values(
        min_slice_thickness_mm=case(
            (_new_min.is_(None), _sf.min_slice_thickness_mm),
            (or_(_sf.min_slice_thickness_mm.is_(None), _new_min < _sf.min_slice_thickness_mm), _new_min),
            else_=_sf.min_slice_thickness_mm,
        ),
        contrast_agent=_first_unless_set(_sf.contrast_agent, "b_contrast"),
        laterality=_first_unless_set(_sf.laterality, "b_laterality"),
        body_part=_first_unless_set(_sf.body_part, "b_body_part"),
        instances=_sf.instances + bindparam("b_n"),
    )
)


@dataclass(slots=True)
class _Fold:
    """What `merge_series_facts` folds, without an ORM row (whose instrumented attributes cost
    more to build and set than the rest of a C-STORE group's facts)."""

    min_slice_thickness_mm: float | None = None
    contrast_agent: str = ""
    laterality: str = ""
    body_part: str = ""
    instances: int = 0


def _folded(series_pk: int, facts: Sequence[InstanceFacts]) -> dict[str, Any]:
    """One series' new instances folded into one set of parameters of `_MERGE_SERIES_FACTS`."""
    row = _Fold()
    merge_series_facts(row, facts)
    return {
        "b_pk": series_pk,
        "b_min": row.min_slice_thickness_mm,
        "b_contrast": row.contrast_agent,
        "b_laterality": row.laterality,
        "b_body_part": row.body_part,
        "b_n": row.instances,
    }


def dose_record(record_json: str | bytes, *, sop_uid: str, study_uid: str) -> DoseRecord:
    """A stored dose fact as the DoseRecord it was made from (rows written before the UIDs were
    left out hold them, and keep them)."""
    data = orjson.loads(record_json)
    data.setdefault("sop_instance_uid", sop_uid)
    data.setdefault("study_instance_uid", study_uid)
    return DoseRecord.model_validate(data)


def merge_series_facts(current: SeriesFacts | _Fold, facts: Sequence[InstanceFacts]) -> None:
    """Fold new instances into their series' facts (smallest slice, first non-empty values)."""
    for f in facts:
        if f.slice_thickness_mm is not None and (
            current.min_slice_thickness_mm is None or f.slice_thickness_mm < current.min_slice_thickness_mm
        ):
            current.min_slice_thickness_mm = f.slice_thickness_mm
        current.contrast_agent = current.contrast_agent or f.contrast_agent
        current.laterality = current.laterality or f.laterality
        current.body_part = current.body_part or f.body_part
        current.instances += 1


def write_facts(
    *,
    session: Session,
    study_pk: int,
    per_series: Mapping[int, Sequence[InstanceFacts]],
    doses: Sequence[tuple[str, str]],
    mark_study: bool = True,
) -> None:
    """Add one study's instances' facts inside the caller's transaction (the facts job's).
    `doses`: (SOP Instance UID, compact DoseRecord JSON)."""
    write_batch_facts(
        session=session,
        series_study={pk: study_pk for pk in per_series},
        per_series=per_series,
        doses=[(u, study_pk, j) for u, j in doses],
        new_studies={study_pk} if mark_study else set(),
    )


def write_batch_facts(
    *,
    session: Session,
    series_study: Mapping[int, int],
    per_series: Mapping[int, Sequence[InstanceFacts]],
    doses: Sequence[tuple[str, int, str]],
    new_studies: set[int],
    new_series: set[int] | None = None,
) -> None:
    """Add the facts of a batch of new instances inside the caller's transaction (ingest's): a
    handful of statements per batch, whatever the number of studies and images in it.

    series_study: series pk -> study pk; doses: (SOP Instance UID, study pk, DoseRecord JSON);
    new_studies: studies to mark complete (new in this batch); new_series: series known to have
    no facts yet (not looked up)."""
    fresh = new_series or set()
    lookup = [pk for pk in per_series if pk not in fresh]
    present: set[int] = set()
    if lookup:
        # Fold each series' new instances in SQL, one UPDATE (executemany) for all of them,
        # instead of reading each row (locked) and writing it back: a C-STORE group adds to one
        # or two existing series. Rows it did not find (a series stored before facts existed,
        # or cleared by the facts job) are inserted below.
        merged = [_folded(pk, facts) for pk, facts in per_series.items() if pk not in fresh]
        # Both drivers sum an executemany's row counts: all found if it says as many as asked.
        if _MERGE_SERIES_FACTS.run(session, merged) == len(merged):
            present = set(lookup)
        else:
            for start in range(0, len(lookup), 500):
                chunk = lookup[start : start + 500]
                present.update(
                    session.execute(
                        sa_select(_SERIES_FACTS.c.series_pk).where(_SERIES_FACTS.c.series_pk.in_(chunk))
                    ).scalars()
                )
    inserts: list[dict[str, Any]] = []
    for series_pk, facts in per_series.items():
        if series_pk in present:
            continue
        row = _Fold()
        merge_series_facts(row, facts)
        inserts.append(
            {
                "series_pk": series_pk,
                "study_pk": series_study[series_pk],
                "min_slice_thickness_mm": row.min_slice_thickness_mm,
                "contrast_agent": row.contrast_agent,
                "laterality": row.laterality,
                "body_part": row.body_part,
                "instances": row.instances,
            }
        )
    if inserts:
        _INSERT_SERIES_FACTS.run(session, inserts)
    if doses:
        # New instances only (ingest's pending ones, or a study the facts job just cleared): one
        # multi-row insert, not a lookup per image of a CT.
        _INSERT_DOSES.run(session, [{"sop_uid": u, "study_pk": st, "record_json": j} for u, st, j in doses])
    if new_studies:
        now = _now()
        _INSERT_STUDY_FACTS.run(
            session,
            [{"study_pk": pk, "version": FACTS_VERSION, "computed_at": now} for pk in sorted(new_studies)],
        )


def _now() -> datetime:
    return datetime.now(UTC)


# -- what the lookup reads ------------------------------------------------------------------------


@dataclass
class SeriesView:
    series_uid: str
    modality: str
    description: str
    body_part: str
    laterality: str = ""
    min_slice_thickness_mm: float | None = None
    contrast_agent: str = ""
    instances: int = 0


@dataclass
class StudyView:
    """One study of a person as the lookup needs it."""

    study_pk: int
    study_uid: str
    facility_id: str
    patient_pk: int
    person_id: int | None
    issuer: str
    patient_id: str
    study_date: str
    birth_date: str
    description: str
    modalities: tuple[str, ...]
    study_json: dict[str, Any]
    num_instances: int
    series: list[SeriesView] = field(default_factory=list)
    doses: list[DoseRecord] = field(default_factory=list)
    has_pixels: bool | None = None  # None: no location row (came by STOW-RS / C-STORE: held here)
    locations: tuple[str, ...] = ()
    facts_computed: bool = False


def patient_by_identifier(*, session: Session, issuer: str, patient_id: str) -> Patient | None:
    return session.exec(
        select(Patient).where(Patient.issuer == issuer, Patient.patient_id == patient_id)
    ).first()


def patients_of_persons(*, session: Session, person_ids: Sequence[int]) -> list[Patient]:
    if not person_ids:
        return []
    return list(session.exec(select(Patient).where(col(Patient.person_id).in_(list(person_ids)))))


def patients_by_pk(*, session: Session, patient_pks: Sequence[int]) -> list[Patient]:
    if not patient_pks:
        return []
    return list(session.exec(select(Patient).where(col(Patient.pk).in_(list(patient_pks)))))


def newest_patient_headers(*, session: Session, patient_pks: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Each patient's attributes as its newest study's header has them (the study-level DICOM
    JSON, which keeps the whole patient module: PatientAddress, telephones, other IDs), by
    patient pk; patients without a study are left out. Two indexed queries."""
    if not patient_pks:
        return {}
    newest = (
        sa_select(func.max(col(Study.pk)))
        .where(col(Study.patient_pk).in_(list(patient_pks)))
        .group_by(col(Study.patient_pk))
        .scalar_subquery()
    )
    rows = session.execute(
        sa_select(col(Study.patient_pk), col(Study.study_json)).where(col(Study.pk).in_(newest))
    ).all()
    return {pk: orjson.loads(attrs or "{}") for pk, attrs in rows}


def studies_of_patients(*, session: Session, patients: Sequence[Patient]) -> list[StudyView]:
    """Every study of these patients with its series, facts, dose records and locations: five
    indexed queries whatever the size of the index."""
    by_pk = {p.pk: p for p in patients if p.pk is not None}
    if not by_pk:
        return []
    studies = list(session.exec(select(Study).where(col(Study.patient_pk).in_(list(by_pk)))))
    if not studies:
        return []
    views: dict[int, StudyView] = {}
    for s in studies:
        assert s.pk is not None
        views[s.pk] = StudyView(
            study_pk=s.pk,
            study_uid=s.study_uid,
            facility_id=s.facility_id,
            patient_pk=s.patient_pk,
            person_id=by_pk[s.patient_pk].person_id,
            issuer=s.issuer,
            patient_id=s.patient_id,
            study_date=s.study_date,
            birth_date=s.birth_date,
            description=s.study_description,
            modalities=tuple(m for m in s.modalities.split("\\") if m),
            study_json=orjson.loads(s.study_json or "{}"),
            num_instances=s.num_instances,
        )
    pks = list(views)
    series_by_pk: dict[int, SeriesView] = {}
    for se in session.exec(select(Series).where(col(Series.study_pk).in_(pks)).order_by(col(Series.pk))):
        assert se.pk is not None
        sv = SeriesView(
            series_uid=se.series_uid,
            modality=se.modality,
            description=se.series_description,
            body_part=se.body_part,
            instances=se.num_instances,
        )
        series_by_pk[se.pk] = sv
        views[se.study_pk].series.append(sv)
    for f in session.exec(select(SeriesFacts).where(col(SeriesFacts.study_pk).in_(pks))):
        sv_ = series_by_pk.get(f.series_pk)
        if sv_ is not None:
            sv_.min_slice_thickness_mm = f.min_slice_thickness_mm
            sv_.contrast_agent = f.contrast_agent
            sv_.laterality = f.laterality
            sv_.body_part = sv_.body_part or f.body_part
    for d in session.exec(select(DoseFact).where(col(DoseFact.study_pk).in_(pks))):
        view = views[d.study_pk]
        view.doses.append(dose_record(d.record_json, sop_uid=d.sop_uid, study_uid=view.study_uid))
    for sf in session.exec(select(StudyFacts.study_pk).where(col(StudyFacts.study_pk).in_(pks))):
        views[int(sf)].facts_computed = True
    uids = {v.study_uid: v for v in views.values()}
    for loc in session.exec(select(StudyLocation).where(col(StudyLocation.study_uid).in_(list(uids)))):
        v = uids[loc.study_uid]
        v.locations = (*v.locations, loc.facility_id)
        v.has_pixels = bool(v.has_pixels) or loc.has_pixels
    return list(views.values())


def studies_by_uid(*, session: Session, study_uids: Sequence[str]) -> list[StudyView]:
    """The same view of studies named by UID (an avoided repeat names its prior)."""
    pks = list(session.exec(select(Study.patient_pk).where(col(Study.study_uid).in_(list(study_uids)))))
    views = studies_of_patients(session=session, patients=patients_by_pk(session=session, patient_pks=pks))
    wanted = set(study_uids)
    return [v for v in views if v.study_uid in wanted]


# -- the facts job: studies stored before the facts existed ----------------------------------------

FACTS_JOB = "index-facts"
FACTS_BATCH = 50  # studies per run of `compute_missing_facts`; each study is its own transaction


def _missing_stmt() -> Any:
    """Studies with stored instances and no facts of the current version."""
    done = select(StudyFacts.study_pk).where(StudyFacts.version >= FACTS_VERSION)
    return (
        select(Instance.study_pk)
        .where(col(Instance.study_pk).not_in(done))
        .distinct()
        .order_by(col(Instance.study_pk))
    )


def facts_missing(*, session: Session) -> bool:
    return session.exec(_missing_stmt().limit(1)).first() is not None


def compute_study_facts(*, session: Session, study_pk: int) -> int:
    """(Re)compute one study's facts from its instances' stored metadata (the DICOM JSON ingest
    built from the object), replacing what was there; commits. Returns the instances read.

    The study row is written first: on PostgreSQL that row lock orders this against an ingest
    adding instances to the study (ingest bumps the study's counters before writing its facts),
    and on SQLite the first write takes the database's write lock before anything is read."""
    study_t = core_table(Study)
    session.execute(
        update(study_t).where(study_t.c.pk == study_pk).values(num_instances=study_t.c.num_instances)
    )
    session.execute(delete(SeriesFacts).where(col(SeriesFacts.study_pk) == study_pk))
    session.execute(delete(DoseFact).where(col(DoseFact.study_pk) == study_pk))
    session.execute(delete(StudyFacts).where(col(StudyFacts.study_pk) == study_pk))
    per_series: dict[int, list[InstanceFacts]] = {}
    doses: list[tuple[str, str]] = []
    n = 0
    rows = session.execute(
        sa_select(col(Instance.sop_uid), col(Instance.series_pk), col(Instance.metadata_json)).where(
            col(Instance.study_pk) == study_pk
        )
    ).all()
    for sop_uid, series_pk, metadata in rows:
        try:
            attrs = orjson.loads(unpack_metadata(metadata))
        except (orjson.JSONDecodeError, ValueError, zlib.error):
            continue
        f = instance_facts(attrs)
        per_series.setdefault(series_pk, []).append(f)
        if f.dose_json is not None:
            doses.append((sop_uid, f.dose_json))
        n += 1
    write_facts(session=session, study_pk=study_pk, per_series=per_series, doses=doses)
    session.commit()
    return n


def compute_missing_facts(
    *, engine: Engine, batch: int = FACTS_BATCH, progress: Callable[[int, int], None] | None = None
) -> tuple[int, int]:
    """Compute the facts of every study that lacks them, until none is left (resumable: a study
    done is marked). Returns (studies, instances)."""
    studies = instances = 0
    while True:
        with Session(engine) as session:
            todo = list(session.exec(_missing_stmt().limit(batch)))
        if not todo:
            return studies, instances
        for study_pk in todo:
            with Session(engine) as session:
                instances += compute_study_facts(session=session, study_pk=int(study_pk))
            studies += 1
        if progress is not None:
            progress(studies, studies)


def ensure_facts_current(*, engine: Engine) -> Job | None:
    """At startup: queue the facts job when a stored study has no facts (one query when all do)."""
    with Session(engine) as session:
        if not facts_missing(session=session):
            return None
    log.info("studies without lookup facts: facts job queued")
    return jobs.enqueue(engine=engine, kind=FACTS_JOB, key=str(FACTS_VERSION))


def _facts_job(engine: Engine, _store: Any, job: Job, progress: jobs.Progress) -> None:
    studies, instances = compute_missing_facts(
        engine=engine, progress=lambda done, _total: progress.update(done=done)
    )
    progress.update(message=f"facts of {studies} studies ({instances} instances)")


def register_jobs() -> None:
    """The index's job kinds: the app factory and `scanonce worker` call this once."""
    jobs.register(FACTS_JOB)(_facts_job)
