"""`scanonce verify`: instances whose object is missing or changed, objects no row names, and
`--repair`, on both backends (SQLite + folder, PostgreSQL + S3 over HTTP)."""

from __future__ import annotations

import hashlib
import io
import socket
from pathlib import Path

from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlmodel import Session, col, select
from typer.testing import CliRunner

from broker.app import build_state, create_app
from broker.cli import app as cli
from broker.deps import AppState
from broker.index import verify as integrity
from broker.index.keys import instance_key
from broker.index.models import Instance, IntegrityFinding
from broker.index.service import ingest_files
from broker.jobs import service as jobs
from broker.settings import Settings
from tests.support import ADMIN, auth_headers, make_ds, to_bytes, write

runner = CliRunner()


def _ingest(state: AppState, tmp_path: Path, n: int) -> list[Instance]:
    study = generate_uid()
    paths = [
        write(tmp_path, f"i{i}.dcm", make_ds(sop=generate_uid(), study=study, series=generate_uid()))
        for i in range(n)
    ]
    outcomes = ingest_files(
        engine=state.engine,
        store=state.store,
        principal=ADMIN,
        facility_id="local",
        paths=paths,
    )
    assert [o.status for o in outcomes] == ["stored"] * n
    with Session(state.engine) as session:
        return list(session.exec(select(Instance).order_by(col(Instance.pk))))


def _orphan(store: object) -> str:
    """A whole, parseable instance in the store that no row names (its row was lost)."""
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    data = to_bytes(make_ds(sop=sop, study=study, series=series))
    # Where ingest would have put it: the key is content-addressed.
    key = instance_key(hashlib.sha256(data).hexdigest())
    store.put(key, io.BytesIO(data))  # type: ignore[attr-defined]
    return key


def test_verify_finds_missing_changed_and_orphaned_and_repairs(settings: Settings, tmp_path: Path) -> None:
    state = build_state(settings)
    store = state.store
    rows = _ingest(state, tmp_path, 4)
    clean = integrity.verify(engine=state.engine, store=store, min_age=0)
    assert (clean.checked, clean.ok, clean.clean) == (4, 4, True)

    store.delete(rows[0].object_key)  # lost
    store.put(rows[1].object_key, io.BytesIO(b"not what was stored"))  # changed
    orphan = _orphan(store)
    # Not DICOM, where earlier releases put instances: that layout is walked too.
    junk = "studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5/" + "0" * 64 + ".dcm"
    store.put(junk, io.BytesIO(b"no DICOM here"))

    # Young objects may be an ingest committing its row: not orphans yet.
    young = integrity.verify(engine=state.engine, store=store, min_age=3600)
    assert (young.missing, young.mismatch, young.orphans) == (1, 1, 0)

    found = integrity.verify(engine=state.engine, store=store, min_age=0)
    assert (found.checked, found.ok, found.missing, found.mismatch, found.orphans) == (4, 2, 1, 1, 2)
    assert found.examples["missing"] == [rows[0].object_key]
    assert found.examples["mismatch"] == [rows[1].object_key]
    assert sorted(found.examples["orphan"]) == sorted([orphan, junk])
    assert not found.clean
    with Session(state.engine) as session:
        assert session.exec(select(IntegrityFinding)).all() == []  # without --repair nothing changes

    # A facility's own check: its instances only, no orphan walk.
    scoped = integrity.verify(engine=state.engine, store=store, facility="local", min_age=0)
    assert (scoped.checked, scoped.orphans_walked) == (4, False)
    # A sample checks that many.
    assert integrity.verify(engine=state.engine, store=store, facility="local", sample=2).checked == 2

    repaired = integrity.verify(engine=state.engine, store=store, min_age=0, repair=True)
    assert (repaired.reindexed, repaired.unparseable, repaired.marked) == (1, 1, 2)
    with Session(state.engine) as session:
        findings = {(f.kind, f.object_key) for f in session.exec(select(IntegrityFinding))}
        assert findings == {("missing", rows[0].object_key), ("mismatch", rows[1].object_key)}
        assert session.exec(select(Instance).where(Instance.object_key == orphan)).first() is not None
    assert {o.key for o in store.list()} >= {orphan, junk}  # nothing deleted

    # Again: the orphan is indexed now; the findings are not duplicated.
    again = integrity.verify(engine=state.engine, store=store, min_age=0, repair=True)
    assert (again.checked, again.orphans, again.reindexed, again.unparseable) == (5, 1, 0, 1)
    with Session(state.engine) as session:
        assert len(session.exec(select(IntegrityFinding)).all()) == 2
    state.engine.dispose()


def test_verify_cli_job_and_api(settings: Settings, tmp_path: Path) -> None:
    state = build_state(settings)
    rows = _ingest(state, tmp_path, 2)
    env = {
        "SCANONCE_DATA_DIR": str(settings.data_dir),
        "SCANONCE_DATABASE_URL": settings.resolved_database_url(),
        "SCANONCE_STORAGE_URL": settings.resolved_storage_url(),
    }
    ok = runner.invoke(cli, ["verify", "--min-age", "0"], env=env)
    assert ok.exit_code == 0, ok.output
    assert "2 checked: 2 ok, 0 missing, 0 mismatched; 0 orphaned objects" in " ".join(ok.output.split())
    # After --repair an orphan it cannot index again (not DICOM) is still unresolved: exit 1.
    junk = "dcm/00/" + "0" * 64 + ".dcm"
    state.store.put(junk, io.BytesIO(b"no DICOM here"))
    repaired = runner.invoke(cli, ["verify", "--min-age", "0", "--repair"], env=env)
    assert repaired.exit_code == 1 and "1 orphans not DICOM" in " ".join(repaired.output.split())
    state.store.delete(junk)

    state.store.delete(rows[1].object_key)
    bad = runner.invoke(cli, ["verify", "--min-age", "0"], env=env)
    assert bad.exit_code == 1
    assert f"missing: {rows[1].object_key}" in " ".join(bad.output.split())

    queued = runner.invoke(cli, ["verify", "--job", "--repair"], env=env)
    assert queued.exit_code == 0 and "queued job" in queued.output
    client = TestClient(create_app(state=state), headers=auth_headers())
    r = client.post("/api/verify", json={"facility": "local"})
    assert r.status_code == 202, r.text
    assert r.headers["Location"] == f"/api/jobs/{r.json()['id']}"
    assert client.post("/api/verify", json={"sample": 0}).status_code == 400  # bad input, nothing queued
    assert jobs.work(engine=state.engine, store=state.store, once=True, kinds=("verify",)) == 2
    done = client.get("/api/jobs", params={"kind": "verify"}).json()
    assert [j["status"] for j in done] == ["done", "done"]
    repaired = done[1]  # the older: the whole-store check with --repair
    assert repaired["message"].startswith("2 checked: 1 ok, 1 missing") and "1 marked" in repaired["message"]
    assert done[0]["message"] == "2 checked: 1 ok, 1 missing, 0 mismatched"  # no orphan walk, no repair
    with Session(state.engine) as session:
        assert [f.object_key for f in session.exec(select(IntegrityFinding))] == [rows[1].object_key]
    state.engine.dispose()


def test_a_resent_instance_restores_what_verify_found_missing_or_changed(
    settings: Settings, tmp_path: Path
) -> None:
    # What production.md tells an operator: `verify --repair`, then ask the facility to send again.
    state = build_state(settings)
    store = state.store
    rows = _ingest(state, tmp_path, 3)
    sent = {r.sop_uid: tmp_path / f"i{i}.dcm" for i, r in enumerate(rows)}
    store.delete(rows[0].object_key)
    store.put(rows[1].object_key, io.BytesIO(b"not what was stored"))
    marked = integrity.verify(engine=state.engine, store=store, min_age=0, repair=True)
    assert (marked.missing, marked.mismatch, marked.marked) == (1, 1, 2)
    # Before the findings, a re-send changed nothing; now it stores the object again, as the
    # duplicate it is (nothing re-indexed). The third, whole instance is untouched.
    outcomes = ingest_files(
        engine=state.engine,
        store=store,
        principal=ADMIN,
        facility_id="local",
        paths=[str(sent[r.sop_uid]) for r in rows],
    )
    assert [o.status for o in outcomes] == ["duplicate"] * 3
    assert [o.message for o in outcomes][:2] == ["already indexed; its object was restored"] * 2
    for r in rows:
        stored = b"".join(store.get(r.object_key))
        assert stored == sent[r.sop_uid].read_bytes()
        assert hashlib.sha256(stored).hexdigest() == r.sha256
    with Session(state.engine) as session:
        findings = session.exec(select(IntegrityFinding)).all()
        assert len(findings) == 2 and all(f.resolved_at is not None for f in findings)
        assert len(session.exec(select(Instance)).all()) == 3
    assert integrity.verify(engine=state.engine, store=store, min_age=0).clean
    state.engine.dispose()


def test_verify_names_the_store_setting_when_the_bucket_is_missing_or_unreachable(
    tmp_path: Path, moto_server: str, s3_bucket: str
) -> None:
    """An operator's `scanonce verify` against a bucket that does not exist (a typo, another
    account's) or an endpoint that is down: one line naming SCANONCE_STORAGE_URL, exit 1."""
    env = {
        "SCANONCE_DATA_DIR": str(tmp_path / "data"),
        "SCANONCE_STORAGE_URL": f"s3://{s3_bucket}?endpoint_url={moto_server}&create_bucket=true",
    }
    state = build_state(Settings(data_dir=tmp_path / "data", storage_url=env["SCANONCE_STORAGE_URL"]))
    _ingest(state, tmp_path, 2)  # rows whose objects verify reads, besides the orphan walk
    state.engine.dispose()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    for url, why in (
        (f"s3://{s3_bucket}-missing?endpoint_url={moto_server}", "NoSuchBucket"),
        (
            f"s3://{s3_bucket}?endpoint_url=http://127.0.0.1:{closed}&connect_timeout=1&retries=0",
            "unreachable",
        ),
    ):
        result = runner.invoke(cli, ["verify", "--min-age", "0"], env={**env, "SCANONCE_STORAGE_URL": url})
        assert result.exit_code == 1, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        said = " ".join(result.output.split())
        assert "SCANONCE_STORAGE_URL" in said and why in said, said
