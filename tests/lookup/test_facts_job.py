"""The lookup's facts are kept by the index: written at ingest, and computed by a durable job for
studies stored before they existed; the matcher retrains itself as records grow."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col
from sqlmodel import select as sm_select

from broker.app import build_state
from broker.identity import service as identity
from broker.identity.models import IdentitySetting
from broker.index import service as index
from broker.index.models import DoseFact, SeriesFacts, StudyFacts
from broker.jobs import service as jobs
from broker.jobs.models import Job


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
