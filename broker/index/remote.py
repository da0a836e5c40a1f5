"""Studies held at facility archives: the index rows that index sync writes from an archive's
listing (pixels stay at the facility), and `study_location`, where each study is held.

Federation decides what to ask an archive and what changed; the SQL is here, so the index stays
the only writer of its tables. Study, series and patient rows go through ingest's row mapping
(`ingest.study_columns`, `series_columns`, `patient_columns`), so a synced study answers queries
as a stored one does, its InstanceAvailability NEARLINE until its pixels are fetched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import bindparam, delete, func, insert, tuple_, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from broker.db import core_table, session_scope
from broker.dicom.attributes import is_study_level
from broker.dicom.bounds import bound_dataset
from broker.dicom.json_model import str_value
from broker.errors import NotFound
from broker.facilities.models import Facility
from broker.index.ingest import (
    _chunks,
    known_issuers,
    level_json,
    link_patient,
    patient_columns,
    patient_key,
    series_columns,
    study_columns,
)
from broker.index.models import Instance, Patient, Series, Study, StudyLocation
from broker.peers.archive import RemoteSeries, RemoteStudy

_T_AVAILABILITY = "00080056"
# What an archive's answer says of its own copy (where to retrieve it, its availability, counts
# and modalities): the index keeps its own values for these, never the archive's.
_DROP = frozenset({"00081190", "00080056", "00201206", "00201208", "00201209", "00080061"})
# Patients created per session while linking them (see _add_linked_patients).
_LINK_BATCH = 25


def _now() -> datetime:
    return datetime.now(UTC)


# -- where studies are held ---------------------------------------------------------------------


def study_locations(*, session: Session, study_uids: Sequence[str]) -> dict[str, list[StudyLocation]]:
    """Where each study is held (facility id, whether the broker has the pixels)."""
    out: dict[str, list[StudyLocation]] = {}
    for chunk in _chunks(list(study_uids)):
        for loc in session.exec(select(StudyLocation).where(col(StudyLocation.study_uid).in_(chunk))):
            out.setdefault(loc.study_uid, []).append(loc)
    return out


def locations_at(
    *, session: Session, facility_id: str, study_uids: Sequence[str]
) -> dict[str, StudyLocation]:
    """The location rows of these studies at one facility (what its last sync saw of each)."""
    out: dict[str, StudyLocation] = {}
    for chunk in _chunks(list(study_uids)):
        for loc in session.exec(
            select(StudyLocation).where(
                StudyLocation.facility_id == facility_id, col(StudyLocation.study_uid).in_(chunk)
            )
        ):
            out[loc.study_uid] = loc
    return out


def has_locations(*, session: Session, facility_id: str) -> bool:
    """Whether any study has been indexed from this facility."""
    first = session.exec(
        select(StudyLocation.study_uid).where(StudyLocation.facility_id == facility_id)
    ).first()
    return first is not None


def unseen_studies(*, session: Session, facility_id: str, run: int) -> list[str]:
    """The studies indexed from this facility that sync job `run` has not seen there."""
    return list(
        session.exec(
            select(StudyLocation.study_uid).where(
                StudyLocation.facility_id == facility_id,
                (col(StudyLocation.seen_job).is_(None)) | (col(StudyLocation.seen_job) != run),
            )
        )
    )


def remote_holders(*, session: Session, study_uid: str) -> list[str]:
    """The facilities to fetch a study's pixels from: none when the broker holds them. NotFound
    when the index has no such study."""
    locations = list(session.exec(select(StudyLocation).where(StudyLocation.study_uid == study_uid)))
    study = session.exec(select(Study).where(Study.study_uid == study_uid)).first()
    if study is None:
        raise NotFound("no such study in the index")
    if any(loc.has_pixels for loc in locations):
        return []
    # No location at all: it came by STOW-RS or C-STORE, so what the index has is local.
    return [loc.facility_id for loc in locations]


def is_remote_only(*, session: Session, study_uid: str) -> bool:
    """True when the index knows the study only from a facility's archive (pixels not here)."""
    try:
        return bool(remote_holders(session=session, study_uid=study_uid))
    except NotFound:
        return False


def remote_only_count(*, session: Session, facility_id: str) -> int:
    """How many studies indexed from this facility the broker holds no pixels of."""
    return int(
        session.exec(
            select(func.count())
            .select_from(StudyLocation)
            .where(StudyLocation.facility_id == facility_id, col(StudyLocation.has_pixels).is_(False))
        ).one()
    )


# -- writing a page of a facility's listing (in the caller's transaction) -----------------------


def mark_seen(*, session: Session, facility_id: str, study_uids: Sequence[str], run: int) -> None:
    """Stamp studies that sync job `run` saw unchanged at the facility."""
    for chunk in _chunks(list(study_uids)):
        session.exec(
            update(StudyLocation)
            .where(col(StudyLocation.facility_id) == facility_id, col(StudyLocation.study_uid).in_(chunk))
            .values(seen_job=run)
        )


def upsert_remote_studies(
    *,
    session: Session,
    facility: Facility,
    run: int,
    studies: Sequence[RemoteStudy],
    series_of: Mapping[str, Sequence[RemoteSeries]],
) -> None:
    """Index new or changed studies of a facility as its archive lists them (`series_of`: each
    one's series), and note that sync job `run` saw them there.

    A study whose pixels the broker holds is the broker's own copy: only its location is noted.
    A study indexed from another facility first keeps its rows; this one is a second location.
    """
    # The index holds values bounded by their VR, whatever an archive answered (as ingest does).
    for s in studies:
        s.attrs = bound_dataset(s.attrs)
    for remote_series in series_of.values():
        for rs in remote_series:
            rs.attrs = bound_dataset(rs.attrs)
    local = _held_here(session, [s.uid for s in studies])
    remote = [s for s in studies if s.uid not in local]
    patients = _patients_of(session, facility, remote)
    study_pks, changed_pks = _write_study_rows(session, facility, remote, series_of, patients)
    _write_series_rows(session, study_pks, changed_pks, series_of)
    _write_locations(session, facility.id, run, studies, local - _partly_fetched(session, local))


def _held_here(session: Session, study_uids: Sequence[str]) -> set[str]:
    """The studies of which the broker holds instances."""
    return set(
        session.exec(
            select(Study.study_uid)
            .join(Instance, col(Instance.study_pk) == col(Study.pk))
            .where(col(Study.study_uid).in_(study_uids))
            .distinct()
        )
    )


def _partly_fetched(session: Session, held: set[str]) -> set[str]:
    """Of studies the broker holds instances of, those it knows from facilities but holds no
    location's pixels of: a fetch that left instances missing (`mark_partial`). Their rows
    stay as they are, but they are not held whole, so a sync must not say they are."""
    if not held:
        return set()
    seen: dict[str, bool] = {}
    for chunk in _chunks(list(held)):
        for uid, has_pixels in session.exec(
            select(StudyLocation.study_uid, StudyLocation.has_pixels).where(
                col(StudyLocation.study_uid).in_(chunk)
            )
        ):
            seen[uid] = seen.get(uid, False) or bool(has_pixels)
    return {uid for uid, whole in seen.items() if not whole}


def _patients_of(session: Session, facility: Facility, studies: Sequence[RemoteStudy]) -> dict[str, Patient]:
    """Each study's patient row, found or created (and linked): one per (issuer, Patient ID),
    the issuer chosen by the same rule as ingest's."""
    registered = known_issuers(session)
    keys = {
        s.uid: patient_key(s.attrs, study_uid=s.uid, facility_issuer=facility.issuer, registered=registered)
        for s in studies
    }
    patients = _find_patients(session, list(set(keys.values())))
    fresh: dict[tuple[str, str], Patient] = {}
    for s in studies:
        key = keys[s.uid]
        if key not in patients and key not in fresh:
            fresh[key] = Patient(
                facility_id=facility.id, issuer=key[0], patient_id=key[1], **patient_columns(s.attrs)
            )
    _add_linked_patients(session, list(fresh.values()))
    patients.update(fresh)
    return {uid: patients[key] for uid, key in keys.items()}


def _find_patients(session: Session, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Patient]:
    found: dict[tuple[str, str], Patient] = {}
    for chunk in _chunks(keys):
        for p in session.exec(
            select(Patient).where(tuple_(col(Patient.issuer), col(Patient.patient_id)).in_(chunk))
        ):
            found[(p.issuer, p.patient_id)] = p
    return found


def _add_linked_patients(session: Session, patients: list[Patient]) -> None:
    # Same transaction, small sessions: linking issues ORM updates that scan every object
    # a session holds, so a page's worth of patients in one session would cost O(n^2).
    for batch in _chunks(patients, _LINK_BATCH):
        with Session(bind=session.connection(), expire_on_commit=False) as sub:
            sub.add_all(batch)
            sub.flush()
            for p in batch:
                link_patient(session=sub, patient=p)
            sub.flush()
            for p in batch:
                sub.expunge(p)


def _modalities(study: RemoteStudy, series: Sequence[RemoteSeries]) -> str:
    values = [str_value(s.attrs, "00080060") for s in series]
    if not any(values):
        values = [str(v) for v in (study.attrs.get("00080061") or {}).get("Value") or []]
    mods = list(dict.fromkeys(v for v in values if v))
    return "\\" + "".join(f"{m}\\" for m in mods) if mods else "\\"


def _study_json(attrs: dict[str, Any]) -> str:
    study_json = level_json(attrs, is_study_level, drop=_DROP)
    study_json[_T_AVAILABILITY] = {"vr": "CS", "Value": ["NEARLINE"]}
    return orjson.dumps(study_json).decode()


# Core statements from here on: thousands of rows per page, and ORM objects cost more to build
# than the rows cost to write.
_study_t = core_table(Study)
_series_t = core_table(Series)
_loc_t = core_table(StudyLocation)


def _write_study_rows(
    session: Session,
    facility: Facility,
    studies: Sequence[RemoteStudy],
    series_of: Mapping[str, Sequence[RemoteSeries]],
    patients: Mapping[str, Patient],
) -> tuple[dict[str, int], list[int]]:
    """Insert new studies and update this facility's changed ones. Returns the pk of every study
    written (by UID) and the pks of those updated."""
    existing = {
        uid: (pk, facility_id)
        for uid, pk, facility_id in session.execute(
            select(_study_t.c.study_uid, _study_t.c.pk, _study_t.c.facility_id).where(
                _study_t.c.study_uid.in_([s.uid for s in studies])
            )
        )
    }
    new_rows: list[dict[str, Any]] = []
    changed_rows: list[dict[str, Any]] = []
    pk_of: dict[str, int] = {}
    for s in studies:
        series = series_of.get(s.uid, [])
        values: dict[str, Any] = {
            **study_columns(s.attrs, patients[s.uid]),
            "modalities": _modalities(s, series),
            "num_series": len(series) or s.num_series,
            "num_instances": sum(x.num_instances for x in series) or s.num_instances,
            "study_json": _study_json(s.attrs),
            "updated_at": _now(),
        }
        known = existing.get(s.uid)
        if known is None:
            new_rows.append({"study_uid": s.uid, "facility_id": facility.id, **values})
        elif known[1] == facility.id:
            changed_rows.append({"b_pk": known[0], **values})
            pk_of[s.uid] = known[0]
        # else: indexed from another facility first; this one is only a second location.
    if new_rows:
        stmt = insert(_study_t).returning(_study_t.c.pk, _study_t.c.study_uid)
        for pk, uid in session.execute(stmt, new_rows):
            pk_of[uid] = pk
    if changed_rows:
        session.execute(update(_study_t).where(_study_t.c.pk == bindparam("b_pk")), changed_rows)
    return pk_of, [r["b_pk"] for r in changed_rows]


def _write_series_rows(
    session: Session,
    study_pks: Mapping[str, int],
    changed_study_pks: list[int],
    series_of: Mapping[str, Sequence[RemoteSeries]],
) -> None:
    """Make the series rows of the studies written match the facility's: insert, update (a
    series already indexed, under this or another study, is moved, never doubled), and delete
    the series of changed studies that the facility no longer lists."""
    listed = [rs.uid for uid in study_pks for rs in series_of.get(uid, [])]
    current = _series_pks(session, changed_study_pks, listed)
    wanted: set[str] = set()
    series_new: list[dict[str, Any]] = []
    series_changed: list[dict[str, Any]] = []
    for uid, study_pk in study_pks.items():
        for rs in series_of.get(uid, []):
            if rs.uid in wanted:
                continue
            wanted.add(rs.uid)
            values = {
                "study_pk": study_pk,
                **series_columns(rs.attrs, drop=_DROP),
                "num_instances": rs.num_instances,
            }
            if rs.uid in current:
                series_changed.append({"b_pk": current[rs.uid], **values})
            else:
                series_new.append({"series_uid": rs.uid, **values})
    if series_new:
        session.execute(insert(_series_t), series_new)
    if series_changed:
        session.execute(update(_series_t).where(_series_t.c.pk == bindparam("b_pk")), series_changed)
    gone = [pk for uid, pk in current.items() if uid not in wanted]
    if gone:
        session.execute(delete(_series_t).where(_series_t.c.pk.in_(gone)))


def _series_pks(session: Session, study_pks: list[int], series_uids: list[str]) -> dict[str, int]:
    """The pk of each series indexed under these studies, or under these UIDs anywhere."""
    current: dict[str, int] = {}
    if study_pks:
        for pk, uid in session.execute(
            select(_series_t.c.pk, _series_t.c.series_uid).where(_series_t.c.study_pk.in_(study_pks))
        ):
            current[uid] = pk
    for chunk in _chunks(series_uids):
        for pk, uid in session.execute(
            select(_series_t.c.pk, _series_t.c.series_uid).where(_series_t.c.series_uid.in_(chunk))
        ):
            current[uid] = pk
    return current


def _write_locations(
    session: Session, facility_id: str, run: int, studies: Sequence[RemoteStudy], local: set[str]
) -> None:
    """Note each study at the facility: its remote counts, that job `run` saw it, and whether
    the broker holds its pixels."""
    located = set(locations_at(session=session, facility_id=facility_id, study_uids=[s.uid for s in studies]))
    now = _now()
    loc_new: list[dict[str, Any]] = []
    loc_changed: list[dict[str, Any]] = []
    for s in studies:
        row = {
            "remote_series": s.num_series,
            "remote_instances": s.num_instances,
            "seen_job": run,
            "has_pixels": s.uid in local,
            "synced_at": now,
        }
        if s.uid in located:
            loc_changed.append({"b_uid": s.uid, **row})
        else:
            loc_new.append({"study_uid": s.uid, "facility_id": facility_id, **row})
    if loc_new:
        session.execute(insert(_loc_t), loc_new)
    if loc_changed:
        session.execute(
            update(_loc_t).where(
                _loc_t.c.study_uid == bindparam("b_uid"), _loc_t.c.facility_id == facility_id
            ),
            loc_changed,
        )


# -- studies gone from a facility, studies fetched from one ---------------------------------------


def remove_gone(*, engine: Engine, facility_id: str, study_uids: Sequence[str]) -> None:
    """The studies are no longer at the facility: drop their location there, and their index
    rows unless the broker holds their pixels or another facility holds them."""
    with session_scope(engine) as session:
        for chunk in _chunks(list(study_uids)):
            session.exec(
                delete(StudyLocation).where(
                    col(StudyLocation.facility_id) == facility_id, col(StudyLocation.study_uid).in_(chunk)
                )
            )
            held_elsewhere = set(
                session.exec(select(StudyLocation.study_uid).where(col(StudyLocation.study_uid).in_(chunk)))
            )
            study_pks = [
                pk
                for pk, uid in session.exec(
                    select(Study.pk, Study.study_uid).where(
                        col(Study.study_uid).in_(chunk), Study.facility_id == facility_id
                    )
                )
                if uid not in held_elsewhere
            ]
            if not study_pks:
                continue
            with_pixels = set(
                session.exec(
                    select(Instance.study_pk).where(col(Instance.study_pk).in_(study_pks)).distinct()
                )
            )
            doomed = [pk for pk in study_pks if pk not in with_pixels]
            if doomed:
                session.exec(delete(Series).where(col(Series.study_pk).in_(doomed)))
                session.exec(delete(Study).where(col(Study.pk).in_(doomed)))


def _study_and_held(session: Session, study_uid: str) -> tuple[Study, dict[int, int]]:
    """A fetched study's row, and how many of its instances the broker holds per series pk."""
    study = session.exec(select(Study).where(Study.study_uid == study_uid)).one()
    per_series = dict(
        session.exec(
            select(Instance.series_pk, func.count())
            .where(Instance.study_pk == study.pk)
            .group_by(col(Instance.series_pk))
        ).all()
    )
    return study, per_series


def mark_local(*, engine: Engine, study_uid: str) -> None:
    """The broker now holds a fetched study's pixels: its counts become those of the instances
    held (ingest added to the remote counts sync had set), its answers say ONLINE instead of
    NEARLINE, and every location of it notes the pixels are here."""
    with session_scope(engine) as session:
        study, per_series = _study_and_held(session, study_uid)
        for series in session.exec(select(Series).where(Series.study_pk == study.pk)):
            series.num_instances = int(per_series.get(series.pk or 0, 0))
            session.add(series)
        study.num_instances = int(sum(per_series.values()))
        study.num_series = len(per_series) or study.num_series
        attrs = orjson.loads(study.study_json or "{}")
        attrs[_T_AVAILABILITY] = {"vr": "CS", "Value": ["ONLINE"]}
        study.study_json = orjson.dumps(attrs).decode()
        session.add(study)
        session.exec(
            update(StudyLocation)
            .where(col(StudyLocation.study_uid) == study_uid)
            .values(has_pixels=True, fetched_at=_now())
        )


def held_instances(*, session: Session, study_uid: str) -> set[str]:
    """The SOP Instance UIDs of the study the broker holds (empty when the index has no such
    study)."""
    return set(
        session.exec(
            select(Instance.sop_uid)
            .join(Study, col(Instance.study_pk) == col(Study.pk))
            .where(Study.study_uid == study_uid)
        )
    )


def mark_partial(*, engine: Engine, study_uid: str, facility_id: str, stored: Mapping[str, int]) -> None:
    """A fetch from the facility left instances of the study missing: what it stored is kept, the
    study stays held at the facility (NEARLINE, no location has its pixels), and its location there
    notes when the fetch ran (`fetched_at`), so retrieve on demand can wait before trying again.

    `stored`: the instances the fetch stored, by series UID. Ingest added them to the counts sync
    had set from the facility's listing; they are taken back off, so a series counts what the
    facility listed, or what the broker holds when that is more."""
    with session_scope(engine) as session:
        study, per_series = _study_and_held(session, study_uid)
        total = 0
        all_series = list(session.exec(select(Series).where(Series.study_pk == study.pk)))
        for series in all_series:
            listed = series.num_instances - stored.get(series.series_uid, 0)
            series.num_instances = max(listed, int(per_series.get(series.pk or 0, 0)))
            total += series.num_instances
            session.add(series)
        location = session.get(StudyLocation, (study_uid, facility_id))
        listed_total = location.remote_instances if location is not None else 0
        study.num_instances = max(total, listed_total)
        study.num_series = max(len(all_series), location.remote_series if location is not None else 0)
        session.add(study)
        session.exec(
            update(StudyLocation)
            .where(col(StudyLocation.study_uid) == study_uid, col(StudyLocation.facility_id) == facility_id)
            .values(has_pixels=False, fetched_at=_now())
        )
