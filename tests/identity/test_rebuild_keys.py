"""Rebuilding blocking keys: records stored under an older `block_keys` become candidates again."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from typer.testing import CliRunner

from broker.cli import app as scanonce
from broker.db import make_engine
from broker.identity import matching, service
from broker.identity.decisions import candidates
from broker.identity.models import BlockKey
from broker.identity.schemas import Identifier
from broker.jobs import service as jobs
from broker.jobs.models import Job

from .conftest import cli_index, ingest_patient

# A day typo and a typo in each name: only the birth-month + initials key ("di:", new in
# version 2) is shared, so under the old keys the two never meet.
OLD = ("GILLARD^JAKE", "19590828", "M", "12 Banksia Street Bowral 2576")
TYPO = matching.demographics(
    family="GILLATD", given="JAKD", birth_date="19590808", sex="M", address="12 Banksia Street Bowral 2576"
)


def _downgrade_keys(session: Session) -> None:
    """What an index written before version 2 looks like: no keys of the kinds it added."""
    session.execute(
        text("DELETE FROM identity_block WHERE key LIKE 'di:%' OR key LIKE 'sb:%' OR key LIKE 'st:%'")
    )
    # ...and a kind it no longer makes.
    session.execute(
        text("INSERT INTO identity_block (key, record_id) SELECT 'old:' || id, id FROM identity_record")
    )
    session.execute(text("DELETE FROM identity_setting"))
    session.commit()


def _keys(session: Session) -> set[tuple[str, int]]:
    return {(k, r) for k, r in session.exec(select(BlockKey.key, BlockKey.record_id)).all()}


def _candidate_ids(session: Session) -> set[int]:
    rows, _ = candidates(session=session, d=TYPO, exclude=None)
    session.rollback()
    return {r.id for r in rows}


def _fill(session: Session, n: int = 12) -> int:
    old = ingest_patient(session, "fac-a", "A-OLD", *OLD)
    for i in range(n):
        ingest_patient(
            session,
            "fac-b",
            f"B{i}",
            f"SMITH^ANNA{i:02d}",
            f"19{40 + i}0101",
            "F",
            f"{i} Long Road Dubbo 2830",
        )
    rec = service.get_record(session=session, issuer="ISSUER-A", value=old.patient_id)
    assert rec is not None and rec.id is not None
    return rec.id


def test_old_keys_rebuilt_by_the_startup_job_and_a_second_run_changes_nothing(
    engine: Engine, session: Session
) -> None:
    old_id = _fill(session)
    full = _keys(session)
    _downgrade_keys(session)
    assert old_id not in _candidate_ids(session), "the simulated old keys should hide the record"

    job = service.ensure_keys_current(engine=engine)
    assert job is not None and job.kind == service.KEYS_JOB
    assert service.ensure_keys_current(engine=engine).id == job.id  # type: ignore[union-attr]
    assert jobs.work(engine=engine, store=None, once=True) == 1
    with Session(engine) as s:
        done = s.get(Job, job.id)
        assert done is not None, "the job is gone"
        assert done.status == "done", done.error
        assert done.progress_done == done.progress_total == 13

    assert old_id in _candidate_ids(session)
    assert _keys(session) == full
    assert service.keys_version(session=session) == matching.KEYS_VERSION
    assert service.ensure_keys_current(engine=engine) is None
    assert done.message.startswith("13 records, 13 with changed keys") and "-13 keys" in done.message

    again = service.rebuild_keys(session=session, batch=5)
    assert (again.records, again.changed, again.keys_added, again.keys_removed) == (13, 0, 0, 0)
    assert _keys(session) == full

    # What a user sees: the typo'd record is now weighed against the old one, not made a new person.
    decision = service.upsert_record(
        session=session, identifier=Identifier("ISSUER-B", "B-NEW"), demographics=TYPO
    )
    assert decision.outcome != "new"
    if decision.outcome == "review":
        assert old_id in {i.candidate_record_id for i in service.review_queue(session=session)}
    else:
        assert decision.matched_record_id == old_id


def test_an_interrupted_rebuild_resumes_after_its_last_batch(session: Session) -> None:
    old_id = _fill(session)
    full = _keys(session)
    _downgrade_keys(session)

    class Stop(Exception):
        pass

    def stop_after_two(done: int, total: int) -> None:
        if done >= 4:
            raise Stop

    with pytest.raises(Stop):
        service.rebuild_keys(session=session, batch=2, progress=stop_after_two)
    session.rollback()
    assert service.keys_version(session=session) == 0
    seen: list[tuple[int, int]] = []
    rest = service.rebuild_keys(session=session, batch=2, progress=lambda d, t: seen.append((d, t)))
    assert rest.records == 13 - 4, "resumed after the two committed batches"
    assert seen[0] == (4, 13) and seen[-1] == (13, 13)
    assert _keys(session) == full and old_id in _candidate_ids(session)


def test_empty_index_is_current_at_once(engine: Engine, session: Session) -> None:
    assert service.keys_version(session=session) == matching.KEYS_VERSION  # set by the migration
    session.execute(text("DELETE FROM identity_setting"))  # as if migrated by older code
    session.commit()
    assert service.keys_version(session=session) == 0
    assert service.ensure_keys_current(engine=engine) is None
    assert service.keys_version(session=session) == matching.KEYS_VERSION
    with Session(engine) as s:
        assert s.exec(select(Job)).all() == []


def test_bad_batch_is_refused(session: Session) -> None:
    from broker.errors import BadRequest

    with pytest.raises(BadRequest):
        service.rebuild_keys(session=session, batch=0)


def test_rebuild_keys_command(tmp_path: Path) -> None:
    engine = cli_index(tmp_path)
    with Session(engine) as s:
        old_id = _fill(s, n=3)
        _downgrade_keys(s)
    engine.dispose()
    run = CliRunner().invoke
    r = run(scanonce, ["identity", "rebuild-keys", "--data-dir", str(tmp_path), "--batch", "2"])
    assert r.exit_code == 0, r.output
    assert "4 records, 4 with changed keys" in r.output
    r = run(scanonce, ["identity", "rebuild-keys", "--data-dir", str(tmp_path)])
    assert r.exit_code == 0 and "4 records, 0 with changed keys" in r.output, r.output
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    with Session(engine) as s:
        assert old_id in _candidate_ids(s)
    engine.dispose()
    r = run(scanonce, ["identity", "rebuild-keys", "--data-dir", str(tmp_path), "--batch", "0"])
    assert r.exit_code == 1 and "batch" in r.output


def test_a_record_relinked_during_a_batch_keeps_the_keys_of_its_new_demographics(
    engine: Engine, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A feed updates a record after the batch read it and before the batch writes: the batch
    must not add keys computed from the demographics it read."""
    old_id = _fill(session, n=3)
    _downgrade_keys(session)
    moved = matching.demographics(
        family="LINDQVIST", given="ELSA", birth_date="19920412", sex="F", address="3 Fjord Road Umea 90326"
    )
    real = matching.block_keys
    fed = threading.Event()

    def block_keys_with_a_feed_in_between(d: matching.Demographics) -> set[str]:
        if not fed.is_set():
            fed.set()
            with Session(engine) as other:  # another connection, as a concurrent feed
                service.upsert_record(
                    session=other,
                    identifier=Identifier("ISSUER-A", "A-OLD"),
                    demographics=moved,
                    source="hl7",
                )
                other.commit()
        return real(d)

    monkeypatch.setattr(service.matching, "block_keys", block_keys_with_a_feed_in_between)
    result = service.rebuild_keys(session=session, batch=100)
    assert fed.is_set() and result.records == 4
    monkeypatch.setattr(service.matching, "block_keys", real)
    stored = {k for k, r in _keys(session) if r == old_id}
    assert stored == matching.block_keys(moved)
