"""Time the prior lookup (`lookup.service.find_priors`) on a large synthetic index (not a test).

Rows go straight into the index and identity tables in bulk (never through ingest): persons at
0.3 per study (1M studies / 300k persons), each with a patient at facility A and half of them one
at facility B too, each study a CT with its dose SR (two series, series facts, one dose record).
Then `--lookups` lookups of random persons by facility + MRN for "CT ABDOMEN PELVIS", timed.

    .venv/bin/python bench/lookup.py --studies 100000 [--db postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Boolean, DateTime, Float, Integer, LargeBinary, Text, text
from sqlalchemy.engine import Engine
from sqlmodel import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.db import make_engine, migrate  # noqa: E402
from broker.dicom.dose import CTEvent, DoseRecord, DoseSource, Phantom  # noqa: E402
from broker.identity.models import IdentityRecord, Person, ReviewItem  # noqa: E402
from broker.index.instance_facts import compact_dose_json  # noqa: E402
from broker.index.models import DoseFact, Patient, Series, SeriesFacts, Study, StudyFacts  # noqa: E402
from broker.lookup import service  # noqa: E402
from broker.security.schemas import Principal, Role  # noqa: E402

BATCH = 20_000
NOW = datetime.now(UTC)
DESCRIPTIONS = [
    "CT ABDOMEN PELVIS W CONTRAST",
    "CT HEAD WO CONTRAST",
    "CT CHEST W CONTRAST",
    "XR CHEST 2 VIEWS",
]


def _filled(table: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every NOT NULL column a value (the models' defaults live in Python, not in SQL)."""
    blanks: dict[str, Any] = {}
    for c in table.columns:
        if c.nullable or c.primary_key:
            continue
        t = c.type
        blanks[c.name] = (
            NOW
            if isinstance(t, DateTime)
            else False
            if isinstance(t, Boolean)
            else b"{}"
            if isinstance(t, LargeBinary)
            else "{}"
            if isinstance(t, Text)
            else 0
            if isinstance(t, Integer | Float)
            else ""
        )
    return [{**blanks, **r} for r in rows]


def _insert(engine: Engine, model: Any, rows: list[dict[str, Any]]) -> None:
    table = model.__table__
    if rows:
        with engine.begin() as conn:
            conn.execute(table.insert(), _filled(table, rows))


def load(engine: Engine, studies: int, seed: int = 1) -> int:
    rng = random.Random(seed)
    persons = max(1, int(studies * 0.3))
    with engine.begin() as conn:
        for fid in ("A", "B"):
            conn.execute(
                text(
                    "INSERT INTO facility (id, name, issuer, created_at)"
                    " VALUES (:i, :i, :i, CURRENT_TIMESTAMP)"
                ),
                {"i": fid},
            )
    dose = compact_dose_json(
        DoseRecord(
            sop_instance_uid="1.2.3",
            modality="SR",
            source=DoseSource.RDSR,
            ct_events=(
                CTEvent(
                    event_uid="1.2.3.1",
                    ctdivol_mgy=9.6,
                    dlp_mgy_cm=345.0,
                    phantom=Phantom.BODY_32,
                    target_region="abdomen_pelvis",
                ),
            ),
            dlp_total_mgy_cm=345.0,
        )
    )
    patient_pk = study_pk = series_pk = 0
    person_patients: list[list[int]] = []
    for start in range(0, persons, BATCH):
        people, patients, records = [], [], []
        for pid in range(start + 1, min(persons, start + BATCH) + 1):
            people.append({"id": pid, "created_at": NOW})
            mine = []
            for fid in ("A", "B") if rng.random() < 0.5 else ("A",):
                patient_pk += 1
                mine.append(patient_pk)
                birth = f"{rng.randint(1940, 2024)}0{rng.randint(1, 9)}1{rng.randint(0, 9)}"
                patients.append(
                    {
                        "pk": patient_pk,
                        "facility_id": fid,
                        "issuer": fid,
                        "patient_id": f"{fid}{pid}",
                        "birth_date": birth,
                        "person_id": pid,
                        "updated_at": NOW,
                    }
                )
                records.append(
                    {
                        "id": patient_pk,
                        "issuer": fid,
                        "value": f"{fid}{pid}",
                        "person_id": pid,
                        "facility_id": fid,
                        "patient_pk": patient_pk,
                        "birth_date": birth,
                        "updated_at": NOW,
                    }
                )
            person_patients.append(mine)
        _insert(engine, Person, people)
        _insert(engine, Patient, patients)
        _insert(engine, IdentityRecord, records)
    # Some open review items, as a live MPI has.
    _insert(
        engine,
        ReviewItem,
        [
            {
                "record_id": rng.randint(1, patient_pk),
                "candidate_record_id": rng.randint(1, patient_pk),
                "weight": 8.0,
                "status": "open",
                "created_at": NOW,
            }
            for _ in range(max(10, persons // 100))
        ],
    )
    births: dict[int, str] = {}
    for start in range(0, studies, BATCH):
        st, se, sf, df, done = [], [], [], [], []
        for _ in range(start, min(studies, start + BATCH)):
            study_pk += 1
            pid = (study_pk - 1) % persons  # every person gets ~3.3 studies
            ppk = rng.choice(person_patients[pid])
            fid = "A" if ppk == person_patients[pid][0] else "B"
            d = (date(2026, 12, 1) - timedelta(days=rng.randint(0, 3650))).strftime("%Y%m%d")
            desc = rng.choice(DESCRIPTIONS)
            st.append(
                {
                    "pk": study_pk,
                    "study_uid": f"2.25.{study_pk}",
                    "facility_id": fid,
                    "patient_pk": ppk,
                    "patient_id": f"{fid}{pid + 1}",
                    "issuer": fid,
                    "birth_date": births.get(ppk, "20100101"),
                    "study_date": d,
                    "study_description": desc,
                    "modalities": "\\CT\\SR\\",
                    "num_series": 2,
                    "num_instances": 101,
                    "updated_at": NOW,
                }
            )
            for mod, n in (("CT", 100), ("SR", 1)):
                series_pk += 1
                se.append(
                    {
                        "pk": series_pk,
                        "series_uid": f"2.25.9{series_pk}",
                        "study_pk": study_pk,
                        "modality": mod,
                        "series_description": desc if mod == "CT" else "Dose Report",
                        "num_instances": n,
                    }
                )
                sf.append(
                    {
                        "series_pk": series_pk,
                        "study_pk": study_pk,
                        "min_slice_thickness_mm": 0.625 if mod == "CT" else None,
                        "instances": n,
                    }
                )
            df.append({"sop_uid": f"2.25.8{study_pk}", "study_pk": study_pk, "record_json": dose})
            done.append({"study_pk": study_pk, "version": 1, "computed_at": NOW})
        _insert(engine, Study, st)
        _insert(engine, Series, se)
        _insert(engine, SeriesFacts, sf)
        _insert(engine, DoseFact, df)
        _insert(engine, StudyFacts, done)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            for table, col, n in (
                ("patient", "pk", patient_pk),
                ("study", "pk", study_pk),
                ("series", "pk", series_pk),
                ("identity_record", "id", patient_pk),
                ("identity_person", "id", persons),
            ):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', '{col}'), {n})"))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for table in (
                "patient",
                "study",
                "series",
                "series_facts",
                "dose_fact",
                "study_facts",
                "identity_record",
                "identity_review",
                "study_location",
            ):
                conn.execute(text(f"VACUUM ANALYZE {table}"))
    else:
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    return persons


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=100_000)
    ap.add_argument("--lookups", type=int, default=300)
    ap.add_argument("--db", default="", help="database URL (default: a new SQLite file)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="lookup-bench-")
    engine = make_engine(args.db or f"sqlite:///{tmp}/index.sqlite3")
    migrate(engine)
    t = time.perf_counter()
    persons = load(engine, args.studies)
    load_s = time.perf_counter() - t
    rng = random.Random(7)
    principal = Principal(who="bench", role=Role.admin, facility="A")
    times, priors = [], []
    with Session(engine) as session:
        for i in range(args.lookups + 20):
            pid = rng.randint(1, persons)
            c = time.perf_counter()
            answer = service.find_priors(
                session=session,
                principal=principal,
                facility="A",
                mrn=f"A{pid}",
                exam="CT ABDOMEN PELVIS",
                setting="ed",
                now=date(2026, 12, 5),
            )
            if i >= 20:  # the first lookups load the vocabulary and warm the caches
                times.append((time.perf_counter() - c) * 1000)
                priors.append(len(answer.priors))
            session.rollback()
    times.sort()
    print(
        json.dumps(
            {
                "db": engine.dialect.name,
                "studies": args.studies,
                "persons": persons,
                "load_s": round(load_s, 1),
                "lookups": len(times),
                "priors_per_lookup_mean": round(statistics.mean(priors), 2),
                "p50_ms": round(times[len(times) // 2], 2),
                "p95_ms": round(times[int(len(times) * 0.95) - 1], 2),
                "max_ms": round(times[-1], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
