"""The lookup's facts are kept by the index: written at ingest, and computed by a durable job for
studies stored before they existed; the matcher retrains itself as records grow."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col
from sqlmodel import select as sm_select

from broker.app import build_state
from broker.dicom.dose import DoseRecord, DoseSource, ImageDose
from broker.identity import service as identity
from broker.identity.models import IdentitySetting
from broker.index import service as index
from broker.index.facts import dose_record
from broker.index.instance_facts import compact_dose_json
from broker.index.models import DoseFact, SeriesFacts, Study, StudyFacts
from broker.jobs import service as jobs
from broker.jobs.models import Job
from broker.lookup.dose import study_dose


@pytest.fixture
def demo_state(demo_backend: Any, tmp_path: Any, make_settings: Any) -> Iterator[Any]:
    # A copy of the demo loaded once per session: what load_demo leaves, without loading it again.
    st = build_state(make_settings(demo_backend, tmp_path))
    yield st
    st.engine.dispose()


def _counts(engine: Engine) -> tuple[int, int, int]:
    with Session(engine) as s:
        return tuple(
            s.execute(select(func.count()).select_from(t)).scalar_one()
            for t in (StudyFacts, SeriesFacts, DoseFact)
        )


def _run_queued(engine: Engine, store: Any, kind: str) -> Job:
    with Session(engine) as s:
        job = s.exec(sm_select(Job).where(Job.kind == kind).order_by(col(Job.id).desc())).first()
    assert job is not None and job.id is not None, f"no {kind} job queued"
    claimed = jobs.claim(engine=engine, job_id=job.id)
    assert claimed is not None
    jobs.run_claimed(engine=engine, store=store, job=claimed)
    with Session(engine) as s:
        done = s.get(Job, job.id)
    assert done is not None and done.status == "done", done
    return done


def test_facts_at_ingest_then_rebuilt_by_the_startup_job(demo_state: Any) -> None:
    engine = demo_state.engine
    at_ingest = _counts(engine)
    assert all(n > 0 for n in at_ingest)  # every demo study, its series, the dose-carrying instances
    with Session(engine) as s:
        assert not index.facts_missing(session=s)
        # As if the studies had been stored before the facts existed.
        for t in (StudyFacts, SeriesFacts, DoseFact):
            s.execute(delete(t))
        s.commit()
        assert index.facts_missing(session=s)
    st = build_state(demo_state.settings)  # startup queues the facts job
    try:
        done = _run_queued(st.engine, st.store, index.FACTS_JOB)
        assert "studies" in (done.message or "")
        assert _counts(engine) == at_ingest
        with Session(engine) as s:
            assert not index.facts_missing(session=s)
        assert index.ensure_facts_current(engine=engine) is None
    finally:
        st.engine.dispose()


def test_matcher_retrains_when_records_grew(demo_state: Any) -> None:
    engine = demo_state.engine
    assert identity.training_due(records=49, last=None) is False
    assert identity.training_due(records=1199, last=1000) is False
    assert identity.training_due(records=1200, last=1000) is True
    assert identity.training_due(records=110_000, last=100_000) is True
    with Session(engine) as s:
        s.execute(delete(IdentitySetting).where(col(IdentitySetting.name) == "trained_records"))
        s.commit()
    job = identity.ensure_trained(engine=engine)
    if job is None:
        pytest.skip("the demo has fewer records than training needs")
    _run_queued(engine, demo_state.store, identity.TRAIN_JOB)
    assert identity.ensure_trained(engine=engine) is None  # trained on today's records: not due


def test_dose_facts_leave_out_the_uids_their_row_holds_and_both_releases_read_them_alike(
    demo_state: Any,
) -> None:
    with Session(demo_state.engine) as s:
        facts = list(s.exec(sm_select(DoseFact)))
        study_uids = {st.pk: st.study_uid for st in s.exec(sm_select(Study))}
    assert facts
    by_study: dict[int, list[DoseFact]] = {}
    for f in facts:
        stored = orjson.loads(f.record_json)
        assert "study_instance_uid" not in stored  # the study row's
        if stored["source"] != DoseSource.IMAGE_DAP:
            assert "sop_instance_uid" not in stored  # the row's key
        by_study.setdefault(f.study_pk, []).append(f)
    for study_pk, rows in by_study.items():
        uid = study_uids[study_pk]
        records = [dose_record(f.record_json, sop_uid=f.sop_uid, study_uid=uid) for f in rows]
        filled = [(r.sop_instance_uid, r.study_instance_uid) for r in records]
        assert filled == [(f.sop_uid, uid) for f in rows]
        # The previous release reads the JSON as it is (and is given the study's UID): during a
        # rolling upgrade its nodes must compute the same dose from rows this release wrote.
        previous = [DoseRecord.model_validate(orjson.loads(f.record_json)) for f in rows]
        for region in (None, "chest"):
            assert study_dose(
                records, age_at_exam_years=40.0, region=region, study_instance_uid=uid
            ) == study_dose(previous, age_at_exam_years=40.0, region=region, study_instance_uid=uid)
    # A row in the earlier format (the UIDs inside) keeps its own.
    full = records[0].model_dump_json()
    again = dose_record(full, sop_uid="9.9", study_uid="9.9.9")
    assert (again.sop_instance_uid, again.study_instance_uid) == (records[0].sop_instance_uid, uid)


def _images(source: DoseSource, series: str, n: int, **image: Any) -> list[DoseRecord]:
    return [
        DoseRecord(
            sop_instance_uid=f"{series}.{i}",
            series_instance_uid=series,
            study_instance_uid="1.2.3",
            modality="CT" if source == DoseSource.IMAGE_CTDIVOL else "DX",
            source=source,
            image=ImageDose(**{k: (v(i) if callable(v) else v) for k, v in image.items()}),
        )
        for i in range(n)
    ]


def test_what_a_dose_fact_leaves_out_changes_no_dose_the_previous_release_computes() -> None:
    # Two CT series without Irradiation Event UIDs (grouped by series: one event each) and
    # projection images without them (each image its own event, keyed by its SOP Instance UID).
    ct = _images(DoseSource.IMAGE_CTDIVOL, "1.2.3.1", 20, ctdivol_mgy=10.0, z_mm=lambda i: i * 5.0)
    ct += _images(DoseSource.IMAGE_CTDIVOL, "1.2.3.2", 10, ctdivol_mgy=20.0, z_mm=lambda i: 300 + i * 5.0)
    dx = _images(DoseSource.IMAGE_DAP, "1.2.3.3", 3, dap_gy_cm2=0.5)
    for records in (ct, dx):
        stored = [(r.sop_instance_uid, compact_dose_json(r)) for r in records]
        now = [dose_record(j, sop_uid=sop, study_uid="1.2.3") for sop, j in stored]
        assert [r.model_dump() for r in now] == [r.model_dump() for r in records]
        previous = [DoseRecord.model_validate(orjson.loads(j)) for _sop, j in stored]
        assert study_dose(previous, age_at_exam_years=40.0, region="chest", study_instance_uid="1.2.3") == (
            study_dose(records, age_at_exam_years=40.0, region="chest", study_instance_uid="1.2.3")
        )
