"""Importing an outside study into a real PACS (Orthanc) with the PACS's identifiers."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlmodel import Session
from typer.testing import CliRunner

from broker.app import create_app
from broker.cli import app as scanonce
from broker.deps import AppState
from broker.imports import delivery, service
from broker.imports.models import ImportInstance, ImportJob
from broker.jobs import service as jobs
from broker.settings import Settings
from tests.imports.conftest import (
    LOCAL_MRN,
    MINE,
    MINE_ISSUER,
    OUTSIDE_ISSUER,
    Outside,
    add_destination,
    ingest_outside,
    pacs_clear,
    pacs_instances,
    pacs_upload,
    part10,
    register_local_patient,
)
from tests.peers import OrthancPeer
from tests.support import ADMIN, auth_headers, make_ds


@pytest.fixture
def outside(state: AppState, pacs: OrthancPeer, tmp_path: Path) -> Outside:
    pacs_clear(pacs)
    add_destination(state, pacs)
    study = ingest_outside(state, tmp_path)
    register_local_patient(state)
    return study


@pytest.fixture
def client(settings: Settings, state: AppState) -> Iterator[TestClient]:
    with TestClient(create_app(settings=settings, state=state)) as c:
        yield c


def _run(state: AppState, import_id: int) -> ImportJob:
    return service.run_now(engine=state.engine, store=state.store, import_id=import_id)


def _start(state: AppState, study: Outside, **kw: str) -> ImportJob:
    row = service.start_import(
        engine=state.engine, principal=ADMIN, study_uid=study.study_uid, facility_id=MINE, **kw
    )
    assert row.id is not None
    return row


def _spy_listing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The study UIDs whose every instance the verification asked the destination to list."""
    listed: list[str] = []
    real = delivery.held_instances

    def held_instances(**kw: Any) -> set[str]:
        listed.append(kw["study_uid"])
        return real(**kw)

    monkeypatch.setattr(delivery, "held_instances", held_instances)
    return listed


@pytest.mark.parametrize("via", ["dimse", "dicomweb"])
def test_import_coerces_identifiers_and_keeps_the_originals(
    state: AppState, pacs: OrthancPeer, outside: Outside, via: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed = _spy_listing(monkeypatch)
    row = _start(state, outside, via=via)
    final = _run(state, row.id or 0)
    assert (final.status, final.sent, final.failed, final.verified) == ("done", 5, 0, 5), final.message
    # The PACS held nothing of the study before: its count per series verified it, no listing.
    assert listed == []
    held = {str(d.SOPInstanceUID): d for d in pacs_instances(pacs)}
    assert set(held) == set(outside.files)  # no clash at the PACS: every UID kept
    for sop, ds in held.items():
        assert ds.PatientID == LOCAL_MRN
        assert ds.IssuerOfPatientID == MINE_ISSUER
        assert str(ds.PatientName) == "SMITH^ANNA^JANE"
        assert (ds.PatientBirthDate, ds.PatientSex) == ("19800101", "M")
        assert ds.StudyInstanceUID == outside.study_uid
        assert ds.AccessionNumber == "OUT-77"  # policy "keep", with the outside issuer
        assert ds.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID == OUTSIDE_ISSUER
        others = [(o.PatientID, o.IssuerOfPatientID) for o in ds.OtherPatientIDsSequence]
        assert ("P1", OUTSIDE_ISSUER) in others
        original = ds.OriginalAttributesSequence[-1]
        assert original.ReasonForTheAttributeModification == "COERCE"
        assert original.ModifyingSystem == "SCANONCE"
        assert original.SourceOfPreviousValues == OUTSIDE_ISSUER
        assert original.AttributeModificationDateTime
        before = original.ModifiedAttributesSequence[0]
        assert (before.PatientID, before.IssuerOfPatientID, str(before.PatientName)) == (
            "P1", OUTSIDE_ISSUER, "SMITH^ANNA",
        )  # fmt: skip
        if sop != outside.sr_uid:
            source = pydicom_of(outside.files[sop])
            assert ds.PixelData == source.PixelData  # pixels byte-identical
    with Session(state.engine) as session:
        rows = service.instances_of(session=session, import_id=row.id or 0)
    assert {r.status for r in rows} == {"sent"} and all(r.code == 0 for r in rows)


def pydicom_of(data: bytes) -> Any:
    import io

    import pydicom

    return pydicom.dcmread(io.BytesIO(data))


def test_new_accession_policy(state: AppState, pacs: OrthancPeer, outside: Outside) -> None:
    final = _run(state, _start(state, outside, accession_policy="new").id or 0)
    assert final.status == "done", final.message
    accessions = {d.AccessionNumber for d in pacs_instances(pacs)}
    assert len(accessions) == 1 and accessions != {"OUT-77"} and accessions != {""}
    pacs_clear(pacs)  # Orthanc keeps what it holds under a UID (OverwriteInstances is off)
    final = _run(state, _start(state, outside, accession_policy="empty").id or 0)
    assert {d.AccessionNumber for d in pacs_instances(pacs)} == {""}


def test_refused_when_the_destination_has_no_record(
    state: AppState, pacs: OrthancPeer, tmp_path: Path, client: TestClient
) -> None:
    pacs_clear(pacs)
    add_destination(state, pacs)
    study = ingest_outside(state, tmp_path)  # no registration at MINE of this person
    rsp = client.post(
        "/api/imports", json={"study_uid": study.study_uid, "facility": MINE}, headers=auth_headers()
    )
    assert rsp.status_code == 400
    assert "no record" in rsp.json()["detail"]
    rsp = client.post(
        "/api/imports",
        json={"study_uid": study.study_uid, "facility": MINE, "patient": "NOPE"},
        headers=auth_headers(),
    )
    assert rsp.status_code == 400 and "NOPE" in rsp.json()["detail"]
    with Session(state.engine) as session:
        assert service.list_imports(session=session) == []
    assert pacs_instances(pacs) == []


def test_bad_input_is_a_clear_4xx_and_changes_nothing(
    state: AppState, pacs: OrthancPeer, outside: Outside, client: TestClient
) -> None:
    h = auth_headers()
    rsp = client.post("/api/imports", json={"study_uid": "1.2.3.999", "facility": MINE}, headers=h)
    assert rsp.status_code == 404 and "no study" in rsp.json()["detail"]
    rsp = client.post("/api/imports", json={"study_uid": outside.study_uid, "facility": "nowhere"}, headers=h)
    assert rsp.status_code == 404 and "nowhere" in rsp.json()["detail"]
    rsp = client.post(
        "/api/imports",
        json={"study_uid": outside.study_uid, "facility": MINE, "accession_policy": "x"},
        headers=h,
    )
    assert rsp.status_code in (400, 422)
    assert client.get("/api/imports/999", headers=h).status_code == 404
    assert client.get("/api/imports", headers=h).json() == []
    assert pacs_instances(pacs) == []


def test_dry_run_shows_the_diff_and_sends_nothing(
    state: AppState, pacs: OrthancPeer, outside: Outside, client: TestClient
) -> None:
    rsp = client.post(
        "/api/imports",
        json={"study_uid": outside.study_uid, "facility": MINE, "dry_run": True},
        headers=auth_headers(),
    )
    assert rsp.status_code == 200, rsp.text
    body = rsp.json()
    assert body["plan"]["rename_uids"] is False and len(body["instances"]) == 5
    changes = {c["attribute"]: (c["before"], c["after"]) for c in body["instances"][0]["changes"]}
    assert changes["PatientID"] == ("P1", LOCAL_MRN)
    assert changes["IssuerOfPatientID"] == (OUTSIDE_ISSUER, MINE_ISSUER)
    assert pacs_instances(pacs) == []
    assert client.get("/api/imports", headers=auth_headers()).json() == []


def test_dry_run_names_an_instance_it_cannot_read(
    state: AppState,
    settings: Settings,
    pacs: OrthancPeer,
    outside: Outside,
    client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over HTTP, on the import page and by `scanonce import --dry-run`: the unreadable instance
    named by its SOP Instance UID (no patient data), the others' diffs shown, nothing stored."""
    with Session(state.engine) as session:
        from broker.index import service as index

        key = next(
            r.object_key
            for r in index.find_instances(session=session, study_uid=outside.study_uid)
            if r.sop_uid == outside.sr_uid
        )
    state.store.put(key, io.BytesIO(b"not dicom at all"))
    rsp = client.post(
        "/api/imports",
        json={"study_uid": outside.study_uid, "facility": MINE, "dry_run": True},
        headers=auth_headers(),
    )
    assert rsp.status_code == 200, rsp.text
    by_sop = {i["sop_uid"]: i for i in rsp.json()["instances"]}
    assert set(by_sop) == set(outside.files)
    bad = by_sop.pop(outside.sr_uid)
    assert bad["changes"] == [] and bad["error"].startswith("cannot be read")
    assert "SMITH" not in bad["error"] and "P1" not in bad["error"]
    assert all(i["changes"] and not i["error"] for i in by_sop.values())
    page = client.get(
        "/imports", params={"study": outside.study_uid, "facility": MINE}, headers=auth_headers("radiologist")
    )
    assert page.status_code == 200 and outside.sr_uid in page.text and "cannot be read" in page.text
    for name, value in (("DATABASE_URL", settings.database_url), ("STORAGE_URL", settings.storage_url)):
        monkeypatch.setenv(f"SCANONCE_{name}", value or "")
    cli = ["import", outside.study_uid, "--to", MINE, "--dry-run", "--data-dir", str(settings.data_dir)]
    r = CliRunner().invoke(scanonce, cli)
    assert r.exit_code == 0, r.output
    assert outside.sr_uid in r.output and "cannot be read" in r.output
    assert client.get("/api/imports", headers=auth_headers()).json() == []
    assert pacs_instances(pacs) == []


def test_http_import_then_again_does_not_duplicate(
    state: AppState, pacs: OrthancPeer, outside: Outside, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed = _spy_listing(monkeypatch)
    h = auth_headers()
    rsp = client.post("/api/imports", json={"study_uid": outside.study_uid, "facility": MINE}, headers=h)
    assert rsp.status_code == 202, rsp.text
    first = rsp.json()["id"]
    _run(state, first)
    detail = client.get(f"/api/imports/{first}", headers=h).json()
    assert detail["status"] == "done" and len(detail["instances"]) == 5
    second = client.post(
        "/api/imports", json={"study_uid": outside.study_uid, "facility": MINE}, headers=h
    ).json()
    assert second["id"] != first
    again = _run(state, second["id"])
    # The PACS held the study already, so counts prove nothing: every instance was listed.
    assert (again.status, again.verified) == ("done", 5) and listed == [outside.study_uid]
    held = pacs_instances(pacs)
    assert len(held) == 5 and {d.PatientID for d in held} == {LOCAL_MRN}
    assert [i["id"] for i in client.get("/api/imports", headers=h).json()] == [second["id"], first]


def test_cli_run_queues_and_claims_in_one_step(
    state: AppState, pacs: OrthancPeer, outside: Outside, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`scanonce import`'s path: an active import is claimed and run as `run_now` would; a new
    one is created with its job already claimed by this process, and runs to the same end. Its
    run takes planning's answer that the destination holds nothing of the study (one query
    fewer before the first batch) only when that was the answer."""

    def start() -> tuple[ImportJob, Any]:
        return service.start_claimed(
            engine=state.engine, principal=ADMIN, study_uid=outside.study_uid, facility_id=MINE
        )

    queued = _start(state, outside)
    row, job = start()
    assert row.id == queued.id and job is not None and (job.status, job.attempts) == ("running", 1)
    assert (
        service.run_claimed(engine=state.engine, store=state.store, import_id=row.id or 0, job=job).status
        == "done"
    )
    listed = _spy_listing(monkeypatch)
    row, job = start()
    assert row.id != queued.id and job is not None and (job.status, job.attempts) == ("running", 1)
    final = service.run_claimed(engine=state.engine, store=state.store, import_id=row.id or 0, job=job)
    assert (final.status, final.verified) == ("done", 5) and len(pacs_instances(pacs)) == 5
    # The PACS held the study already (the first import): not verified by its counts alone.
    assert listed == [outside.study_uid]
    with Session(state.engine) as session:
        ended = jobs.get_job(session=session, job_id=job.id or 0)
    assert (ended.status, ended.attempts, ended.progress_done) == ("done", 1, 5)


def test_uid_clash_at_the_destination_renames_consistently(
    state: AppState, pacs: OrthancPeer, outside: Outside
) -> None:
    # Another patient's object at the PACS under the outside study's UID.
    other = make_ds(
        sop="1.2.826.0.1.3680043.99.1",
        study=outside.study_uid,
        series="1.2.826.0.1.3680043.99.2",
        pid="SOMEONE-ELSE",
    )
    pacs_upload(pacs, part10(other))
    row = _start(state, outside)
    final = _run(state, row.id or 0)
    assert final.status == "done", final.message
    held = pacs_instances(pacs)
    stranger = [d for d in held if d.PatientID == "SOMEONE-ELSE"]
    assert len(stranger) == 1 and stranger[0].SOPInstanceUID == other.SOPInstanceUID  # untouched
    imported = [d for d in held if d.PatientID == LOCAL_MRN]
    assert len(imported) == 5
    new_study = {d.StudyInstanceUID for d in imported}
    assert len(new_study) == 1 and new_study != {outside.study_uid}
    assert not {str(d.SOPInstanceUID) for d in imported} & set(outside.files)
    assert not {str(d.SeriesInstanceUID) for d in imported} & set(outside.series_uids)
    cts = [d for d in imported if d.Modality == "CT"]
    frames = {d.FrameOfReferenceUID for d in cts}
    assert len(frames) == 1 and frames != {outside.frame_of_reference}
    (sr,) = [d for d in imported if d.Modality == "SR"]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID in new_study
    by_series = {str(d.SeriesInstanceUID): str(d.SOPInstanceUID) for d in cts}
    referenced = {
        (str(s.SeriesInstanceUID), str(r.ReferencedSOPInstanceUID))
        for s in evidence.ReferencedSeriesSequence
        for r in s.ReferencedSOPSequence
    }
    assert referenced == {(str(d.SeriesInstanceUID), str(d.SOPInstanceUID)) for d in cts}
    assert set(by_series) == {s for s, _ in referenced}
    # The old UIDs are kept in the original attributes.
    olds = {d.OriginalAttributesSequence[-1].ModifiedAttributesSequence[0].StudyInstanceUID for d in imported}
    assert olds == {outside.study_uid}
    # A second import of the same study gives the same new UIDs: nothing duplicated.
    second = _run(state, _start(state, outside).id or 0)
    assert second.status == "done" and second.plan == final.plan
    assert len(pacs_instances(pacs)) == 6


def test_worker_dies_midway_and_the_resumed_job_sends_only_what_is_left(
    state: AppState, pacs: OrthancPeer, outside: Outside, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "BATCH", 2)
    # One connection: the second batch is on the wire while the first is recorded (pipelined),
    # so when the worker dies after that record the PACS holds the first batch and, unrecorded,
    # the second (SENDERS + 1 batches at most); the resumed run sends the second again.
    monkeypatch.setattr(service, "SENDERS", 1)
    row = _start(state, outside)
    assert row.job_id is not None

    class WorkerDied(BaseException):
        """Like SIGKILL: nothing of the job's own bookkeeping runs after it."""

    def die_after_first_batch(done: int, total: int | None, message: str) -> None:
        if message == "sending" and done >= 2:
            raise WorkerDied

    job = jobs.claim(engine=state.engine, job_id=row.job_id)
    assert job is not None
    with pytest.raises(WorkerDied):
        jobs.run_claimed(engine=state.engine, store=state.store, job=job, listener=die_after_first_batch)
    with Session(state.engine) as session:
        before = {
            r.source_sop_uid: (r.status, r.attempts, r.updated_at)
            for r in service.instances_of(session=session, import_id=row.id or 0)
        }
        assert service.get_import(session=session, import_id=row.id or 0).status == "running"
    sent_before = {k for k, v in before.items() if v[0] == "sent"}
    at_death = {str(d.SOPInstanceUID) for d in pacs_instances(pacs)}
    assert len(sent_before) == 2 and sent_before <= at_death
    # Sent but not recorded: the next batch only, nothing beyond SENDERS + 1 batches.
    assert len(at_death) <= (service.SENDERS + 1) * service.BATCH
    assert all(before[sop][0] == "pending" for sop in at_death - sent_before)
    # Another worker finds the job's heartbeat stale and takes it over.
    again = jobs.claim(engine=state.engine, job_id=row.job_id, stale_after=timedelta(0))
    assert again is not None and again.attempts == 2
    jobs.run_claimed(engine=state.engine, store=state.store, job=again)
    with Session(state.engine) as session:
        final = service.get_import(session=session, import_id=row.id or 0)
        after = {r.source_sop_uid: r for r in service.instances_of(session=session, import_id=row.id or 0)}
    assert final.status == "done" and final.verified == 5
    for sop in sent_before:  # not resent: the same single attempt, untouched
        assert (after[sop].attempts, after[sop].updated_at) == (1, before[sop][2])
    assert all(r.status == "sent" and r.attempts == 1 for r in after.values())
    # Sent twice or not, each instance is held once.
    held = [str(d.SOPInstanceUID) for d in pacs_instances(pacs)]
    assert len(held) == len(set(held)) == 5


def test_an_import_whose_job_was_given_up_ends_failed_and_may_be_started_again(
    state: AppState, pacs: OrthancPeer, outside: Outside
) -> None:
    row = _start(state, outside)
    assert row.job_id is not None
    # A worker claims the job and is killed; the next finds its lease run out on the last
    # attempt allowed, and the job runner fails the job for good.
    assert jobs.claim(engine=state.engine, job_id=row.job_id) is not None
    assert jobs.claim(engine=state.engine, stale_after=timedelta(0), max_attempts=1) is None
    with Session(state.engine) as session:
        assert jobs.get_job(session=session, job_id=row.job_id).status == "failed"
        given_up = service.get_import(session=session, import_id=row.id or 0)
    assert given_up.status == "failed" and given_up.finished_at is not None
    assert "worker stopped" in given_up.message and "new import" in given_up.message
    again = _start(state, outside)
    assert again.id != row.id and again.status == "queued"
    # An import whose job ended without the import being told (a row of an earlier version):
    # it does not keep the study blocked either.
    with Session(state.engine) as session:
        session.execute(text("UPDATE job SET status = 'failed' WHERE id = :id"), {"id": again.job_id})
        session.commit()
    third = _start(state, outside)
    assert third.id not in (row.id, again.id)
    with Session(state.engine) as session:
        assert service.get_import(session=session, import_id=again.id or 0).status == "failed"
    assert _run(state, third.id or 0).status == "done"
    assert len(pacs_instances(pacs)) == 5


def test_cancel_a_queued_import(
    state: AppState, pacs: OrthancPeer, outside: Outside, client: TestClient
) -> None:
    h = auth_headers()
    created = client.post(
        "/api/imports", json={"study_uid": outside.study_uid, "facility": MINE}, headers=h
    ).json()
    rsp = client.post(f"/api/imports/{created['id']}/cancel", headers=h)
    assert rsp.status_code == 200 and rsp.json()["status"] == "cancelled"
    assert _run(state, created["id"]).status == "cancelled"
    assert pacs_instances(pacs) == []
    assert client.post(f"/api/imports/{created['id']}/cancel", headers=h).status_code == 400


def test_unreadable_instance_fails_alone_and_the_failed_import_stays_failed(
    state: AppState, pacs: OrthancPeer, outside: Outside
) -> None:
    with Session(state.engine) as session:
        from broker.index import service as index

        ref = next(
            r
            for r in index.find_instances(session=session, study_uid=outside.study_uid)
            if r.sop_uid == outside.sr_uid
        )
    stored = b"".join(state.store.get(ref.object_key))
    state.store.put(ref.object_key, io.BytesIO(b"not dicom at all"))
    final = _run(state, _start(state, outside).id or 0)
    assert (final.status, final.sent, final.failed) == ("failed", 4, 1)
    with Session(state.engine) as session:
        rows = service.instances_of(session=session, import_id=final.id or 0)
        bad = session.get(ImportInstance, next(r.id for r in rows if r.source_sop_uid == outside.sr_uid))
        job = jobs.get_job(session=session, job_id=final.job_id or 0)
    assert bad is not None and "cannot be read" in bad.detail
    assert len(pacs_instances(pacs)) == 4
    # Failed for good, its job too: not queued to run again (a new import is the way to retry).
    assert (job.status, job.error) == ("failed", final.message)
    # Even a job put back in the queue (its backoff passed, or by hand) leaves it as it ended,
    # though the instance could be read now.
    state.store.put(ref.object_key, io.BytesIO(stored))
    with Session(state.engine) as session:
        session.execute(
            text("UPDATE job SET status = 'queued', run_after = NULL WHERE id = :id"), {"id": final.job_id}
        )
        session.commit()
    jobs.work(engine=state.engine, store=state.store, once=True)
    with Session(state.engine) as session:
        after = service.get_import(session=session, import_id=final.id or 0)
    assert (after.status, after.sent, after.failed, after.message) == ("failed", 4, 1, final.message)
    assert after.finished_at == final.finished_at
    assert len(pacs_instances(pacs)) == 4


def test_claimed_run_of_a_study_the_destination_lacks_asks_once(
    state: AppState, pacs: OrthancPeer, outside: Outside, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planning found the PACS without the study: the run does not ask again before sending, and
    the count per series still verifies what arrived (no listing)."""
    listed = _spy_listing(monkeypatch)
    asked: list[str] = []
    real = delivery.series_counts

    def series_counts(**kw: Any) -> dict[str, int] | None:
        asked.append(kw["study_uid"])
        return real(**kw)

    monkeypatch.setattr(delivery, "series_counts", series_counts)
    row, job = service.start_claimed(
        engine=state.engine, principal=ADMIN, study_uid=outside.study_uid, facility_id=MINE
    )
    final = service.run_claimed(engine=state.engine, store=state.store, import_id=row.id or 0, job=job)
    assert (final.status, final.verified) == ("done", 5) and len(pacs_instances(pacs)) == 5
    assert asked == [outside.study_uid] and listed == []  # the verification's count only
