"""Pruning old finished jobs leaves index sync intact: after a prune, the facility's page still
names its last sync, and the next sync is incremental (only what changed is written)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pydicom
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy import update
from sqlmodel import Session, select

from broker.app import create_app
from broker.deps import AppState
from broker.federation import service
from broker.jobs import service as jobs
from broker.jobs.models import Job
from tests.federation.conftest import TEST_FILES, Archives, delete_study, upload
from tests.support import auth_headers, to_bytes


def test_incremental_sync_after_a_prune_writes_only_what_changed(
    federated: AppState, archives: Archives
) -> None:
    first = service.sync_facility(engine=federated.engine, store=federated.store, facility_id="web")
    again = service.sync_facility(engine=federated.engine, store=federated.store, facility_id="web")
    assert (first.studies_written, again.studies_written) == (2, 0)
    # Both syncs finished long ago.
    with Session(federated.engine) as session:
        session.exec(update(Job).values(finished_at=datetime.now(UTC) - timedelta(days=90)))
        session.commit()
    assert jobs.prune(engine=federated.engine, older_than=timedelta(days=30)) == 1
    with Session(federated.engine) as session:
        assert [j.id for j in session.exec(select(Job))] == [again.job_id]  # the last sync stays
    client = TestClient(create_app(state=federated), headers=auth_headers())
    sync_state = client.get("/api/facilities/web").json()["sync"]
    assert sync_state["last_job_id"] == again.job_id
    assert client.get(f"/api/jobs/{again.job_id}").json()["status"] == "done"

    new = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    new.StudyInstanceUID, new.SeriesInstanceUID, new.SOPInstanceUID = (generate_uid() for _ in range(3))
    try:
        upload(archives.web, to_bytes(new))
        after = service.sync_facility(engine=federated.engine, store=federated.store, facility_id="web")
        assert (after.studies_seen, after.studies_written, after.studies_removed) == (3, 1, 0)
        assert after.job_id > again.job_id  # a fresh id, never a pruned one
        # And once more with nothing changed: nothing written, nothing removed.
        still = service.sync_facility(engine=federated.engine, store=federated.store, facility_id="web")
        assert (still.studies_seen, still.studies_written, still.studies_removed) == (3, 0, 0)
    finally:
        delete_study(archives.web, new.StudyInstanceUID)
