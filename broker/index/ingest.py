"""Ingest: parse each instance once, store its object, then index it.

The order is the rule of the house: the object is in storage before its index row commits, and
an outcome is "stored" only after both. One transaction covers a whole batch (a STOW-RS request
or a group of C-STOREs).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col
from sqlmodel import select as sqlmodel_select

from broker.dicom import status
from broker.dicom.attributes import is_series_level, is_study_level
from broker.dicom.json_model import BULK_THRESHOLD, casefold_pn, fuzzy_pn, instance_json, str_value
from broker.dicom.uids import is_valid_uid
from broker.federation.models import Facility
from broker.identity import service as identity_service
from broker.index.models import Instance, InstanceConflict, Patient, Series, Study
from broker.index.schemas import StoreOutcome
from broker.security.schemas import Principal
from storage import ObjectStore
from storage.keys import conflict_key, instance_key

log = logging.getLogger("scanonce.ingest")

_ATTEMPTS = 8
_ROW_TAGS = frozenset({"00200013", "00280010", "00280011", "00280008", "00080060"})
_T_SOP_CLASS = "00080016"
_T_SOP_UID = "00080018"
_T_STUDY_UID = "0020000D"
_T_SERIES_UID = "0020000E"


@dataclass
class _Parsed:
    path: str
    sha256: str
    size: int
    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    attrs: dict[str, Any]
    metadata: bytes

    def outcome(self, st: str, reason: int | None = None, message: str = "") -> StoreOutcome:
        return StoreOutcome(
            sop_class_uid=self.sop_class_uid,
            sop_instance_uid=self.sop_uid,
            study_uid=self.study_uid,
            series_uid=self.series_uid,
            status=st,  # type: ignore[arg-type]
            failure_reason=reason,
            message=message,
        )


def _failed(reason: int, message: str, **uids: str) -> StoreOutcome:
    return StoreOutcome(
        sop_class_uid=uids.get("sop_class_uid", ""),
        sop_instance_uid=uids.get("sop_instance_uid", ""),
        study_uid=uids.get("study_uid", ""),
        series_uid=uids.get("series_uid", ""),
        status="failed",
        failure_reason=reason,
        message=message,
    )


def _sha256(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def parse_instance(path: str, *, expected_study_uid: str | None = None) -> _Parsed | StoreOutcome:
    """Read one Part 10 file once; a StoreOutcome (failed) explains why it cannot be stored."""
    try:
        ds = dcmread(path, defer_size=BULK_THRESHOLD)
    except InvalidDicomError:
        return _failed(status.CANNOT_UNDERSTAND, "not a DICOM Part 10 file (no DICM preamble/prefix)")
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
        return _failed(status.CANNOT_UNDERSTAND, f"cannot parse DICOM: {type(exc).__name__}")
    truncated = _truncated(ds, path, os.path.getsize(path))
    uids = {
        "sop_class_uid": str(ds.get("SOPClassUID", "") or ""),
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "") or ""),
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
    }
    for name, keyword in (
        ("sop_class_uid", "SOPClassUID"),
        ("sop_instance_uid", "SOPInstanceUID"),
        ("study_uid", "StudyInstanceUID"),
        ("series_uid", "SeriesInstanceUID"),
    ):
        if not is_valid_uid(uids[name]):
            shown = {k: (v if is_valid_uid(v) else "") for k, v in uids.items()}
            what = "missing" if not uids[name] else "not a valid UID"
            return _failed(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is {what}", **shown)
    if expected_study_uid is not None and uids["study_uid"] != expected_study_uid:
        return _failed(
            status.STUDY_UID_MISMATCH,
            "StudyInstanceUID of the instance differs from the study in the request URL",
            **uids,
        )
    file_meta = getattr(ds, "file_meta", None)
    ts = str(file_meta.get("TransferSyntaxUID", "")) if file_meta is not None else ""
    if not is_valid_uid(ts):
        return _failed(status.CANNOT_UNDERSTAND, "file meta has no valid TransferSyntaxUID", **uids)
    try:
        attrs = instance_json(
            ds,
            bulk_prefix=(
                f"studies/{uids['study_uid']}/series/{uids['series_uid']}/instances/{uids['sop_instance_uid']}"
            ),
        )
    except Exception as exc:  # noqa: BLE001
        return _failed(status.CANNOT_UNDERSTAND, f"cannot read attributes: {type(exc).__name__}", **uids)
    sha, size = _sha256(path)
    if truncated:
        return _failed(
            status.CANNOT_UNDERSTAND, "the file ends before its last attribute does (truncated)", **uids
        )
    return _Parsed(
        path=path,
        sha256=sha,
        size=size,
        sop_class_uid=uids["sop_class_uid"],
        sop_uid=uids["sop_instance_uid"],
        study_uid=uids["study_uid"],
        series_uid=uids["series_uid"],
        transfer_syntax_uid=ts,
        # Keep only what the index rows need; the full attributes live on as compact JSON bytes,
        # so a large batch holds kilobytes per instance, not a tree of Python objects.
        attrs={k: v for k, v in attrs.items() if k in _ROW_TAGS or is_study_level(k) or is_series_level(k)},
        metadata=orjson.dumps(attrs),
    )


_NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})


def _short_native_pixels(ds: Any, value: Any) -> bool:
    try:
        if str(ds.file_meta.TransferSyntaxUID) not in _NATIVE or not isinstance(value, bytes | bytearray):
            return False
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated)
        samples = int(ds.SamplesPerPixel)
        if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
            samples = 2  # chroma subsampled: two samples per pixel on average
        expected = (int(ds.Rows) * int(ds.Columns) * samples * frames * bits + 7) // 8
    except (AttributeError, TypeError, ValueError):
        return False
    return len(value) < expected


def _truncated(ds: Any, path: str, size: int) -> bool:
    """Whether the file was cut short. pydicom stops quietly at a truncated element (keeping
    what bytes there were), and a deferred value is never read at ingest, so compare where the
    dataset ends with the file. Must run before anything converts the dataset's elements."""
    keys = list(ds.keys())
    if not keys:
        return True
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("TransferSyntaxUID", "")) == "1.2.840.10008.1.2.1.99":
        # Deflated: offsets count inflated bytes, and zlib itself fails on a cut stream.
        return False
    last = ds.get_item(keys[-1], keep_deferred=True)
    if not isinstance(last, RawDataElement):
        # Read eagerly (undefined length, or a value pydicom had to read short): for native
        # pixel data the expected size is known; for anything else trust the parser.
        return last.tag == 0x7FE00010 and _short_native_pixels(ds, last.value)
    if last.length == 0xFFFFFFFF:
        return False
    if last.value is not None:
        if len(last.value) < last.length:
            return True
        end = last.value_tell + len(last.value)
    else:
        end = last.value_tell + last.length
    if end > size:
        return True
    # Bytes after the dataset that are not zero padding are an element pydicom could not read.
    with open(path, "rb") as f:
        f.seek(end)
        while chunk := f.read(1 << 16):
            if chunk.strip(b"\x00"):
                return True
    return False


def _int(attrs: dict[str, Any], tag: str) -> int | None:
    v = str_value(attrs, tag)
    try:
        return int(float(v)) if v != "" else None
    except ValueError:
        return None


def normalize_time(value: str) -> str:
    """HHMMSS.ffffff with missing parts zero-filled, so times compare as strings."""
    value = value.replace(":", "").strip()
    if not value:
        return ""
    main, _, frac = value.partition(".")
    return main.ljust(6, "0")[:6] + ("." + frac if frac else "")


def _level_json(attrs: dict[str, Any], pick: Any) -> str:
    return orjson.dumps({k: v for k, v in attrs.items() if pick(k)}).decode()


class _Batch:
    """Index rows touched by one batch, cached so each is read at most once."""

    def __init__(self, session: Session, facility: Facility, issuers: set[str]) -> None:
        self.session = session
        self.facility = facility
        self.issuers = issuers
        self.patients: dict[tuple[str, str], Patient] = {}
        self.studies: dict[str, Study] = {}
        self.series: dict[str, Series] = {}
        self.new_series: list[tuple[int, str]] = []

    def patient(self, p: _Parsed) -> Patient:
        a = p.attrs
        pid = str_value(a, "00100020").strip()
        issuer_in_data = str_value(a, "00100021").strip()
        # IssuerOfPatientID is honoured only when it names a registered issuer; otherwise the
        # sending facility's issuer qualifies the ID, so a bare ID never links two patients.
        issuer = issuer_in_data if issuer_in_data in self.issuers else self.facility.issuer
        key_id = pid or f"~no-id~{p.study_uid}"
        cached = self.patients.get((issuer, key_id))
        if cached is not None:
            return cached
        patient = self.session.exec(
            sqlmodel_select(Patient).where(col(Patient.issuer) == issuer, col(Patient.patient_id) == key_id)
        ).first()
        name = str_value(a, "00100010")
        birth = str_value(a, "00100030")[:8]
        sex = str_value(a, "00100040")[:16]
        if patient is None:
            patient = Patient(
                facility_id=self.facility.id,
                issuer=issuer,
                patient_id=key_id,
                patient_name=name,
                name_norm=casefold_pn(name),
                name_fuzzy=fuzzy_pn(name),
                birth_date=birth,
                sex=sex,
            )
            self.session.add(patient)
            self.session.flush()
            identity_service.link_patient(session=self.session, patient=patient, dataset=p.attrs)
        elif (patient.patient_name, patient.birth_date, patient.sex) != (name, birth, sex) and name:
            patient.patient_name, patient.birth_date, patient.sex = name, birth, sex
            patient.name_norm, patient.name_fuzzy = casefold_pn(name), fuzzy_pn(name)
            self.session.add(patient)
            self.session.flush()
            identity_service.link_patient(session=self.session, patient=patient, dataset=p.attrs)
        self.patients[(issuer, key_id)] = patient
        return patient

    def study(self, p: _Parsed) -> Study:
        cached = self.studies.get(p.study_uid)
        if cached is not None:
            return cached
        study = self.session.exec(sqlmodel_select(Study).where(col(Study.study_uid) == p.study_uid)).first()
        if study is None:
            patient = self.patient(p)
            a = p.attrs
            study = Study(
                study_uid=p.study_uid,
                facility_id=self.facility.id,
                patient_pk=patient.pk,  # type: ignore[arg-type]
                patient_id=str_value(a, "00100020"),
                issuer=patient.issuer,
                patient_name=patient.patient_name,
                name_norm=patient.name_norm,
                name_fuzzy=patient.name_fuzzy,
                birth_date=patient.birth_date,
                sex=patient.sex,
                study_date=str_value(a, "00080020")[:8],
                study_time=normalize_time(str_value(a, "00080030"))[:32],
                accession_number=str_value(a, "00080050")[:64],
                study_id=str_value(a, "00200010")[:64],
                study_description=str_value(a, "00081030")[:256],
                referring_physician=casefold_pn(str_value(a, "00080090"))[:256],
                modalities="\\",
                study_json=_level_json(a, is_study_level),
            )
            self.session.add(study)
            self.session.flush()
        self.studies[p.study_uid] = study
        return study

    def series_of(self, p: _Parsed, study: Study) -> Series:
        cached = self.series.get(p.series_uid)
        if cached is not None:
            return cached
        series = self.session.exec(
            sqlmodel_select(Series).where(col(Series.series_uid) == p.series_uid)
        ).first()
        if series is None:
            a = p.attrs
            modality = str_value(a, "00080060")[:16]
            series = Series(
                series_uid=p.series_uid,
                study_pk=study.pk,  # type: ignore[arg-type]
                modality=modality,
                series_number=_int(a, "00200011"),
                series_description=str_value(a, "0008103E")[:256],
                body_part=str_value(a, "00180015")[:64],
                pps_start_date=str_value(a, "00400244")[:8],
                pps_start_time=normalize_time(str_value(a, "00400245"))[:32],
                series_json=_level_json(a, is_series_level),
            )
            self.session.add(series)
            self.session.flush()
            self.new_series.append((study.pk, modality))  # type: ignore[arg-type]
        self.series[p.series_uid] = series
        return series


_POOL: ThreadPoolExecutor | None = None


def _io_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="scanonce-store")
    return _POOL


def _known_issuers(session: Session) -> set[str]:
    return {r[0] for r in session.exec(select(Facility.issuer)).all()}  # type: ignore[call-overload]


def ingest_files(
    *,
    engine: Engine,
    store: ObjectStore,
    principal: Principal,
    facility_id: str,
    paths: Sequence[str],
    expected_study_uid: str | None = None,
    consume: bool = False,
) -> list[StoreOutcome]:
    """Store and index Part 10 files; one outcome per path, in order.

    Same SOP Instance UID with the same bytes: "duplicate" (a success, nothing rewritten).
    Same UID with different bytes: failed with DUPLICATE_SOP_INSTANCE; the new copy is kept apart
    under conflicts/ and recorded, the stored one untouched. Blocking: call from a thread.

    `consume=True` says the files are the caller's own temporary copies (a STOW-RS part, a
    C-STORE spool file): the store may move them into place instead of copying. The caller
    still removes whatever is left afterwards.
    """
    outcomes: list[StoreOutcome | None] = [None] * len(paths)
    parsed: list[tuple[int, _Parsed]] = []
    for i, path in enumerate(paths):
        result = parse_instance(path, expected_study_uid=expected_study_uid)
        if isinstance(result, StoreOutcome):
            outcomes[i] = result
        else:
            parsed.append((i, result))
    if parsed:
        placed: set[str] = set()
        for attempt in range(_ATTEMPTS):
            try:
                _index_batch(
                    engine=engine,
                    store=store,
                    facility_id=facility_id,
                    parsed=parsed,
                    outcomes=outcomes,
                    consume=consume,
                    placed=placed,
                )
                break
            except IntegrityError:
                # A concurrent batch created the same patient/study/series/instance first and
                # committed: the next attempt sees its rows. Jitter keeps racing batches apart.
                if attempt == _ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
    done = [o for o in outcomes if o is not None]
    stored = sum(o.status == "stored" for o in done)
    log.info(
        "ingest by %s into %s: %d stored, %d duplicate, %d failed",
        principal.who,
        facility_id,
        stored,
        sum(o.status == "duplicate" for o in done),
        sum(o.status == "failed" for o in done),
    )
    return done


def _index_batch(
    *,
    engine: Engine,
    store: ObjectStore,
    facility_id: str,
    parsed: list[tuple[int, _Parsed]],
    outcomes: list[StoreOutcome | None],
    consume: bool = False,
    placed: set[str],
) -> None:
    with Session(engine, expire_on_commit=False) as session:
        facility = session.get(Facility, facility_id)
        if facility is None:
            from broker.errors import NotFound

            raise NotFound(f"no facility {facility_id!r}")
        batch = _Batch(session, facility, _known_issuers(session))
        uids = [p.sop_uid for _, p in parsed]
        existing: dict[str, str] = {}
        for chunk_start in range(0, len(uids), 500):
            chunk = uids[chunk_start : chunk_start + 500]
            for sop_uid, sha in session.exec(
                sqlmodel_select(col(Instance.sop_uid), col(Instance.sha256)).where(
                    col(Instance.sop_uid).in_(chunk)
                )
            ).all():
                existing[sop_uid] = sha
        pending: list[tuple[int, _Parsed]] = []
        conflicts: list[tuple[int, _Parsed]] = []
        for i, p in parsed:
            prior = existing.get(p.sop_uid)
            if prior is None:
                existing[p.sop_uid] = p.sha256
                pending.append((i, p))
            elif prior == p.sha256:
                outcomes[i] = p.outcome("duplicate", message="already stored (identical object)")
            else:
                conflicts.append((i, p))

        # Objects first: nothing is indexed (and so acknowledged) before its bytes are stored.
        # File and S3 writes (and their fsyncs) release the GIL, so they run side by side.
        # Keys are content-addressed, so an object placed by an earlier attempt is already right.
        puts = [(instance_key(p.study_uid, p.series_uid, p.sop_uid, p.sha256), p.path) for _i, p in pending]
        puts += [(conflict_key(p.sop_uid, p.sha256), p.path) for _i, p in conflicts]
        puts = [(key, path) for key, path in puts if key not in placed]

        def put(key_path: tuple[str, str]) -> None:
            store.put_file(key_path[0], key_path[1], move=consume)
            placed.add(key_path[0])

        if len(puts) == 1:
            put(puts[0])
        elif puts:
            list(_io_pool().map(put, puts))

        touched_series: dict[int, int] = {}
        touched_studies: dict[int, int] = {}
        rows: list[dict[str, Any]] = []
        for _i, p in pending:
            study = batch.study(p)
            series = batch.series_of(p, study)
            a = p.attrs
            rows.append(
                {
                    "sop_uid": p.sop_uid,
                    "series_pk": series.pk,
                    "study_pk": study.pk,
                    "facility_id": facility.id,
                    "sop_class_uid": p.sop_class_uid,
                    "instance_number": _int(a, "00200013"),
                    "transfer_syntax_uid": p.transfer_syntax_uid,
                    "rows": _int(a, "00280010"),
                    "columns": _int(a, "00280011"),
                    "number_of_frames": _int(a, "00280008"),
                    "size": p.size,
                    "sha256": p.sha256,
                    "object_key": instance_key(p.study_uid, p.series_uid, p.sop_uid, p.sha256),
                    "instance_json": "{}",
                    "metadata_json": p.metadata,
                }
            )
            assert series.pk is not None and study.pk is not None  # flushed
            touched_series[series.pk] = touched_series.get(series.pk, 0) + 1
            touched_studies[study.pk] = touched_studies.get(study.pk, 0) + 1
        if rows:
            session.execute(Instance.__table__.insert(), rows)  # type: ignore[attr-defined]
        # Counters are bumped in SQL, not on the loaded rows, so concurrent batches never lose updates.
        series_t, study_t = Series.__table__, Study.__table__  # type: ignore[attr-defined]
        for pk, n in touched_series.items():
            session.execute(
                update(series_t).where(series_t.c.pk == pk).values(num_instances=series_t.c.num_instances + n)
            )
        for pk, n in touched_studies.items():
            session.execute(
                update(study_t).where(study_t.c.pk == pk).values(num_instances=study_t.c.num_instances + n)
            )
        for pk, modality in batch.new_series:
            session.execute(
                update(study_t).where(study_t.c.pk == pk).values(num_series=study_t.c.num_series + 1)
            )
            if modality:
                session.execute(
                    update(study_t)
                    .where(
                        study_t.c.pk == pk, ~study_t.c.modalities.contains(f"\\{modality}\\", autoescape=True)
                    )
                    .values(modalities=study_t.c.modalities + f"{modality}\\")
                )
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
        session.commit()
    for i, p in pending:
        outcomes[i] = p.outcome("stored")
    for i, p in conflicts:
        outcomes[i] = p.outcome(
            "failed",
            status.DUPLICATE_SOP_INSTANCE,
            "a different object is already stored under this SOP Instance UID; the new copy was kept "
            "apart for review and the stored one is unchanged",
        )
