"""Index sync and retrieve on demand against two real Orthanc archives: one by DICOMweb, one by
DIMSE only. The broker indexes both without pulling pixels, answers one federation-wide query
over both, keeps up with changes at the facilities, and fetches studies from both on demand."""

from __future__ import annotations

import io
import threading
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlmodel import Session, select

from broker.app import create_app
from broker.deps import AppState
from broker.errors import Unavailable
from broker.facilities import service as facilities
from broker.federation import fetch as fetch_module
from broker.federation import service
from broker.federation.sync import run_sync
from broker.index.models import Instance, Series, Study, StudyLocation
from broker.index.schemas import Query
from broker.index.service import search, study_locations
from broker.jobs import service as jobs
from broker.peers import archive as remote
from tests.federation.conftest import (
    DIMSE_FILES,
    TEST_FILES,
    WEB_FILES,
    Archives,
    delete_series,
    delete_study,
    study_uid_of,
    upload,
)
from tests.peers import free_port
from tests.support import ADMIN, auth_headers, to_bytes

WEB_STUDIES = {study_uid_of(n) for n in WEB_FILES}
DIMSE_STUDIES = {study_uid_of(n) for n in DIMSE_FILES}


def _sync(state: AppState, facility_id: str) -> service.SyncResult:
    return service.sync_facility(engine=state.engine, store=state.store, facility_id=facility_id)


def _studies(state: AppState, **filters: str) -> dict[str, dict]:
    with Session(state.engine) as session:
        result = search(session=session, query=Query(level="study", filters=dict(filters), limit=1000))
    return {m["0020000D"]["Value"][0]: m for m in result.matches}


def test_sync_both_archives_then_one_query_answers_over_both(federated: AppState) -> None:
    seen: list[tuple[int, int | None]] = []
    web = service.sync_facility(
        engine=federated.engine,
        store=federated.store,
        facility_id="web",
        progress=lambda done, total, _msg: seen.append((done, total)),
    )
    dimse = _sync(federated, "dimse")
    assert (web.studies_seen, web.studies_written, dimse.studies_seen, dimse.studies_written) == (2, 2, 2, 2)
    assert seen[-1] == (2, 2)  # the progress bar ends full

    # One federation-wide query, one answer over both facilities' archives.
    matches = _studies(federated)
    assert set(matches) == WEB_STUDIES | DIMSE_STUDIES
    ct = matches[study_uid_of("CT_small.dcm")]
    assert ct["00100020"]["Value"] == ["1CT1"]
    assert ct["00100021"]["Value"] == ["WEBHOSP"]  # qualified by the holding facility's issuer
    assert ct["00201208"]["Value"] == [1] and ct["00080061"]["Value"] == ["CT"]
    # The same matching rules apply to synced rows: a modality found only at the DIMSE archive.
    assert set(_studies(federated, ModalitiesInStudy="RTPLAN")) == {study_uid_of("rtplan.dcm")}

    with Session(federated.engine) as session:
        locations = session.exec(select(StudyLocation)).all()
        assert {(loc.study_uid, loc.facility_id) for loc in locations} == {
            *((u, "web") for u in WEB_STUDIES),
            *((u, "dimse") for u in DIMSE_STUDIES),
        }
        assert not any(loc.has_pixels for loc in locations)
        # Index only: no instance rows, nothing in the object store.
        assert session.exec(select(Instance)).first() is None
        assert service.is_remote_only(session=session, study_uid=study_uid_of("MR_small.dcm"))
    assert list(federated.store.list()) == []

    # The sync is a job, with its progress at /api/jobs/{id}.
    client = TestClient(create_app(state=federated), headers=auth_headers())
    job = client.get(f"/api/jobs/{web.job_id}").json()
    assert (job["kind"], job["key"], job["status"]) == ("sync", "web", "done")
    assert (job["progress_done"], job["progress_total"]) == (2, 2)
    facility = client.get("/api/facilities/dimse").json()
    assert facility["sync"]["last_status"] == "done" and facility["sync"]["studies_at_facility"] == 2


def test_sync_is_incremental_and_follows_additions_changes_and_deletions(
    federated: AppState, archives: Archives
) -> None:
    assert _sync(federated, "web").studies_written == 2
    # Nothing changed at the facility: nothing is written again.
    again = _sync(federated, "web")
    assert (again.studies_seen, again.studies_written, again.studies_removed) == (2, 0, 0)

    # A new study, and a new series in an existing study, appear at the facility.
    new = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    new.StudyInstanceUID, new.SeriesInstanceUID, new.SOPInstanceUID = (generate_uid() for _ in range(3))
    new.PatientID = "NEW-PATIENT"
    extra = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    extra.SeriesInstanceUID, extra.SOPInstanceUID = generate_uid(), generate_uid()
    extra.Modality = "PT"
    try:
        upload(archives.web, to_bytes(new))
        upload(archives.web, to_bytes(extra))
        changed = _sync(federated, "web")
        assert (changed.studies_seen, changed.studies_written, changed.studies_removed) == (3, 2, 0)
        matches = _studies(federated)
        assert new.StudyInstanceUID in matches
        ct = matches[study_uid_of("CT_small.dcm")]
        assert ct["00201206"]["Value"] == [2] and ct["00201208"]["Value"] == [2]
        assert sorted(ct["00080061"]["Value"]) == ["CT", "PT"]

        # Deleted at the facility: gone from the index, series and all.
        delete_study(archives.web, new.StudyInstanceUID)
        delete_series(archives.web, extra.SeriesInstanceUID)
        gone = _sync(federated, "web")
        assert (gone.studies_seen, gone.studies_written, gone.studies_removed) == (2, 1, 1)
        matches = _studies(federated)
        assert new.StudyInstanceUID not in matches
        assert matches[study_uid_of("CT_small.dcm")]["00201206"]["Value"] == [1]
        with Session(federated.engine) as session:
            assert (
                session.exec(select(Series).where(Series.series_uid == extra.SeriesInstanceUID)).first()
                is None
            )
    finally:
        delete_study(archives.web, new.StudyInstanceUID)
        delete_series(archives.web, extra.SeriesInstanceUID)


def test_interrupted_sync_resumes_from_its_checkpoint(federated: AppState) -> None:
    job = jobs.enqueue(engine=federated.engine, kind="sync", key="dimse", params={"facility_id": "dimse"})
    assert job.id is not None
    claimed = jobs.claim(engine=federated.engine, job_id=job.id, owner="worker-that-dies")
    assert claimed is not None

    class WorkerDied(Exception):
        pass

    def die_after_first_page(done: int, _total: int | None, _msg: str) -> None:
        if done >= 1:
            raise WorkerDied

    progress = jobs.Progress(engine=federated.engine, job_id=job.id, listener=die_after_first_page)
    with pytest.raises(WorkerDied):
        run_sync(engine=federated.engine, job=claimed, progress=progress, chunk=1)
    assert len(_studies(federated)) == 1  # the first page was committed before the crash

    # Its heartbeat goes stale; another worker claims the same job and finishes it.
    assert jobs.claim(engine=federated.engine, owner="other") is None  # not stale yet
    again = jobs.claim(engine=federated.engine, owner="other", stale_after=timedelta(0))
    assert again is not None and again.id == job.id and again.attempts == 2
    assert jobs.checkpoint_of(again)["written"] == 1
    stats = run_sync(
        engine=federated.engine,
        job=again,
        progress=jobs.Progress(engine=federated.engine, job_id=job.id),
        chunk=1,
    )
    # The resumed run wrote only what the first attempt had not: two studies written in total.
    assert stats["written"] == 2
    assert set(_studies(federated)) == DIMSE_STUDIES


def test_retrieve_on_demand_from_both_archives_fetches_each_study_once(
    federated: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sync(federated, "web")
    _sync(federated, "dimse")
    calls: list[str] = []
    real = remote.wado_retrieve_study

    def counting(**kwargs: object) -> list[str]:
        calls.append(str(kwargs["study_uid"]))
        return real(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(remote, "wado_retrieve_study", counting)

    mr = study_uid_of("MR_small.dcm")  # at the DICOMweb archive: WADO-RS
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            service.ensure_local(engine=federated.engine, store=federated.store, study_uid=mr)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and calls == [mr]  # four concurrent requests, one fetch
    assert fetch_module._locks == {}  # nothing left behind per study

    rtplan = study_uid_of("rtplan.dcm")  # at the DIMSE-only archive: C-GET
    service.ensure_local(engine=federated.engine, store=federated.store, study_uid=rtplan)

    original = {
        mr: (TEST_FILES / "MR_small.dcm").read_bytes(),
        rtplan: (TEST_FILES / "rtplan.dcm").read_bytes(),
    }
    with Session(federated.engine) as session:
        for uid in (mr, rtplan):
            study = session.exec(select(Study).where(Study.study_uid == uid)).one()
            instances = session.exec(select(Instance).where(Instance.study_pk == study.pk)).all()
            assert len(instances) == 1 and study.num_instances == 1 and study.num_series == 1
            assert not service.is_remote_only(session=session, study_uid=uid)
            stored = b"".join(federated.store.get(instances[0].object_key))
            # What the facility holds arrived intact: every attribute, pixels included.
            assert pydicom.dcmread(io.BytesIO(stored)) == pydicom.dcmread(io.BytesIO(original[uid]))
    matches = _studies(federated)
    assert matches[mr]["00080056"]["Value"] == ["ONLINE"]
    assert matches[mr]["00201208"]["Value"] == [1]  # counted once, not remote + local

    # Fetching again is free: the broker holds it.
    service.ensure_local(engine=federated.engine, store=federated.store, study_uid=mr)
    assert calls == [mr]


def test_a_facility_that_is_down_is_named_and_the_rest_keeps_answering(federated: AppState) -> None:
    _sync(federated, "web")
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    with Session(federated.engine) as session:
        facilities.add_facility(
            session=session, principal=ADMIN, facility_id="gone", issuer="GONE", dicomweb_url=dead
        )
        facilities.update_facility(session=session, principal=ADMIN, facility_id="web", dicomweb_url=dead)

    with pytest.raises(Unavailable, match="'gone'"):
        _sync(federated, "gone")
    with pytest.raises(Unavailable, match="'web'"):
        service.ensure_local(
            engine=federated.engine, store=federated.store, study_uid=study_uid_of("CT_small.dcm")
        )

    # The failure is recorded where an administrator looks, and the index still answers.
    client = TestClient(create_app(state=federated), headers=auth_headers())
    failed = client.get("/api/jobs", params={"kind": "sync", "status": "failed"}).json()
    assert [j["key"] for j in failed] == ["gone"] and "'gone'" in failed[0]["error"]
    assert client.get("/api/facilities/gone").json()["sync"]["last_status"] == "failed"
    assert set(_studies(federated)) == WEB_STUDIES


def test_sync_queued_by_the_api_is_run_by_the_worker_and_the_schedule_requeues_it(
    federated: AppState,
) -> None:
    client = TestClient(create_app(state=federated), headers=auth_headers())
    r = client.post("/api/facilities/dimse/sync")
    assert r.status_code == 202
    job_id = r.json()["job_id"]
    assert client.post("/api/facilities/dimse/sync").json()["job_id"] == job_id  # not queued twice
    assert jobs.work(engine=federated.engine, store=federated.store, once=True) == 1
    assert client.get(f"/api/jobs/{job_id}").json()["status"] == "done"
    assert set(_studies(federated)) == DIMSE_STUDIES

    # The periodic schedule: dimse synced just now is not due; web never synced is.
    queued = service.queue_due_syncs(engine=federated.engine, interval_seconds=3600)
    assert [client.get(f"/api/jobs/{j}").json()["key"] for j in queued] == ["web"]
    # At interval 0 every facility is due; web's queued job comes back, it is not doubled.
    due = service.queue_due_syncs(engine=federated.engine, interval_seconds=0)
    assert len(due) == 2 and set(queued) < set(due)
    assert sorted(client.get(f"/api/jobs/{j}").json()["key"] for j in due) == ["dimse", "web"]


def test_cli_sync_and_fetch_against_the_archives(archives: Archives, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from broker.cli import app

    runner = CliRunner()
    data = ["--data-dir", str(tmp_path)]

    def run(*args: str) -> str:
        result = runner.invoke(app, [*args, *data], catch_exceptions=False, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        return result.output

    run("facility", "add", "web", "--issuer", "WEB", "--dicomweb", archives.web.dicomweb_url)
    run(
        "facility", "add", "dimse", "--issuer", "DIMSE", "--ae", archives.dimse.aet,
        "--host", archives.dimse.host, "--port", str(archives.dimse.dicom_port),
    )  # fmt: skip
    out = run("sync", "web")
    assert "2 studies at web, 2 new or changed, 0 removed" in out
    assert "2 studies at dimse, 2 new or changed" in run("sync", "dimse")
    assert "not fetched" in run("facility", "show", "dimse")
    uid = study_uid_of("rtdose.dcm")
    assert f"study {uid} is held by the broker" in run("fetch", uid)
    missing = runner.invoke(app, ["fetch", "1.2.3.4", *data])
    assert missing.exit_code == 1 and "no such study" in missing.output


def test_a_fetched_study_deleted_at_the_facility_stays_served_by_the_broker(
    federated: AppState, archives: Archives
) -> None:
    mr = study_uid_of("MR_small.dcm")
    _sync(federated, "web")
    service.ensure_local(engine=federated.engine, store=federated.store, study_uid=mr)
    try:
        delete_study(archives.web, mr)
        result = _sync(federated, "web")
        assert (result.studies_seen, result.studies_removed) == (1, 1)
        # No longer held at the facility, but the broker has every instance: still found, ONLINE.
        matches = _studies(federated)
        assert set(matches) == WEB_STUDIES and matches[mr]["00080056"]["Value"] == ["ONLINE"]
        with Session(federated.engine) as session:
            assert study_locations(session=session, study_uids=[mr]) == {}
            assert not service.is_remote_only(session=session, study_uid=mr)
    finally:
        upload(archives.web, (TEST_FILES / "MR_small.dcm").read_bytes())


def test_sharing_policy_none_and_dead_dimse_endpoints_are_refused_clearly(federated: AppState) -> None:
    client = TestClient(create_app(state=federated), headers=auth_headers())
    port = free_port()
    r = client.post(
        "/api/facilities",
        json={"id": "closed", "issuer": "CLOSED", "ae_title": "CLOSED", "host": "127.0.0.1", "port": port},
    )
    assert r.status_code == 201
    with pytest.raises(Unavailable, match="'closed'"):
        _sync(federated, "closed")
    client.patch("/api/facilities/closed", json={"sharing_policy": "none"})
    r = client.post("/api/facilities/closed/sync")
    assert r.status_code == 400 and "shares nothing" in r.json()["detail"]
    assert client.post("/api/facilities/local/sync").status_code == 400  # no archive endpoint


def test_incremental_sync_by_c_find_alone(federated: AppState, archives: Archives) -> None:
    assert _sync(federated, "dimse").studies_written == 2
    assert _sync(federated, "dimse").studies_written == 0  # STUDY-level counts unchanged
    new = pydicom.dcmread(TEST_FILES / "rtplan.dcm")
    new.StudyInstanceUID, new.SeriesInstanceUID, new.SOPInstanceUID = (generate_uid() for _ in range(3))
    try:
        upload(archives.dimse, to_bytes(new))
        added = _sync(federated, "dimse")  # SERIES level asked for the new study only
        assert (added.studies_seen, added.studies_written, added.studies_removed) == (3, 1, 0)
        assert _studies(federated)[new.StudyInstanceUID]["00080061"]["Value"] == ["RTPLAN"]
        delete_study(archives.dimse, new.StudyInstanceUID)
        removed = _sync(federated, "dimse")
        assert (removed.studies_seen, removed.studies_written, removed.studies_removed) == (2, 0, 1)
        assert set(_studies(federated)) == DIMSE_STUDIES
    finally:
        delete_study(archives.dimse, new.StudyInstanceUID)


def test_a_viewer_asking_wado_rs_for_a_synced_study_gets_it_fetched_on_demand(federated: AppState) -> None:
    """Pixels stay at home until someone needs them: QIDO-RS says NEARLINE, and the first
    WADO-RS request fetches the study from its facility and serves it."""
    _sync(federated, "web")
    mr = study_uid_of("MR_small.dcm")
    client = TestClient(create_app(state=federated), headers=auth_headers())
    (before,) = client.get("/dicom-web/studies", params={"StudyInstanceUID": mr}).json()
    assert before["00080056"]["Value"] == ["NEARLINE"]

    meta = client.get(f"/dicom-web/studies/{mr}/metadata", headers={"Accept": "application/dicom+json"})
    assert meta.status_code == 200, meta.text
    assert meta.json()[0]["0020000D"]["Value"] == [mr]
    (after,) = client.get("/dicom-web/studies", params={"StudyInstanceUID": mr}).json()
    assert after["00080056"]["Value"] == ["ONLINE"]
    sop = meta.json()[0]["00080018"]["Value"][0]
    series = meta.json()[0]["0020000E"]["Value"][0]
    frame = client.get(
        f"/dicom-web/studies/{mr}/series/{series}/instances/{sop}/frames/1",
        headers={"Accept": 'multipart/related; type="application/octet-stream"'},
    )
    assert frame.status_code == 200 and len(frame.content) > 64 * 64

    # A study nobody holds is still a plain 404.
    missing = client.get(
        "/dicom-web/studies/1.2.3.4.5.6/metadata", headers={"Accept": "application/dicom+json"}
    )
    assert missing.status_code == 404
